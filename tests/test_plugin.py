"""The plugin protocol: launch, port line, DomainPluginService, signals, and the flags."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from conftest import PLUGIN_EXECUTABLE, attached_client, install_copy_of_python3
from kernel_provider.proto import domain_pb2, python_pb2

EMPTY = domain_pb2.Empty()


def loopback_listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
                found.append(address)
    return found


def test_stdout_carries_only_the_port_line(fresh_provider):
    plugin = fresh_provider()
    plugin.run("print('to the glyph, not to stdout')", "g")
    assert plugin.stop() == 0
    assert plugin.process.stdout.read() == ""
    assert any("serving on" in line for line in plugin.stderr_lines)


def test_binds_loopback_only(fresh_provider):
    plugin = fresh_provider()
    listeners = loopback_listeners(plugin.port)
    # 127.0.0.1 and nothing else, whether bound as IPv4 or as an IPv4-mapped IPv6 socket.
    assert listeners in (["0100007F"], ["0000000000000000FFFF00000100007F"]), listeners


def stopped_log(plugin) -> str:
    """Everything the plugin wrote on stderr, once it has exited and the reader has caught up."""
    assert plugin.stop() == 0
    deadline = time.monotonic() + 30
    while not any("stopped" in line for line in plugin.stderr_lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    return "".join(plugin.stderr_lines)


def test_taken_port_moves_to_the_next(fresh_provider):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        plugin = fresh_provider(port=taken)
        assert plugin.port != taken
        assert taken < plugin.port <= taken + 9
    log = stopped_log(plugin)
    assert f"port {taken} is taken, trying the next" in log
    # Our sentence only, not grpc's own `E1127 ... add_port.cc] Failed to add port` line.
    assert "add_port" not in log and "Failed to add port" not in log


def test_an_explicit_address_that_is_taken_is_refused(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        command = [PLUGIN_EXECUTABLE, "--address", f"127.0.0.1:{taken}", "--connection-dir", str(tmp_path / "c")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == ""  # no port line: QNTX must not think it serves elsewhere
    assert f"cannot listen on 127.0.0.1:{taken}" in done.stderr
    assert "--port tries the next nine" in done.stderr


def test_a_free_explicit_address_is_used_as_given(fresh_provider):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    plugin = fresh_provider("--address", f"127.0.0.1:{free}")
    assert plugin.port == free
    assert "not loopback" not in stopped_log(plugin)


def test_an_address_beyond_loopback_is_warned_about_once(fresh_provider):
    plugin = fresh_provider("--address", "0.0.0.0:0", initialize=False)
    assert loopback_listeners(plugin.port) in (["00000000"], ["00000000000000000000000000000000"])
    warnings = [line for line in stopped_log(plugin).splitlines() if "not loopback" in line]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0] and "0.0.0.0" in warnings[0] and "run code" in warnings[0]


def test_metadata(fresh_provider):
    metadata = fresh_provider(initialize=False).domain.Metadata(EMPTY)
    assert metadata.name == "python"
    assert metadata.version
    assert metadata.qntx_version == ">=0.1.0"
    assert "python3" in metadata.description
    assert metadata.author and metadata.license


def test_name_comes_from_a_symlinked_executable(fresh_provider, tmp_path):
    link = tmp_path / "qntx-bio-plugin"
    link.symlink_to(PLUGIN_EXECUTABLE)
    assert fresh_provider(executable=link, initialize=False).domain.Metadata(EMPTY).name == "bio"


def test_name_flag_overrides_the_file_name(fresh_provider, tmp_path):
    link = tmp_path / "qntx-bio-plugin"
    link.symlink_to(PLUGIN_EXECUTABLE)
    plugin = fresh_provider("--name", "genomics", executable=link, initialize=False)
    assert plugin.domain.Metadata(EMPTY).name == "genomics"


def test_initialize_declares_python_provider(fresh_provider):
    plugin = fresh_provider(initialize=False)
    response = plugin.domain.Initialize(domain_pb2.InitializeRequest(ats_store_endpoint="127.0.0.1:1"))
    assert response.python_provider is True


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"execute_timeout": "soon"}, "execute_timeout must be a number"),
        ({"execute_timeout": "-1"}, "more than 0"),
        ({"kernel": "no-such-kernel"}, "No kernelspec named 'no-such-kernel'"),
        ({"kernel": "../python3"}, "must be a kernelspec name"),
        ({"max_output_bytes": "12"}, "max_output_bytes must be between"),
        ({"watcher_share": "0"}, "watcher_share must be from 0.05 to 1"),
        ({"watcher_share": "nan"}, "watcher_share must be from 0.05 to 1"),
        ({"watcher_share": "half"}, "watcher_share must be a number"),
    ],
)
def test_initialize_rejects_bad_config(fresh_provider, config, message):
    plugin = fresh_provider(initialize=False)
    with pytest.raises(grpc.RpcError) as caught:
        plugin.initialize(**config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    if "no-such-kernel" in config.values():
        assert "python3" in caught.value.details()  # the sentence lists what is installed


def test_initialize_config_overrides_flags_and_ignores_unknown_keys(fresh_provider):
    plugin = fresh_provider("--execute-timeout", "60", initialize=False)
    plugin.initialize(execute_timeout="1.5", some_future_key="x")
    result = plugin.run("import time\ntime.sleep(30)", "g")
    assert "timed out after 1.5 seconds" in result["error"]
    assert any("some_future_key" in line for line in plugin.stderr_lines)


def test_second_initialize_does_not_duplicate_kernels(fresh_provider):
    plugin = fresh_provider()
    plugin.run("a = 1", "g1")
    plugin.run("b = 1", "g2")
    pids = sorted(plugin.kernel_pids())
    assert len(pids) == 2
    plugin.initialize()
    assert plugin.run("a", "g1")["result"] == "1"  # same kernel, same state
    assert sorted(plugin.kernel_pids()) == pids


def test_initialize_with_a_new_kernelspec_stops_the_old_kernels(fresh_provider, tmp_path):
    env = install_copy_of_python3(tmp_path / "jupyter", "python3-copy")
    plugin = fresh_provider(env=env)
    plugin.run("a = 1", "g1")
    old = plugin.kernel_pids()
    plugin.initialize(execute_timeout="30")  # same kernelspec: the kernel and its state stay
    assert plugin.kernel_pids() == old
    assert plugin.run("a", "g1")["result"] == "1"
    plugin.initialize(kernel="python3-copy")
    assert plugin.health().details["kernelspec"] == "python3-copy"
    assert plugin.run("'a' in dir()", "g1")["result"] == "False"
    assert not set(plugin.kernel_pids()) & set(old)
    (connection_file,) = plugin.connection_dir.glob("*.json")
    assert json.loads(connection_file.read_text())["kernel_name"] == "python3-copy"


def test_health_counts_live_and_busy_kernels(fresh_provider):
    plugin = fresh_provider()
    health = plugin.health()
    assert health.healthy
    assert health.details["kernelspec"] == "python3"
    assert health.details["live_kernels"] == "0"
    plugin.run("1", "g1")
    running = plugin.python.Execute.future(
        python_pb2.PythonExecuteRequest(code="import time\ntime.sleep(2)", glyph_id="g2")
    )
    deadline = time.monotonic() + 30
    while plugin.health().details["busy_kernels"] != "1" and time.monotonic() < deadline:
        time.sleep(0.05)
    details = plugin.health().details
    assert details["busy_kernels"] == "1"
    assert details["live_kernels"] == "2"
    assert running.result().success
    assert plugin.health().details["busy_kernels"] == "0"


def test_config_schema_describes_every_key(fresh_provider):
    fields = fresh_provider(initialize=False).domain.ConfigSchema(EMPTY).fields
    assert {"kernel", "execute_timeout", "max_output_bytes"} <= set(fields)
    assert fields["kernel"].default_value == "python3"
    assert fields["execute_timeout"].type == "number"
    assert fields["execute_timeout"].default_value == "60"
    assert all(f.description for f in fields.values())


def test_ax_parsing_is_unimplemented(fresh_provider):
    plugin = fresh_provider(initialize=False)
    with pytest.raises(grpc.RpcError) as caught:
        plugin.domain.ParseAxQuery(domain_pb2.ParseAxQueryRequest(query="x"))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_websocket_answers_ping_with_pong_and_ends_on_close(fresh_provider):
    plugin = fresh_provider(initialize=False)
    Type = domain_pb2.WebSocketMessage.Type
    messages = [
        domain_pb2.WebSocketMessage(type=Type.PING, timestamp=123),
        domain_pb2.WebSocketMessage(type=Type.PING, timestamp=456),
        domain_pb2.WebSocketMessage(type=Type.CLOSE),
    ]
    replies = list(plugin.domain.HandleWebSocket(iter(messages), timeout=30))
    assert [(r.type, r.timestamp) for r in replies] == [(Type.PONG, 123), (Type.PONG, 456)]


def test_shutdown_stops_every_kernel_and_the_process(fresh_provider):
    plugin = fresh_provider()
    plugin.run("1", "g1")
    plugin.run("1", "g2")
    assert len(plugin.kernel_pids()) == 2
    plugin.domain.Shutdown(EMPTY)
    assert plugin.process.wait(timeout=30) == 0
    assert plugin.kernel_pids() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_leaving_no_kernel(fresh_provider, signum):
    plugin = fresh_provider()
    plugin.run("x = 1", "g1")
    busy = plugin.python.Execute.future(
        python_pb2.PythonExecuteRequest(code="import time\ntime.sleep(60)", glyph_id="g2")
    )
    deadline = time.monotonic() + 30
    while len(plugin.kernel_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = plugin.kernel_pids()
    assert len(pids) == 2
    plugin.process.send_signal(signum)
    assert plugin.process.wait(timeout=30) == 0
    with pytest.raises(grpc.RpcError):
        busy.result(timeout=30)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert list(plugin.connection_dir.glob("*.json")) == []


def test_unknown_kernelspec_flag_exits_2_before_announcing(tmp_path):
    process = subprocess.run(
        [str(PLUGIN_EXECUTABLE), "--port", "0", "--kernel", "nope", "--connection-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert process.stdout == ""
    assert "No kernelspec named 'nope'" in process.stderr
    assert "python3" in process.stderr


def test_execute_timeout_flag_interrupts_and_keeps_state(fresh_provider):
    plugin = fresh_provider("--execute-timeout", "1")
    plugin.run("kept = 'yes'", "g")
    result = plugin.run("while True: pass", "g")
    assert not result["success"]
    assert "timed out after 1 seconds" in result["error"]
    assert plugin.run("kept", "g")["result"] == "'yes'"


def test_a_run_that_ignores_interrupts_gets_a_fresh_kernel(fresh_provider):
    plugin = fresh_provider("--execute-timeout", "1")
    plugin.run("kept = 'yes'", "g")
    old = plugin.kernel_pids()
    code = "import signal\nsignal.signal(signal.SIGINT, lambda *a: None)\nwhile True: pass"
    result = plugin.run(code, "g")
    assert not result["success"]
    assert "did not respond to an interrupt" in result["error"]
    assert "state was lost" in result["error"]
    assert plugin.kernel_pids() != old
    assert plugin.run("'kept' in dir()", "g")["result"] == "False"


def test_connection_dir_is_private(fresh_provider):
    plugin = fresh_provider()
    plugin.run("1", "g")
    assert plugin.connection_dir.stat().st_mode & 0o777 == 0o700
    files = list(plugin.connection_dir.glob("*.json"))
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    info = json.loads(files[0].read_text())
    assert info["kernel_name"] == "python3" and info["key"]


def test_another_clients_code_never_leaks_into_an_answer(fresh_provider):
    plugin = fresh_provider()
    plugin.run("import time", "g")
    (connection_file,) = plugin.connection_dir.glob("*.json")
    with attached_client(connection_file) as person:
        # The person's loop prints while the glyph's run is queued behind it and then runs.
        person.execute("for i in range(20):\n    print('person', i, flush=True)\n    time.sleep(0.05)")
        result = plugin.run("print('glyph')\n'glyph value'", "g")
        assert result["stdout"] == "glyph\n"
        assert result["result"] == "'glyph value'"
        assert all("person" not in json.dumps(o) for o in result["outputs"])
        # And the person's session is unharmed: it sees the glyph's state.
        reply = person.execute_interactive("assert __glyph_id__ == 'g'", timeout=30)
        assert reply["content"]["status"] == "ok"


def test_kernel_provider_run_starts_a_provider_for_the_call():
    ok = subprocess.run(
        ["kernel-provider", "run", "print('hello')\n6 * 7"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{PLUGIN_EXECUTABLE.parent}:{os.environ['PATH']}"},
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["hello", "Out[1]: 42"]
    failed = subprocess.run(
        [str(PLUGIN_EXECUTABLE.parent / "kernel-provider"), "run", "1 / 0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "ZeroDivisionError: division by zero" in failed.stderr


def test_kernel_provider_run_against_a_running_provider(provider):
    target = f"127.0.0.1:{provider.port}"
    command = [
        str(PLUGIN_EXECUTABLE.parent / "kernel-provider"),
        "run",
        "--target",
        target,
        "--glyph",
        "cli-glyph",
    ]
    assert subprocess.run([*command, "n = 5"], capture_output=True, timeout=60).returncode == 0
    again = subprocess.run([*command, "n * 2"], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "Out[2]: 10"
    bad = subprocess.run([*command, ""], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
