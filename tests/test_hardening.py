"""Issue 9's attacks on the protocol and the provider, each written as the attack itself.

Glyph code (or a local process) does exactly what an attacker would; each test asserts that the
attack fails, that nothing is lost, and that the provider goes on serving. The sandbox's own
attacks (other glyphs' kernels, /proc, orphans, memory) live with the sandbox.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from fake_ats import FakeATSStore

from conftest import RPC_TIMEOUT, http, launch
from kernel_provider.proto import domain_pb2

TOKEN = "first-token"


def glyph(prefix: str = "hard") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def one_sentence(text: str) -> None:
    assert len(text) > 15 and text.rstrip().endswith("."), text
    assert text.count(". ") == 0, f"more than one sentence: {text!r}"


# ------------------------------------------------------------------ a second Initialize (point 2)

# Glyph code that finds nothing but the provider's port (an attacker reads it from /proc/net/tcp)
# and re-Initializes the provider with its own attestation store.
REINITIALIZE_FROM_A_GLYPH = """
import grpc
from kernel_provider.proto import domain_pb2, domain_pb2_grpc
with grpc.insecure_channel("127.0.0.1:{port}") as channel:
    stub = domain_pb2_grpc.DomainPluginServiceStub(channel)
    request = domain_pb2.InitializeRequest(ats_store_endpoint={endpoint!r}, auth_token={token!r},
                                           config={config!r})
    try:
        stub.Initialize(request, timeout=60)
        print("ACCEPTED")
    except grpc.RpcError as exc:
        print(exc.code().name, exc.details())
