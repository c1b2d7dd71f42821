"""HTTP routes through HandleHTTP, Pulse jobs through ExecuteJob, and the standard gRPC services."""

from __future__ import annotations

import json
import platform
import shlex
import signal
import sys
import time
import uuid
from datetime import datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import attached_client, http
from kernel_provider.proto import domain_pb2, python_pb2


def glyph() -> str:
    return f"http-{uuid.uuid4().hex[:8]}"


def test_initialize_lists_every_route_and_the_job_handler(provider):
    response = provider.initialize()
    routes = {(r.method, r.path) for r in response.http_routes}
    assert routes == {
        ("POST", "/execute"),
        ("POST", "/evaluate"),
        ("GET", "/kernels"),
        ("POST", "/kernels/{glyph_id}/interrupt"),
        ("POST", "/kernels/{glyph_id}/restart"),
        ("DELETE", "/kernels/{glyph_id}"),
        ("GET", "/kernels/{glyph_id}/notebook"),
        ("GET", "/kernelspecs"),
        ("GET", "/packages"),
        ("POST", "/packages"),
        ("GET", "/glyph/{asset}"),
        ("GET", "/version"),
    }
    assert all(r.description for r in response.http_routes)
    assert list(response.handler_names) == ["python.script"]
    assert response.python_provider


def test_execute_route_answers_the_execution_result(provider):
    g = glyph()
    status, _, result = http(
        provider, "POST", "/execute?trace=1", {"content": "x = 20\nprint('hi')\nx + 1", "glyph_id": g}
    )
    assert status == 200
    assert result["success"] and result["stdout"] == "hi\n" and result["result"] == "21"
    assert {"stderr", "error", "duration_ms", "execution_count", "outputs"} <= set(result)
    # `code` works as well as `content`, and the glyph's state is the same one Execute sees.
    status, _, result = http(provider, "POST", "/execute", {"code": "x", "glyph_id": g})
    assert result["result"] == "20"
    assert provider.run("x * 2", g)["result"] == "40"


def test_execute_route_takes_upstream_and_timeout(provider):
    g = glyph()
    _, _, result = http(
        provider, "POST", "/execute", {"code": "upstream['id']", "glyph_id": g, "upstream_attestation": {"id": "att-9"}}
    )
    assert result["result"] == "'att-9'"
    _, _, result = http(
        provider,
        "POST",
        "/execute",
        {"code": "upstream['id']", "glyph_id": g, "upstream_attestation": '{"id": "as-text"}'},
    )
    assert result["result"] == "'as-text'"
    _, _, result = http(
        provider, "POST", "/execute", {"code": "import time\ntime.sleep(30)", "glyph_id": g, "timeout_secs": 1}
    )
    assert not result["success"] and "timed out after 1 seconds" in result["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        ({}, "`content` or `code`"),
        ({"code": ""}, "code is empty"),
        ({"code": 1}, "`content` or `code`"),
        ({"code": "1", "glyph_id": 7}, "glyph_id must be a string"),
        ({"code": "1", "timeout_secs": -1}, "timeout_secs must be"),
        ({"code": "1", "timeout_secs": "soon"}, "timeout_secs must be"),
        ({"code": "1", "upstream_attestation": "{bad"}, "not valid JSON"),
        ({"code": "1", "upstream_attestation": [1]}, "must be a JSON object"),
    ],
)
def test_execute_route_rejects_bad_bodies(provider, body, message):
    status, _, answer = http(provider, "POST", "/execute", body)
    assert status == 400
    assert message in answer["error"]


def test_evaluate_returns_json_values_or_their_text(provider):
    g = glyph()
    provider.run("data = {'a': [1, 2.5, None], 'b': 'text'}\nimport datetime", g)
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": "data", "glyph_id": g})
    assert status == 200
    assert answer["success"] and answer["error"] is None
    assert answer["result"] == {"a": [1, 2.5, None], "b": "text"}
    assert isinstance(answer["duration_ms"], float)
    _, _, answer = http(provider, "POST", "/evaluate", {"expr": "datetime.date(2026, 1, 2)", "glyph_id": g})
    assert answer["result"] == "datetime.date(2026, 1, 2)"
    _, _, answer = http(provider, "POST", "/evaluate", {"expr": "[1, datetime.date(2026, 1, 2)]", "glyph_id": g})
    assert answer["result"] == "[1, datetime.date(2026, 1, 2)]"
    _, _, answer = http(provider, "POST", "/evaluate", {"expr": "missing_name", "glyph_id": g})
    assert not answer["success"] and answer["error"].startswith("NameError")
    # Evaluating leaves no trace in the glyph's history.
    assert provider.run("1", g)["execution_count"] == 2


