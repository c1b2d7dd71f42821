"""Glyph kernels on a real Jupyter Kernel Gateway: the provider launched as QNTX launches it, with --gateway-url.

The gateway runs on 127.0.0.1 with a random port and a token; every kernel is the gateway's
child, none the provider's. The provider is stopped (SIGTERM) and killed (SIGKILL) and started
again with the same state folder: each glyph must find its kernel, and its variables, again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fake_ats import FakeATSStore
from test_stream import read_stdout_until, wait_for_file_code

from conftest import BIN_DIR, RPC_TIMEOUT, http, install_copy_of_python3, launch, terminate
from kernel_provider.proto import domain_pb2, python_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A Jupyter Kernel Gateway process and a few REST calls to check on it."""

    def __init__(self, process: subprocess.Popen, url: str, token: str):
        self.process, self.url, self.token = process, url, token

    def call(self, method: str, path: str):
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def kernel_ids(self) -> set[str]:
        return {k["id"] for k in self.call("GET", "/api/kernels")}

    def delete_all(self) -> None:
        for kernel_id in self.kernel_ids():
            try:
                self.call("DELETE", f"/api/kernels/{kernel_id}")
            except urllib.error.HTTPError:
                pass


def start_kernel_gateway(folder: Path, env: dict[str, str] | None = None) -> Gateway:
    """A Kernel Gateway on 127.0.0.1 with a random port and a token, answering once this returns."""
    executable = BIN_DIR / "jupyter-kernelgateway"
    if not executable.exists():
        pytest.skip("Jupyter Kernel Gateway is not installed (pip install 'kernel_provider[test]')")
    port, token = free_port(), secrets.token_hex(16)
    process = subprocess.Popen(
        [
            str(executable),
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--KernelGatewayApp.auth_token={token}",
            "--JupyterWebsocketPersonality.list_kernels=True",
            # Output is the provider's to bound (--max-output-bytes), not the gateway's to drop.
            "--ZMQChannelsWebsocketConnection.limit_rate=False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(folder), **(env or {})},
    )
    gateway = Gateway(process, f"http://127.0.0.1:{port}", token)
    deadline = time.monotonic() + 60
    while True:
        try:
            gateway.call("GET", "/api/kernelspecs")
            return gateway
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.monotonic() > deadline:
                terminate(process)
                pytest.fail("the Kernel Gateway did not start within 60 seconds")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def kernel_gateway(tmp_path_factory):
    # A second kernelspec on the gateway, for `#| kernel:` directives.
    env = install_copy_of_python3(tmp_path_factory.mktemp("kg-jupyter"), "python3-copy")
    gateway = start_kernel_gateway(tmp_path_factory.mktemp("kg-runtime"), env)
    yield gateway
    terminate(gateway.process)


@pytest.fixture
def gateway(kernel_gateway):
    yield kernel_gateway
    kernel_gateway.delete_all()  # what a test left running does not blur the next test's counts


@pytest.fixture
def start_provider(gateway, tmp_path):
    """Launch providers on the gateway, all sharing one state folder (as restarts of one provider)."""
    plugins = []
    state_dir = tmp_path / "state"

    def start(*args: str, **kwargs):
        plugin = launch(
            tmp_path / f"conn{len(plugins)}",
            "--gateway-url",
            gateway.url,
            "--gateway-token",
            gateway.token,
            "--state-dir",
            str(state_dir),
            "--pool-size",
            "0",
            *args,
            **kwargs,
        )
        plugins.append(plugin)
        return plugin

    start.state_dir = state_dir
    yield start
    for plugin in plugins:
        plugin.stop()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_each_glyph_keeps_its_own_state_on_its_own_gateway_kernel(start_provider, gateway):
    plugin = start_provider()
    assert plugin.run("x = 1", "a")["success"]
    assert plugin.run("x = 2", "b")["success"]
    assert plugin.run("x += 10; x", "a")["result"] == "11"
    assert plugin.run("x", "b")["result"] == "2"
    assert plugin.run("__glyph_id__", "b")["result"] == "'b'"
    pids = {plugin.run("import os; os.getpid()", g)["result"] for g in ("a", "b")}
    assert len(pids) == 2
    assert len(gateway.kernel_ids()) == 2
    # The kernels are the gateway's: none runs as a child of the provider.
    assert children_of(plugin.process.pid) == []
    assert not [p for p in pids if int(p) in children_of(plugin.process.pid)]


def test_rich_outputs_clear_output_and_display_updates_arrive_as_nbformat(start_provider):
    plugin = start_provider()
    code = (
        "from IPython.display import HTML, display, clear_output\n"
        "print('gone'); clear_output()\n"
        "h = display(HTML('<b>old</b>'), display_id=True)\n"
        "h.update(HTML('<i>new</i>'))\n"
        "print('kept')\n"
        "{'a': 1}"
    )
    result = plugin.run(code, "rich")
    assert result["success"], result["error"]
    kinds = [o["output_type"] for o in result["outputs"]]
    assert kinds == ["display_data", "stream", "execute_result"]
    assert result["outputs"][0]["data"]["text/html"] == "<i>new</i>"
    assert result["stdout"] == "kept\n"
    assert result["result"] == "{'a': 1}"
    failed = plugin.run("1/0", "rich")
    assert not failed["success"] and "ZeroDivisionError" in failed["error"]


def test_a_timeout_interrupts_the_gateway_kernel_and_keeps_its_state(start_provider):
    plugin = start_provider("--execute-timeout", "2")
    plugin.run("kept = 'yes'", "slow")
    result = plugin.run("import time\nprint('started', flush=True)\ntime.sleep(60)", "slow")
    assert not result["success"]
    assert "timed out after 2 seconds" in result["error"] and "kept its kernel and state" in result["error"]
    assert "started" in result["stdout"]
    assert plugin.run("kept", "slow")["result"] == "'yes'"


def test_sigkill_of_the_provider_then_restart_reattaches_every_glyph_with_its_state(start_provider, gateway):
    first = start_provider()
    first.run("import os\nmine = 'alpha'\npid = os.getpid()", "k1")
    first.run("mine = 'beta'", "k2")
    kernels = gateway.kernel_ids()
    assert len(kernels) == 2
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    second = start_provider()
    assert second.run("mine", "k1")["result"] == "'alpha'"
    assert second.run("mine", "k2")["result"] == "'beta'"
    assert second.run("pid == os.getpid()", "k1")["result"] == "True"
    # The same kernels, and no new one: the gateway started nothing for the restart.
    assert gateway.kernel_ids() == kernels
    assert second.run("1", "k1")["stderr"] == ""  # no reset notice: nothing was reset


def test_sigterm_leaves_gateway_kernels_running_and_delete_stops_one(start_provider, gateway):
    first = start_provider()
    first.run("n = 41", "durable")
    first.run("n = 0", "doomed")
    kernels = gateway.kernel_ids()
    assert first.stop() == 0
    assert gateway.kernel_ids() == kernels  # stopping the provider stopped no kernel
    second = start_provider()
    assert second.run("n + 1", "durable")["result"] == "42"
    status, _, _ = http(second, "DELETE", "/kernels/doomed")
    assert status == 200
    assert len(gateway.kernel_ids()) == 1  # DELETE stops the glyph's kernel on the gateway
    fresh = second.run("'n' in dir()", "doomed")
    assert fresh["result"] == "False"
    state = json.loads(next(start_provider.state_dir.glob("gateway-kernels-*.json")).read_text())
    assert set(state["glyphs"]) == {"durable", "doomed"}
    assert os.stat(start_provider.state_dir).st_mode & 0o777 == 0o700
    assert os.stat(next(start_provider.state_dir.glob("gateway-kernels-*.json"))).st_mode & 0o777 == 0o600


def test_a_kernel_deleted_on_the_gateway_gives_a_fresh_kernel_and_says_state_was_lost(start_provider, gateway):
    plugin = start_provider()
    plugin.run("precious = 1", "victim")
    plugin.run("other = 2", "bystander")
    kernels = {k["glyph_id"]: k["kernel_id"] for k in http(plugin, "GET", "/kernels")[2]["kernels"]}
    victim_id = kernels["victim"]
    gateway.call("DELETE", f"/api/kernels/{victim_id}")
    result = plugin.run("'precious' in dir()", "victim")
    assert not result["success"]
    assert "KernelDied" in result["error"] and "variables were lost" in result["error"]
    assert plugin.run("'precious' in dir()", "victim")["result"] == "False"  # a fresh kernel
    assert plugin.run("other", "bystander")["result"] == "2"  # the other glyph never noticed


def test_attest_from_a_gateway_kernel_reaches_the_store_over_the_kernels_own_channels(start_provider):
    store = FakeATSStore(token="t0k").start()
    try:
        # QNTX names the store at the first Initialize; a later one may not move it.
        plugin = start_provider(initialize=False)
        request = domain_pb2.InitializeRequest(ats_store_endpoint=store.endpoint, auth_token="t0k")
        plugin.domain.Initialize(request, timeout=RPC_TIMEOUT)
        result = plugin.run("import json\nprint(json.dumps(attest(['ada'], ['wrote'], ['notes'])))", "att")
        assert result["success"], result["error"]
        created = json.loads(result["stdout"])
        assert created["subjects"] == ["ada"] and created["id"].startswith("AS-")
        assert [a.id for a in store.attestations] == [created["id"]]
        assert "glyph:att" in list(store.attestations[0].actors)
        newest = plugin.run("last(subjects=['ada'])['id']", "att")
        assert newest["result"] == repr(created["id"])
    finally:
        store.stop()


def test_a_gateway_that_is_down_gives_a_clear_error_naming_it_and_the_provider_keeps_serving(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    plugin = launch(tmp_path / "conn", "--gateway-url", url, "--state-dir", str(tmp_path / "state"))
    try:
        for _ in range(2):
            result = plugin.run("1", "g")
            assert not result["success"]
            assert result["error"].startswith("Unavailable: ")
            assert url in result["error"] and "cannot be reached" in result["error"]
        assert plugin.health().healthy
    finally:
        assert plugin.stop() == 0


def test_glyphs_run_concurrently_on_the_gateway_each_with_its_own_state(start_provider, gateway):
    plugin = start_provider()
    glyphs = [f"c{i}" for i in range(4)]

    def work(glyph: str) -> list[str]:
        plugin.run(f"mine = {glyph!r}\nimport time\ntime.sleep(0.5)", glyph)
        return [plugin.run("mine", glyph)["result"] for _ in range(3)]

    with ThreadPoolExecutor(len(glyphs)) as pool:
        answers = dict(zip(glyphs, pool.map(work, glyphs), strict=True))
    assert answers == {g: [repr(g)] * 3 for g in glyphs}
    assert len(gateway.kernel_ids()) == len(glyphs)


def test_gateway_url_comes_from_jupyters_environment_variables(gateway, tmp_path):
    env = {"JUPYTER_GATEWAY_URL": gateway.url, "JUPYTER_GATEWAY_AUTH_TOKEN": gateway.token}
    plugin = launch(tmp_path / "conn", "--state-dir", str(tmp_path / "state"), "--pool-size", "0", env=env)
    try:
        assert plugin.run("7 * 6", "env")["result"] == "42"
        assert len(gateway.kernel_ids()) == 1
    finally:
        plugin.stop()


def test_initialize_moves_the_provider_onto_a_gateway(gateway, tmp_path):
    plugin = launch(tmp_path / "conn", "--pool-size", "0")
    try:
        assert plugin.run("where = 'here'", "mover")["success"]
        local_kernels = children_of(plugin.process.pid)
        assert local_kernels  # a local kernel is the provider's child
        plugin.initialize(gateway_url=gateway.url, gateway_token=gateway.token, state_dir=str(tmp_path / "state"))
        result = plugin.run("'where' in dir()", "mover")
        assert result["result"] == "False"  # a new kernel, on the gateway
        assert len(gateway.kernel_ids()) == 1
        assert not set(children_of(plugin.process.pid)) & set(local_kernels)  # the local one stopped
    finally:
        plugin.stop()


def test_a_bad_gateway_url_is_refused_before_start(tmp_path):
    process = subprocess.run(
        [str(BIN_DIR / "qntx-python-plugin"), "--gateway-url", "ftp://nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert "--gateway-url must be an http:// or https:// URL" in process.stderr
    assert process.stdout == ""


def test_lab_on_the_gateway_lists_the_glyph_kernels_there(start_provider, gateway, tmp_path):
    plugin = start_provider()
    plugin.run("seen = 'from lab'", "shown")
    glyph_kernel = {k["glyph_id"]: k["kernel_id"] for k in http(plugin, "GET", "/kernels")[2]["kernels"]}["shown"]
    port, home = free_port(), tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "c"), "JUPYTER_RUNTIME_DIR": str(home)}
    env.pop("JUPYTER_TOKEN", None)
    command = [sys.executable, "-m", "kernel_provider", "lab", "--port", str(port), "--no-browser"]
    command += ["--gateway-url", gateway.url, "--gateway-token", gateway.token]
    lab = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=home)
    try:
        line = lab.stdout.readline()
        assert line.startswith("JupyterLab: http://127.0.0.1:"), line
        token = line.rsplit("token=", 1)[1].strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/kernels", headers={"Authorization": f"token {token}"}
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    listed = {k["id"] for k in json.loads(response.read())}
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer"
                time.sleep(0.3)
        assert glyph_kernel in listed
    finally:
        terminate(lab)
    assert plugin.run("seen", "shown")["result"] == "'from lab'"  # stopping JupyterLab left the kernel alone


def test_a_gateway_that_goes_down_mid_session_fails_runs_clearly_and_the_provider_keeps_serving(tmp_path):
    own = start_kernel_gateway(tmp_path / "kg")
    try:
        plugin = launch(
            tmp_path / "conn",
            *("--gateway-url", own.url, "--gateway-token", own.token, "--state-dir", str(tmp_path / "state")),
        )
        try:
            assert plugin.run("x = 1", "g")["success"]
            terminate(own.process)  # the gateway stops its kernels as it goes
            lost = plugin.run("x", "g")
            assert not lost["success"] and "KernelDied" in lost["error"]
            again = plugin.run("x", "g")
            assert again["error"].startswith("Unavailable: ") and own.url in again["error"]
            assert plugin.health().healthy
        finally:
            assert plugin.stop() == 0
    finally:
        terminate(own.process)


def test_idle_gateway_kernels_are_culled_on_the_gateway(start_provider, gateway):
    plugin = start_provider("--idle-timeout", "1")
    plugin.run("kept = 1", "sleepy")
    assert len(gateway.kernel_ids()) == 1
    deadline = time.monotonic() + 30
    while gateway.kernel_ids():
        assert time.monotonic() < deadline, "the idle gateway kernel was not stopped"
        time.sleep(0.2)
    result = plugin.run("'kept' in dir()", "sleepy")
    assert result["result"] == "False"
    assert "without a run" in result["stderr"] and "state was reset" in result["stderr"]


def test_the_kernel_ceiling_evicts_the_least_recently_used_gateway_kernel(start_provider, gateway):
    plugin = start_provider("--max-kernels", "2")
    for glyph in ("a", "b"):
        plugin.run(f"mine = {glyph!r}", glyph)
    plugin.run("mine", "a")
    plugin.run("mine = 'c'", "c")
    assert len(gateway.kernel_ids()) == 2
    assert plugin.run("mine", "a")["result"] == "'a'"
    evicted = plugin.run("'mine' in dir()", "b")
    assert evicted["result"] == "False" and "to make room" in evicted["stderr"]


def test_kernel_directives_pick_the_gateways_kernelspec(start_provider, gateway):
    plugin = start_provider("--kernel", "python3", "--kernel", "python3-copy")
    plugin.run("x = 1", "plain")
    plugin.run("#| kernel: python3-copy\nx = 2", "copied")
    names = sorted(k["name"] for k in gateway.call("GET", "/api/kernels"))
    assert names == ["python3", "python3-copy"]
    unknown = plugin.run("#| kernel: nowhere\n1", "x")
    assert "does not serve the kernelspec 'nowhere'" in unknown["error"]


def test_live_output_arrives_while_a_gateway_kernel_runs_and_output_stays_bounded(start_provider, tmp_path):
    plugin = start_provider("--max-output-bytes", "100000")
    go = tmp_path / "go"  # the kernel runs on this machine (a local gateway), so it sees the file
    request = python_pb2.PythonExecuteRequest(code=wait_for_file_code(go), glyph_id="live")
    events = plugin.python.ExecuteStream(request, timeout=RPC_TIMEOUT)
    first = read_stdout_until(events, "a\n")
    assert "".join(o["text"] for o in first) == "a\n"
    go.touch()  # only now may the code go on: 'a' came while it ran
    done = list(events)[-1].done
    assert done.success and done.output == "a\nb\n"
    result = plugin.run("print('x' * 3_000_000)", "live")
    assert "output truncated" in result["stdout"] and len(result["stdout"]) < 200_000


def test_a_garbled_state_file_is_ignored_and_a_state_folder_of_another_user_refused(start_provider, tmp_path):
    # A state file nobody can read is not a reason to stop serving: glyphs start afresh.
    first = start_provider()
    first.run("x = 1", "g")
    assert first.stop() == 0
    next(start_provider.state_dir.glob("gateway-kernels-*.json")).write_text("{not json")
    second = start_provider()
    assert second.run("'x' in dir()", "g")["result"] == "False"
    assert second.run("x = 2; x", "g")["result"] == "2"
    if os.getuid() != 0:
        pytest.skip("only root can give a folder to another user")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    process = subprocess.run(
        [str(BIN_DIR / "qntx-python-plugin"), "--gateway-url", "http://127.0.0.1:1", "--state-dir", str(foreign)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2 and process.stdout == ""
    assert f"the state folder {foreign} belongs to another user" in process.stderr


def test_output_printed_while_the_provider_was_away_is_told_at_the_next_run(start_provider, tmp_path):
    first = start_provider()
    go = tmp_path / "go"
    request = python_pb2.PythonExecuteRequest(code=wait_for_file_code(go), glyph_id="away")
    events = first.python.ExecuteStream(request, timeout=RPC_TIMEOUT)
    read_stdout_until(events, "a\n")  # the code runs, and waits for the file
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    # Give the gateway a moment to see the websocket close and start buffering (ordering, not speed).
    time.sleep(1.0)
    go.touch()  # the code prints 'b' while no provider is attached
    second = start_provider()
    result = second.run("'still here'", "away")
    assert result["result"] == "'still here'"
    assert "while the provider was away, the glyph's code printed:\nb" in result["stderr"]
    assert "printed" not in second.run("1", "away")["stderr"]  # told once


def test_runs_without_a_glyph_use_gateway_kernels_that_stop_with_the_provider(start_provider, gateway):
    plugin = start_provider("--watcher-kernels", "1")
    assert plugin.run("21 * 2")["result"] == "42"
    assert plugin.run("'x' in dir()")["result"] == "False"
    assert len(gateway.kernel_ids()) == 1  # the runner, on the gateway
    assert children_of(plugin.process.pid) == []
    assert plugin.stop() == 0
    assert gateway.kernel_ids() == set()  # no glyph to re-attach it to: stopped, not left behind


def test_a_glyphs_notebook_survives_a_restart_with_its_kernel(start_provider):
    """Issue 12: the session history outlives the provider wherever the session does."""
    first = start_provider()
    first.run("x = 6", "noted")
    first.run("x * 7", "noted")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    second = start_provider()
    second.run("x + 1", "noted")
    status, _, notebook = http(second, "GET", "/kernels/noted/notebook")
    assert status == 200
    cells = notebook["cells"]
    assert ["".join(c["source"]) for c in cells] == ["x = 6", "x * 7", "x + 1"]
    assert cells[1]["outputs"][0]["data"]["text/plain"] == "42"
    folder = start_provider.state_dir / "notebooks"
    assert [f.stat().st_mode & 0o777 for f in folder.glob("history-*.json")] == [0o600]
    assert folder.stat().st_mode & 0o777 == 0o700
    # DELETE forgets the record, on disk too.
    assert http(second, "DELETE", "/kernels/noted")[0] == 200
    assert list(folder.glob("history-*.json")) == []