"""


@pytest.fixture
def stores():
    real, rogue = FakeATSStore(token=TOKEN).start(), FakeATSStore(token=TOKEN).start()
    yield real, rogue
    real.stop()
    rogue.stop()


def initialize(plugin, endpoint: str, token: str, **config: str):
    request = domain_pb2.InitializeRequest(ats_store_endpoint=endpoint, auth_token=token, config=config)
    return plugin.domain.Initialize(request, timeout=RPC_TIMEOUT)


def test_a_glyph_cannot_redirect_attestations_with_a_second_initialize(fresh_provider, stores):
    real, rogue = stores
    plugin = fresh_provider(initialize=False)
    initialize(plugin, real.endpoint, TOKEN)
    attacker, victim = glyph("attacker"), glyph("victim")
    assert plugin.run("secret = 'kept'", victim)["success"]
    for token, config in [("", {}), ("guessed", {}), ("", {"execute_timeout": "1"})]:
        code = REINITIALIZE_FROM_A_GLYPH.format(port=plugin.port, endpoint=rogue.endpoint, token=token, config=config)
        result = plugin.run(code, attacker)
        assert result["success"], result["error"]
        status, _, details = result["stdout"].strip().partition(" ")
        assert status == "PERMISSION_DENIED", result["stdout"]
        one_sentence(details)
    # Every glyph's attest() still reaches the store QNTX named, and nothing else changed.
    made = plugin.run("print(attest(['a'], ['b'], ['c'])['id'])", victim)
    assert made["success"], made["error"]
    assert [c.auth_token for c in real.creates()] == [TOKEN]
    assert not rogue.creates()
    assert plugin.run("secret", victim)["result"] == "'kept'"
    assert plugin.run("import time; time.sleep(1.5); 'slow is fine'", victim)["success"]  # timeout untouched


def test_qntx_may_initialize_again_and_move_the_store_with_its_token(fresh_provider, stores):
    real, other = stores
    plugin = fresh_provider(initialize=False)
    initialize(plugin, real.endpoint, TOKEN)
    initialize(plugin, real.endpoint, TOKEN, execute_timeout="30")  # the same again is fine
    g = glyph()
    assert plugin.run("attest(['a'], ['b'], ['c'])", g)["success"]
    initialize(plugin, other.endpoint, TOKEN)  # the first's token may move the endpoint
    assert plugin.run("attest(['d'], ['e'], ['f'])", g)["success"]
    assert len(real.creates()) == 1 and len(other.creates()) == 1
    # A local process without the token cannot move it back, nor change the token.
    for endpoint, token in [(real.endpoint, ""), (other.endpoint, "another-token")]:
        with pytest.raises(grpc.RpcError) as refused:
            initialize(plugin, endpoint, token)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        one_sentence(refused.value.details())


def test_a_refused_first_initialize_does_not_fix_the_store(fresh_provider, stores):
    real, _ = stores
    plugin = fresh_provider(initialize=False)
    with pytest.raises(grpc.RpcError) as bad:
        initialize(plugin, "127.0.0.1:1", "wrong", execute_timeout="soon")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    initialize(plugin, real.endpoint, TOKEN)
    assert plugin.run("attest(['a'], ['b'], ['c'])", glyph())["success"]
    assert json.loads(plugin.health().details["live_kernels"]) == 1


# ------------------------------------------------------------------ every answer under 4 MB (point 9)

GRPC_LIMIT = 4 * 1024 * 1024
CUT = "cut to fit the 4 MB answer limit"
HUGE_ERROR = 'x = "still here"\nraise ValueError("E" * 5_000_000)'
CONTROL_FLOOD = 'x = "still here"\nprint("\\x01" * 900_000)'


def test_execute_of_a_huge_error_answers_under_4mb_with_the_cut_marked(provider):
    g = glyph()
    # The default channel refuses to receive more than 4 MB, as QNTX's Go client does.
    response = provider.execute(HUGE_ERROR, g)
    assert response.ByteSize() < GRPC_LIMIT
    result = json.loads(response.result)
    assert not response.success and response.error.startswith("ValueError: EEEE")
    assert CUT in response.error and CUT in result["error"]
    assert any(o["output_type"] == "error" and CUT in o["evalue"] for o in result["outputs"])
    assert provider.run("x", g)["result"] == "'still here'"


def test_execute_stream_done_of_a_huge_error_fits(provider):
    # The output events are the live protocol's own bound; the final answer is this one's.
    from kernel_provider.proto import python_pb2

    request = python_pb2.PythonExecuteRequest(code="raise ValueError('E' * 1_500_000)", glyph_id=glyph())
    events = list(provider.python.ExecuteStream(request, timeout=RPC_TIMEOUT))
    done = events[-1].done
    assert done.ByteSize() < GRPC_LIMIT and not done.success and CUT in done.error


@pytest.mark.parametrize(
    "code, what",
    [
        ("for i in range(80000): print(i)", "lines"),
        (CONTROL_FLOOD, "escapes"),
        (HUGE_ERROR, "error"),
    ],
)
def test_execute_job_answers_under_4mb_whatever_the_output(provider, code, what):
    g = glyph()
    payload = json.dumps({"code": code, "glyph_id": g}).encode()
    request = domain_pb2.ExecuteJobRequest(handler_name="python.script", payload=payload)
    response = provider.domain.ExecuteJob(request, timeout=RPC_TIMEOUT)
    assert response.ByteSize() < GRPC_LIMIT
    result = json.loads(response.result)
    assert len(response.log_entries) <= 1000
    if what == "lines":
        assert response.success
        assert result["stdout"] == "".join(f"{i}\n" for i in range(80000))  # nothing lost from the result
        messages = [e.message for e in response.log_entries]
        assert messages[:3] == ["0", "1", "2"] and messages[-1] == "79999"
        assert any("more log lines left out" in m for m in messages)
    elif what == "escapes":
        assert response.success and CUT in result["stdout"]
    else:
        assert not response.success and CUT in response.error
        assert response.log_entries[-1].level == "error" and CUT in response.log_entries[-1].message
    if what != "lines":
        assert provider.run("x", g)["result"] == "'still here'"


@pytest.mark.parametrize("code", [CONTROL_FLOOD, HUGE_ERROR])
def test_http_execute_answers_under_4mb_whatever_the_output(provider, code):
    g = glyph()
    response = provider.domain.HandleHTTP(
        domain_pb2.HTTPRequest(method="POST", path="/execute", body=json.dumps({"code": code, "glyph_id": g}).encode()),
        timeout=RPC_TIMEOUT,
    )
    assert response.status_code == 200 and response.ByteSize() < GRPC_LIMIT
    answer = json.loads(response.body)
    assert CUT in (answer["stdout"] + (answer["error"] or ""))
    assert provider.run("x", g)["result"] == "'still here'"


def test_http_errors_never_echo_a_huge_request(provider):
    for method, path in [("GET", "/" + "p" * 3_000_000), ("PUT", "/execute" + "/" * 3_000_000)]:
        response = provider.domain.HandleHTTP(domain_pb2.HTTPRequest(method=method, path=path), timeout=RPC_TIMEOUT)
        assert response.status_code in (404, 405) and len(response.body) < 2000
    response = provider.domain.HandleHTTP(
        domain_pb2.HTTPRequest(method="DELETE", path="/kernels/" + "g" * 3_000_000), timeout=RPC_TIMEOUT
    )
    assert response.status_code == 404 and len(response.body) < 2000


def test_http_evaluate_of_a_huge_value_is_refused_with_its_size(provider):
    g = glyph()
    assert provider.run("big = 'x' * 10_000_000", g)["success"]
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": "big", "glyph_id": g})
    assert status == 200 and answer["success"] is False and answer["result"] is None
    assert answer["error"].startswith("ValueTooLarge: the value is 100000") and "bytes as JSON" in answer["error"]
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": "big[:1000]", "glyph_id": g})
    assert answer["success"] and answer["result"] == "x" * 1000
    error = {"expr": "(_ for _ in ()).throw(ValueError('E' * 5_000_000))", "glyph_id": g}
    response = provider.domain.HandleHTTP(
        domain_pb2.HTTPRequest(method="POST", path="/evaluate", body=json.dumps(error).encode()), timeout=RPC_TIMEOUT
    )
    answer = json.loads(response.body)
    assert answer["error"].startswith("ValueError: EEE") and CUT in answer["error"] and len(response.body) < 100_000


# ------------------------------------------------------------------ the smaller ones (point 11)


@pytest.mark.parametrize("expr", ["0)), 5, ((0", "0)) if True else ((0", "1\n)), print('injected'), ((0"])
def test_http_evaluate_cannot_break_out_of_its_expression(provider, expr):
    g = glyph()
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": expr, "glyph_id": g})
    assert status == 200 and answer["success"] is False and answer["result"] is None
    assert answer["error"].startswith("SyntaxError"), answer
    assert provider.run("1 + 1", g)["result"] == "2"


def test_http_evaluate_after_a_custom_text_plain_formatter_answers_clearly(provider):
    g = glyph()
    formatter = "get_ipython().display_formatter.formatters['text/plain'].for_type(str, lambda o, p, c: p.text('hi'))"
    assert provider.run(formatter, g)["success"]
    status, _, answer = http(provider, "POST", "/evaluate", {"expr": "[1, 2]", "glyph_id": g})
    assert status == 200 and answer["success"] is False
    assert answer["error"].startswith("EvaluationError:") and "formatter" in answer["error"]
    assert provider.run("len('abc')", g)["result"] == "3"  # the glyph goes on


@pytest.mark.parametrize(
    "code, expected",
    [
        ('print("\\ud800x")', "\ufffdx\n"),
        ('import sys; sys.stderr.write("e\\udfff\\n")', "e\ufffd\n"),
    ],
)
def test_lone_surrogates_from_the_kernel_keep_the_text(provider, code, expected):
    result = provider.run(code, glyph())
    assert result["success"], result["error"]
    assert expected in (result["stdout"] + result["stderr"]), result
    assert "UnicodeEncodeError" not in result["stderr"]


def test_a_lone_surrogate_in_a_display_keeps_the_display(provider):
    result = provider.run('display({"text/plain": "q\\ud800"}, raw=True)', glyph())
    assert result["success"], result["error"]
    assert result["outputs"][0]["data"]["text/plain"] == "q\ufffd"


@pytest.mark.parametrize("glyph_id", [[], 0, False, {}, 1.5])
def test_execute_job_refuses_a_glyph_id_that_is_not_a_string(provider, glyph_id):
    payload = json.dumps({"code": "1", "glyph_id": glyph_id}).encode()
    request = domain_pb2.ExecuteJobRequest(handler_name="python.script", payload=payload)
    response = provider.domain.ExecuteJob(request, timeout=RPC_TIMEOUT)
    assert not response.success and not response.result
    assert "`glyph_id` in the job payload must be a string" in response.error
    one_sentence(response.error)


# Runs cut by Shutdown at different points: while printing, while sleeping, just before the end.
SHUTDOWN_CASES = [
    ("import time\nfor i in range(500): print(i, flush=True); time.sleep(0.01)", 0.5),
    ("import time; time.sleep(5)", 0.05),
    ("import time; time.sleep(0.2)", 0.2),
    ("import time\nfor i in range(500): print(i, flush=True); time.sleep(0.01)", 0.01),
] * 3


def test_shutdown_during_an_execute_answers_clearly(fresh_provider):
    import threading
    import time

    answers = []
    for code, delay in SHUTDOWN_CASES:
        plugin = fresh_provider()
        assert plugin.run("1", "g")["success"]  # the glyph's kernel is up
        answer = {}

        def execute(plugin=plugin, answer=answer, code=code):
            try:
                answer["result"] = plugin.execute(code, "g")
            except grpc.RpcError as exc:
                answer["error"] = (exc.code(), exc.details())

        caller = threading.Thread(target=execute)
        caller.start()
        time.sleep(delay)
        plugin.domain.Shutdown(domain_pb2.Empty(), timeout=RPC_TIMEOUT)
        caller.join()
        assert plugin.process.wait(timeout=60) == 0
        answers.append(answer)
    for answer in answers:
        if "error" in answer:
            code, details = answer["error"]
            assert code == grpc.StatusCode.UNAVAILABLE, answer
            assert details.startswith("the provider shut down while this code was running"), details
        else:
            assert answer["result"].success  # it finished before the Shutdown


# ------------------------------------------------------------------ bounded tables (point 10)


def test_glyph_ids_refused_at_the_ceiling_do_not_stay_in_the_session_table(fresh_provider):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kernel_provider.proto import python_pb2

    plugin = fresh_provider("--max-kernels", "1")
    holder = glyph("holder")
    assert plugin.run("kept = 'yes'", holder)["success"]
    busy = threading.Thread(target=lambda: plugin.execute("import time; time.sleep(120)", holder))
    busy.start()
    try:
        # Every kernel slot is busy: each new glyph id waits out its short deadline and is refused.
        def attack(i: int) -> str:
            request = python_pb2.PythonExecuteRequest(code="1", glyph_id=f"flood-{i}-{uuid.uuid4().hex}")
            try:
                response = plugin.python.Execute(request, timeout=2)
            except grpc.RpcError as exc:
                return exc.code().name
            return "CapacityError" if response.error.startswith("CapacityError") else response.error

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(attack, range(400)))
        assert set(outcomes) <= {"CapacityError", "DEADLINE_EXCEEDED"}, set(outcomes)
        assert "CapacityError" in outcomes
        status, _, listing = http(plugin, "GET", "/kernels")
        assert status == 200 and listing["total"] == 1 and not listing["truncated"]
        assert [k["glyph_id"] for k in listing["kernels"]] == [holder]
        assert json.loads(plugin.health().details["glyph_kernelspecs"]) == {holder: "python3"}
    finally:
        http(plugin, "POST", f"/kernels/{holder}/interrupt")
        busy.join()
    assert plugin.run("kept", holder)["result"] == "'yes'"
    # A new glyph gets the slot once it is free; nothing of the flood is left to evict.
    assert http(plugin, "DELETE", f"/kernels/{holder}")[0] == 200
    assert plugin.run("1 + 1", glyph())["result"] == "2"


def test_get_kernels_is_capped_with_a_marker(tmp_path):
    import asyncio

    from kernel_provider import http as routes
    from kernel_provider.config import Settings
    from kernel_provider.provider import Provider

    async def listing_of(count: int) -> tuple[int, dict]:
        provider = Provider(Settings(connection_dir=tmp_path))
        for i in range(count):
            # Sessions waiting for a kernel: the table holds them without starting any.
            provider.sessions._session(f"{i:05d}" + "g" * 250)
        response = await routes.dispatch(provider, "GET", "/kernels", b"")
        return len(response.body), json.loads(response.body)

    size, answer = asyncio.run(listing_of(6000))
    assert size < GRPC_LIMIT
    assert answer["total"] == 6000 and answer["truncated"] is True
    assert len(answer["kernels"]) == routes.MAX_LISTED_KERNELS
    size, answer = asyncio.run(listing_of(3))
    assert answer["total"] == 3 and answer["truncated"] is False and len(answer["kernels"]) == 3


# ------------------------------------------------------------------ the connection folder is ours (point 8)


def start_refused(connection_dir) -> str:
    """Launch on ``connection_dir`` expecting a refusal: exit status 2, no port line; the stderr."""
    import subprocess

    from conftest import PLUGIN_EXECUTABLE

    process = subprocess.run(
        [str(PLUGIN_EXECUTABLE), "--port", "0", "--pool-size", "0", "--connection-dir", str(connection_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2, (process.returncode, process.stderr)
    assert process.stdout == ""
    return process.stderr


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its content, and each folder's mode."""
    import stat

    found = {}
    for path in sorted([folder, *folder.rglob("*")]):
        mode = stat.S_IMODE(path.lstat().st_mode)
        found[str(path)] = (mode, path.read_bytes() if path.is_file() else None)
    return found