def test_evaluate_on_a_glyphs_first_request_knows_the_glyph(provider):
    """The glyph's id reaches its kernel with each request, the silent ones of /evaluate too."""
    g = glyph()
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": "__glyph_id__", "glyph_id": g})
    assert status == 200 and answer["result"] == g
    assert provider.run("print(__glyph_id__)", g)["stdout"] == g + "\n"


def test_evaluate_rejects_a_missing_expression(provider):
    status, _, answer = http(provider, "POST", "/evaluate", {"glyph_id": glyph()})
    assert status == 400 and "expr" in answer["error"]


def test_kernels_lists_live_glyph_sessions(provider):
    g = glyph()
    provider.run("1", g)
    provider.run("2", g)
    status, _, answer = http(provider, "GET", "/kernels")
    assert status == 200
    (entry,) = [k for k in answer["kernels"] if k["glyph_id"] == g]
    assert entry["kernel_name"] == "python3"
    assert entry["execution_state"] == "idle"
    assert entry["execution_count"] == 2
    assert entry["kernel_id"]
    datetime.fromisoformat(entry["last_activity"])
    assert entry["connection_file"].startswith(str(provider.connection_dir))


def test_interrupt_restart_and_delete_a_glyph_kernel(provider, tmp_path):
    g = glyph()
    provider.run("state = 1", g)
    # The code says when it is running: an interrupt that reaches a kernel before it starts
    # the code is ignored by ipykernel, so the test waits for the marker, as a person would
    # wait to see the glyph running before pressing stop.
    marker = tmp_path / "running"
    code = f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\nfor _ in range(600): time.sleep(0.1)"
    running = provider.python.Execute.future(python_pb2.PythonExecuteRequest(code=code, glyph_id=g), timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.05)
    assert any(
        k["glyph_id"] == g and k["execution_state"] == "busy" for k in http(provider, "GET", "/kernels")[2]["kernels"]
    )
    status, _, _ = http(provider, "POST", f"/kernels/{g}/interrupt")
    assert status == 200
    interrupted = running.result()
    assert not interrupted.success and "KeyboardInterrupt" in interrupted.error
    assert provider.run("state", g)["result"] == "1"

    status, _, info = http(provider, "POST", f"/kernels/{g}/restart")
    assert status == 200 and info["execution_count"] == 0
    assert provider.run("'state' in dir()", g)["result"] == "False"

    status, _, _ = http(provider, "DELETE", f"/kernels/{g}")
    assert status == 200
    assert all(k["glyph_id"] != g for k in http(provider, "GET", "/kernels")[2]["kernels"])


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/kernels/nobody/interrupt"), ("POST", "/kernels/nobody/restart"), ("DELETE", "/kernels/nobody")],
)
def test_unknown_glyph_is_404(provider, method, path):
    status, _, answer = http(provider, method, path)
    assert status == 404 and "nobody" in answer["error"]


def test_unknown_path_is_404_and_wrong_method_405(provider):
    status, _, answer = http(provider, "GET", "/nowhere")
    assert status == 404 and "/nowhere" in answer["error"]
    status, headers, answer = http(provider, "GET", "/execute")
    assert status == 405
    assert headers["Allow"] == ["POST"]
    assert "POST" in answer["error"]


def test_kernelspecs_and_version(provider):
    status, _, answer = http(provider, "GET", "/kernelspecs")
    assert status == 200 and answer["default"] == "python3"
    (python3,) = [k for k in answer["kernelspecs"] if k["name"] == "python3"]
    assert python3["in_use"] and python3["language"] == "python" and python3["display_name"]
    status, _, answer = http(provider, "GET", "/version")
    assert status == 200
    assert answer["provider"] and answer["jupyter_client"] and answer["ipykernel"]
    assert answer["python"].count(".") == 2


def test_version_starts_the_kernel_interpreter_once(tmp_path, fresh_provider):
    # A kernelspec whose interpreter is a wrapper that notes each start before running Python.
    starts = tmp_path / "starts"
    wrapper = tmp_path / "noting-python"
    wrapper.write_text(
        f'#!/bin/sh\necho start >> {shlex.quote(str(starts))}\nexec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    spec_dir = tmp_path / "jupyter" / "kernels" / "noted"
    spec_dir.mkdir(parents=True)
    argv = [str(wrapper), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "noted", "language": "python"}))
    plugin = fresh_provider("--kernel", "noted", env={"JUPYTER_PATH": str(tmp_path / "jupyter")})
    answers = [http(plugin, "GET", "/version") for _ in range(3)]
    for status, _, answer in answers:
        assert status == 200
        assert answer["kernelspec"] == "noted"
        assert answer["python"] == platform.python_version() and answer["ipykernel"]
    # No glyph ran (and no pool), so every start is /version's probe: one for three calls.
    assert starts.read_text().splitlines() == ["start"]


# --- jobs ---------------------------------------------------------------------------------------


def job(plugin, payload, handler="python.script", timeout_secs=None):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = domain_pb2.ExecuteJobRequest(job_id="job-1", handler_name=handler, payload=raw)
    if timeout_secs is not None:
        request.timeout_secs = timeout_secs
    return plugin.domain.ExecuteJob(request, timeout=120)


def test_script_job_runs_like_execute(provider):
    g = glyph()
    response = job(
        provider,
        {
            "code": "import sys\nprint('line 1\\nline 2')\nprint('careful', file=sys.stderr)\n7",
            "glyph_id": g,
            "upstream": {"id": "u"},
        },
    )
    assert response.success and response.error == ""
    assert response.plugin_version
    result = json.loads(response.result)
    assert result["result"] == "7" and result["stdout"] == "line 1\nline 2\n"
    entries = [(e.level, e.message) for e in response.log_entries]
    assert entries == [("info", "line 1"), ("info", "line 2"), ("warn", "careful")]
    for entry in response.log_entries:
        datetime.fromisoformat(entry.timestamp.replace("Z", "+00:00"))
    assert provider.run("upstream", g)["success"]


def test_failing_job_reports_the_error(provider):
    response = job(provider, {"code": "raise ValueError('bad input')"})
    assert not response.success
    assert response.error.startswith("ValueError: bad input")
    assert response.log_entries[-1].level == "error"


def test_job_timeout_is_honoured(provider):
    response = job(provider, {"code": "import time\ntime.sleep(30)", "glyph_id": glyph()}, timeout_secs=1)
    assert not response.success and "timed out after 1 seconds" in response.error


@pytest.mark.parametrize(
    ("payload", "handler", "message"),
    [
        ({"code": "1"}, "python.other", "this plugin handles: python.script"),
        (b"not json", "python.script", "not valid JSON"),
        ({"glyph_id": "g"}, "python.script", "needs `code`"),
        ({"code": "1", "upstream": "x"}, "python.script", "`upstream`"),
        ({"code": ""}, "python.script", "code is empty"),
    ],
)
def test_bad_jobs_fail_with_a_sentence(provider, payload, handler, message):
    response = job(provider, payload, handler=handler)
    assert not response.success
    assert message in response.error


# --- standard gRPC services ----------------------------------------------------------------------


def test_grpc_health_reports_serving(provider):
    stub = health_pb2_grpc.HealthStub(provider.channel)
    for service in ["", "protocol.PythonService", "protocol.DomainPluginService"]:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_reports_not_serving_while_shutting_down(fresh_provider):
    plugin = fresh_provider()
    stub = health_pb2_grpc.HealthStub(plugin.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    plugin.process.send_signal(signal.SIGTERM)
    statuses = []
    try:
        for answer in watch:
            statuses.append(answer.status)
    except grpc.RpcError:
        pass
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert plugin.process.wait(timeout=30) == 0


def test_reflection_lists_the_services(provider):
    stub = reflection_pb2_grpc.ServerReflectionStub(provider.channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"protocol.PythonService", "protocol.DomainPluginService", "grpc.health.v1.Health"} <= names


def test_interrupt_waits_for_the_glyphs_code_to_start(fresh_provider):
    """A run queued in the kernel behind someone else's code is the one interrupted, once it starts."""
    plugin = fresh_provider("--execute-timeout", "30")
    plugin.run("import time", "g")
    (connection_file,) = plugin.connection_dir.glob("kernel-*.json")
    with attached_client(connection_file) as person:
        person.execute("time.sleep(1.5)\nperson_done = True")
        request = python_pb2.PythonExecuteRequest(code="for _ in range(300): time.sleep(0.1)", glyph_id="g")
        running = plugin.python.Execute.future(request, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and plugin.health().details["busy_kernels"] != "1":
            time.sleep(0.02)
        # The kernel is still busy with the person's code: the interrupt must wait for the glyph's.
        status, _, _ = http(plugin, "POST", "/kernels/g/interrupt")
        assert status == 200
        result = running.result()
        assert not result.success
        assert "KeyboardInterrupt" in result.error and "timed out" not in result.error
        assert plugin.run("person_done", "g")["result"] == "True"  # the person's code was not cut short