def test_a_folder_of_someone_elses_files_is_refused_and_left_as_it_was(tmp_path):
    shared = tmp_path / "jupyter-runtime"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    # Another program's kernels and notes, as a Jupyter runtime folder holds them.
    other = {"shell_port": 1, "transport": "ipc", "ip": str(tmp_path / "victim" / "sock"), "key": "k"}
    (shared / "kernel-1234abcd.json").write_text(json.dumps(other))
    (shared / "notes.txt").write_text("mine")
    before = snapshot(shared)
    stderr = start_refused(shared)
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("kernel_provider: the connection folder") and "did not write" in line, stderr
    assert snapshot(shared) == before  # not chmodded, nothing deleted, no marker left


def test_an_empty_folder_is_adopted_without_a_chmod(tmp_path):
    import stat

    def permissions() -> int:
        # jupyter_client itself adds the sticky bit (+t, only owners may delete) to the folder of
        # every connection file it writes, ours or not; the access bits are what a chmod 0700 took.
        return stat.S_IMODE(folder.stat().st_mode) & 0o777

    folder = tmp_path / "empty"
    folder.mkdir()
    folder.chmod(0o750)
    plugin = launch(folder, "--pool-size", "0")
    try:
        assert plugin.run("1 + 1", "g")["result"] == "2"
        assert permissions() == 0o750
    finally:
        assert plugin.stop() == 0
    # The next start finds a folder of its own.
    again = launch(folder, "--pool-size", "0")
    assert again.run("2 + 2", "g")["result"] == "4"
    assert again.stop() == 0
    assert permissions() == 0o750


def test_a_planted_connection_file_cannot_make_the_provider_delete_outside_its_folder(tmp_path):
    folder = tmp_path / "conn"
    plugin = launch(folder, "--pool-size", "0")
    assert plugin.run("1", "g")["success"]
    assert plugin.stop() == 0
    # Files outside, named as a stale ipc socket base would be, and a planted stale file pointing at them.
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("data-1", "data-2", "ipc-0123456789ab-5"):
        (victim / name).write_text("precious")
    planted = {"transport": "ipc", "ip": str(victim / "data"), "kernel_provider": {"provider_pid": 999_999_999}}
    (folder / "kernel-planted.json").write_text(json.dumps(planted))
    planted_ours = {**planted, "ip": str(victim / "ipc-0123456789ab")}
    (folder / "kernel-planted2.json").write_text(json.dumps(planted_ours))
    # Someone else's file in our own folder is not ours to delete either.
    (folder / "kernel-foreign.json").write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1"}))
    again = launch(folder, "--pool-size", "0")
    try:
        assert again.run("2", "g")["result"] == "2"
    finally:
        assert again.stop() == 0
    assert sorted(p.name for p in victim.iterdir()) == ["data-1", "data-2", "ipc-0123456789ab-5"]
    assert all(p.read_text() == "precious" for p in victim.iterdir())
    assert (folder / "kernel-foreign.json").exists()
    assert not (folder / "kernel-planted.json").exists()  # labelled as ours and stale: cleaned


def test_a_folder_holding_only_our_files_and_subfolders_is_adopted(tmp_path):
    from kernel_provider.connection_dir import ConnectionDirError, claim_connection_dir

    folder = tmp_path / "conn"
    claim_connection_dir(folder)
    claim_connection_dir(folder / "pool")  # a subfolder we created
    (folder / ".kernel_provider").unlink()  # as an older provider would have left it: no marker
    (folder / "kernel-g.json").write_text(json.dumps({"kernel_provider": {"plugin": "python"}}))
    assert claim_connection_dir(folder) == folder
    (folder / ".kernel_provider").unlink()
    (folder / "stranger").mkdir()  # a subfolder we did not create
    with pytest.raises(ConnectionDirError, match="'stranger', which this provider did not write"):
        claim_connection_dir(folder)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConnectionDirError, match="is not a folder"):
        claim_connection_dir(tmp_path / "link")
