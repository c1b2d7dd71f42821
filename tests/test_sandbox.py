"""Issue 9's attacks, run as glyph code through a real provider whose kernels are sandboxed.

Each test does what the issue describes an attacker doing from inside a glyph, and asserts that
it fails and that nothing of another glyph (or of the provider) is lost. The provider is launched
as QNTX launches it, with real bubblewrap sandboxes around real ipykernel kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from fake_ats import FakeATSStore

from conftest import PLUGIN_EXECUTABLE, RPC_TIMEOUT, http, launch, terminate
from kernel_provider.kernels.sandbox import sandbox_problem
from kernel_provider.proto import domain_pb2

PROBLEM = sandbox_problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no sandbox on this machine: {PROBLEM}")
SANDBOX = ("--isolation", "sandbox")


def wait_until(condition, timeout: float = 60, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def value(plugin, glyph_id: str, code: str):
    """Run glyph code whose last line prints one JSON value; return that value."""
    result = plugin.run(code, glyph_id)
    assert result["success"], result["error"]
    return json.loads(result["stdout"].strip().splitlines()[-1])


def connection_file_of(plugin, glyph_id: str) -> Path:
    (kernel,) = [k for k in http(plugin, "GET", "/kernels")[2]["kernels"] if k["glyph_id"] == glyph_id]
    return Path(kernel["connection_file"])


def scratch_folder_of(connection_file: Path) -> Path:
    """The kernel's own folder on the host: its ipc sockets are in <folder>/run."""
    return Path(json.loads(connection_file.read_text())["ip"]).parent.parent


def pids_with(marker: str) -> list[int]:
    """Host processes whose command line carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# Glyph code that uses another kernel's connection info, as attack 1 does with the file it found.
TAKE_OVER = """
import json
from jupyter_client import BlockingKernelClient
info = json.loads({info!r})
client = BlockingKernelClient()
client.load_connection_info(info)
client.start_channels()
try:
    client.wait_for_ready(timeout=5)
    client.execute_interactive({code!r}, timeout=5)
    outcome = "took over"
except Exception as exc:
    outcome = type(exc).__name__
finally:
    client.stop_channels()
print(json.dumps(outcome))
"""


@needs_sandbox
def test_attack_1_a_glyph_cannot_find_or_drive_another_glyphs_kernel(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    assert plugin.run("secret = 'b-secret'", "b")["success"]
    assert plugin.run("1", "a")["success"]
    b_file = connection_file_of(plugin, "b")

    # A looks in the folder of its own connection file (its -f argument) for other kernels' files.
    seen = value(
        plugin,
        "a",
        "import sys, os, json\nfolder = os.path.dirname(sys.argv[sys.argv.index('-f') + 1])\n"
        f"try:\n    open({str(b_file)!r}).read(); got = 'read'\nexcept OSError as e:\n    got = type(e).__name__\n"
        "print(json.dumps([sorted(os.listdir(folder)), got]))",
    )
    listing, opened = seen
    assert b_file.name not in listing and not any(n.startswith("kernel-pool") for n in listing), listing
    assert opened == "FileNotFoundError"

    # Even handed B's whole connection file, A cannot reach B's kernel: its sockets are not there.
    outcome = value(plugin, "a", TAKE_OVER.format(info=b_file.read_text(), code="secret = 'overwritten'"))
    assert outcome == "RuntimeError"  # "Kernel didn't respond in 5 seconds"
    assert plugin.run("secret", "b")["result"] == "'b-secret'"


@needs_sandbox
def test_attack_2_a_glyph_cannot_reach_the_providers_grpc_port(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    assert plugin.run("secret = 'b-secret'", "b")["success"]
    code = f"""
import json, os, socket
parent = f"/proc/{{os.getppid()}}/fd"
parent_fds = sorted(os.listdir(parent)) if os.access(parent, os.R_OK) else []
listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]]
try:
    socket.create_connection(("127.0.0.1", {plugin.port}), timeout=10).close()
    reached = "connected"
except OSError as exc:
    reached = type(exc).__name__
print(json.dumps([parent_fds, listening, reached]))
"""
    parent_fds, listening, reached = value(plugin, "a", code)
    port_hex = f"{plugin.port:04X}"
    assert not any(address.endswith(":" + port_hex) for address in listening), listening
    assert reached == "ConnectionRefusedError"
    # So no Execute(glyph_id="b") and no rogue Initialize could be sent: B and the provider are as they were.
    assert plugin.run("secret", "b")["result"] == "'b-secret'"
    assert plugin.health().healthy


@needs_sandbox
def test_attack_3_a_glyph_cannot_plant_code_in_a_warm_pool_kernel(fresh_provider):
    plugin = fresh_provider(*SANDBOX, "--pool-size", "1")
    assert plugin.run("1", "a")["success"]  # A takes the first pooled kernel; the pool refills
    wait_until(lambda: plugin.health().details["pooled_kernels"] == "1", what="the pool to refill")
    (pool_file,) = (plugin.connection_dir / "pool").glob("kernel-pool-*.json")
    plant = "import builtins; builtins.planted = 'by a'"
    outcome = value(plugin, "a", TAKE_OVER.format(info=pool_file.read_text(), code=plant))
    assert outcome == "RuntimeError"
    # The next new glyph gets that pooled kernel, with nothing planted in it.
    assert plugin.run("import builtins\nhasattr(builtins, 'planted')", "c")["result"] == "False"


@needs_sandbox
def test_attack_5_a_glyph_cannot_read_the_providers_memory_environment_or_command_line(fresh_provider):
    plugin = fresh_provider(*SANDBOX, initialize=False)  # QNTX names the store at the first Initialize
    secret = f"auth-{uuid.uuid4().hex}"
    plugin.domain.Initialize(
        domain_pb2.InitializeRequest(ats_store_endpoint="127.0.0.1:1", auth_token=secret), timeout=RPC_TIMEOUT
    )
    # The glyph gets the secret's hash only, so that its own memory does not hold the secret.
    code = f"""
import hashlib, json, os, re
wanted = {len(secret)}, {__import__("hashlib").sha256(secret.encode()).hexdigest()!r}
found, visible, unreadable = [], [], []
def look(where, data):
    for match in re.finditer(rb"auth-[0-9a-f]{{32}}", data):
        if hashlib.sha256(match.group()).hexdigest() == wanted[1]:
            found.append(where)
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    visible.append(int(pid))
    if int(pid) == os.getpid():
        continue
    for name in ("environ", "cmdline"):
        try:
            look(f"{{pid}}/{{name}}", open(f"/proc/{{pid}}/{{name}}", "rb").read())
        except OSError:
            unreadable.append(f"{{pid}}/{{name}}")
    try:
        with open(f"/proc/{{pid}}/maps") as maps, open(f"/proc/{{pid}}/mem", "rb") as mem:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if "r" in line.split()[1] and end - start < 1 << 28:
                    mem.seek(start)
                    look(f"{{pid}}/mem", mem.read(end - start))
    except OSError:
        unreadable.append(f"{{pid}}/mem")
print(json.dumps([found, sorted(visible), os.getpid(), sorted(os.environ)]))
"""
    found, visible, own_pid, environment = value(plugin, "a", code)
    assert found == []
    # Only the sandbox's own processes: its pid 1 (bwrap) and the kernel; no provider among them.
    assert visible == sorted({1, own_pid}), visible
    assert "QNTX" not in " ".join(environment) and not any(k.startswith("PYTEST") for k in environment)


def start_children(plugin, glyph_id: str, marker: str) -> None:
    """Glyph code starting a plain child and a double-forked setsid daemon, as attack 6 does."""
    code = f"""
import os, subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
subprocess.Popen([*sleeper, {marker!r} + "-child"])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [*sleeper, {marker!r} + "-daemon"])
    os._exit(0)
os.wait()
"""
    assert plugin.run(code, glyph_id)["success"]
    wait_until(lambda: len(pids_with(marker)) == 2, what="the glyph's child and daemon to start")


@needs_sandbox
def test_attack_6_every_process_a_glyph_starts_dies_with_delete_and_sigterm(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    deleted, terminated = f"m-{uuid.uuid4().hex}", f"m-{uuid.uuid4().hex}"
    start_children(plugin, "deleted", deleted)
    start_children(plugin, "terminated", terminated)
    assert http(plugin, "DELETE", "/kernels/deleted")[0] == 200
    wait_until(lambda: not pids_with(deleted), timeout=30, what="the deleted glyph's processes to die")
    assert pids_with(terminated), "deleting one glyph touched another"
    assert plugin.stop() == 0  # SIGTERM, as QNTX stops a plugin
    wait_until(lambda: not pids_with(terminated), timeout=30, what="every glyph process to die with SIGTERM")


@needs_sandbox
def test_sigkill_of_the_provider_kills_every_process_of_every_glyph(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    markers = [f"m-{uuid.uuid4().hex}" for _ in range(2)]
    for number, marker in enumerate(markers):
        start_children(plugin, f"g{number}", marker)
    folders = [scratch_folder_of(connection_file_of(plugin, f"g{n}")) for n in range(2)]
    plugin.process.send_signal(signal.SIGKILL)
    plugin.process.wait(timeout=30)
    plugin.channel.close()
    for marker in markers:
        wait_until(lambda m=marker: not pids_with(m), timeout=30, what="every glyph process to die")
    wait_until(lambda: not plugin.kernel_pids(), timeout=30, what="the kernels to die")
    # A killed provider cannot remove the kernels' scratch folders; the next one on that folder does.
    assert all(folder.is_dir() for folder in folders)
    again = launch(plugin.connection_dir, *SANDBOX, "--pool-size", "0")
    try:
        assert again.run("1", "g0")["success"]
        assert not any(folder.exists() for folder in folders)
    finally:
        assert again.stop() == 0


@needs_sandbox
def test_attack_7_shared_memory_cannot_get_past_the_memory_limit(fresh_provider):
    plugin = fresh_provider(*SANDBOX, "--kernel-memory-limit", "256")
    assert plugin.run("kept = 41", "hungry")["success"]
    assert plugin.run("other = 'safe'", "neighbour")["success"]
    touched = plugin.run(
        "import mmap\nshared = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_SHARED)\n"
        "for offset in range(0, 1 << 30, 4096): shared[offset] = 1",
        "hungry",
    )
    assert not touched["success"]
    assert touched["error"].startswith(("OSError", "MemoryError")), touched["error"]
    assert plugin.run("kept + 1", "hungry")["result"] == "42"  # the glyph kept its kernel
    if os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory", os.W_OK):
        # Memory no rlimit counts (a memfd's pages): the kernel's memory cgroup stops it.
        memfd = plugin.run(
            "import os\nfd = os.memfd_create('x')\nfor _ in range(1024): os.write(fd, b'x' * (1 << 20))", "hungry"
        )
        assert not memfd["success"] and memfd["error"].startswith("KernelDied"), memfd["error"]
    assert plugin.run("other", "neighbour")["result"] == "'safe'"
    assert plugin.health().healthy


@needs_sandbox
def test_the_filesystem_is_read_only_except_the_glyphs_scratch_folder(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    code = """
import json, os, tempfile
outcome = {}
for path in ["/usr/planted", "/etc/planted", "/planted", os.path.dirname(os.__file__) + "/planted"]:
    try:
        open(path, "w").close()
        outcome[path] = "written"
    except OSError as exc:
        outcome[path] = type(exc).__name__
for folder in [os.path.expanduser("~"), tempfile.gettempdir()]:
    with open(os.path.join(folder, "mine"), "w") as f:
        f.write("ok")
    outcome[folder] = open(os.path.join(folder, "mine")).read()
print(json.dumps(outcome))
"""
    outcome = value(plugin, "g", code)
    written = {path: result for path, result in outcome.items() if result in ("written", "ok")}
    assert set(written) == {"/home/glyph", "/tmp"}, outcome
    assert all(result in ("OSError", "PermissionError") for path, result in outcome.items() if path not in written)
    folder = scratch_folder_of(connection_file_of(plugin, "g"))
    assert (folder / "home" / "mine").read_text() == "ok"
    assert http(plugin, "DELETE", "/kernels/g")[0] == 200
    assert not folder.exists()


@needs_sandbox
def test_without_network_a_glyph_gets_an_error_at_once_not_a_hang(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    code = """
import json, socket
outcome = []
for address in [("192.0.2.1", 80), ("pypi.org", 443)]:
    try:
        socket.create_connection(address, timeout=60).close()
        outcome.append("connected")
    except OSError as exc:
        outcome.append(type(exc).__name__)
print(json.dumps(outcome))
"""
    outcome = value(plugin, "g", code)
    # Unreachable network and unresolvable name: errors, not the 60 s timeout.
    assert outcome[0] == "OSError" and outcome[1] == "gaierror", outcome


@needs_sandbox
def test_an_interrupt_stops_the_run_and_keeps_the_glyphs_state(fresh_provider):
    plugin = fresh_provider(*SANDBOX, "--execute-timeout", "5")
    assert plugin.run("state = 7", "g")["success"]
    stuck = plugin.run("while True: pass", "g")
    assert not stuck["success"] and "kept its kernel" in stuck["error"], stuck["error"]
    assert plugin.run("state", "g")["result"] == "7"


@needs_sandbox
def test_restart_gives_a_fresh_sandbox(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    assert plugin.run("state = 7\nopen('/tmp/left', 'w').close()", "g")["success"]
    before = scratch_folder_of(connection_file_of(plugin, "g"))
    assert http(plugin, "POST", "/kernels/g/restart")[0] == 200
    after = scratch_folder_of(connection_file_of(plugin, "g"))
    assert after != before and not before.exists()
    state, scratch = value(plugin, "g", "import os, json\nprint(json.dumps(['state' in dir(), os.listdir('/tmp')]))")
    assert state is False and "left" not in scratch


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="only a root provider can give kernels other uids")
def test_a_root_provider_runs_each_kernel_as_its_own_unprivileged_user(fresh_provider):
    plugin = fresh_provider(*SANDBOX)
    code = """
import json, os, resource
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
ids = [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()]
print(json.dumps([*ids, status["CapEff"].strip(), resource.getrlimit(resource.RLIMIT_NPROC)]))
"""
    first, second = value(plugin, "a", code), value(plugin, "b", code)
    for uid, euid, gid, groups, capabilities, processes in (first, second):
        assert uid != 0 and euid != 0 and gid != 0 and groups == []
        assert int(capabilities, 16) == 0
        assert processes == [1024, 1024]  # its uid is its own: this bounds a fork bomb
    assert first[0] != second[0]


def ordinary_user_problem() -> str | None:
    if os.geteuid() != 0:
        return "the tests do not run as root, so they cannot start a provider as another user"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    check = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import kernel_provider.cli",
        ],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return f"user 65534 cannot run this installation ({check.stderr.strip().splitlines()[-1:]})"
    interpreter = os.path.realpath(sys.executable)
    readable = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-r", interpreter]
    )
    if readable.returncode != 0:
        # The sandbox can only bind what its user may read.
        return f"user 65534 may not read the kernel's interpreter {interpreter}, so cannot run it in a sandbox"
    return None


@needs_sandbox
def test_a_provider_run_by_an_ordinary_user_sandboxes_its_kernels(tmp_path):
    problem = ordinary_user_problem()
    if problem is not None:
        pytest.skip(problem)
    # pytest's own folders are root's (0700): the user gets a folder of its own.
    base = Path(tempfile.mkdtemp(prefix="kp-user-"))
    os.chmod(base, 0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    launcher = tmp_path / "as-nobody"
    launcher.write_text(
        f'#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups {PLUGIN_EXECUTABLE} "$@"\n'
    )
    launcher.chmod(0o755)
    plugin = launch(home / "conn", *SANDBOX, "--pool-size", "0", executable=launcher, env={"HOME": str(home)})
    try:
        code = "import json, os\nprint(json.dumps([os.getuid(), len([p for p in os.listdir('/proc') if p.isdigit()])]))"
        uid, processes = value(plugin, "g", code)
        assert uid == 65534 and processes == 2
    finally:
        assert terminate(plugin.process) == 0
        shutil.rmtree(base, ignore_errors=True)


@needs_sandbox
def test_isolation_none_runs_kernels_unsandboxed_on_purpose(fresh_provider):
    plugin = fresh_provider("--isolation", "none")
    visible = value(
        plugin, "g", "import json, os\nprint(json.dumps(len([p for p in os.listdir('/proc') if p.isdigit()])))"
    )
    assert visible > 2
    assert not any("unsandboxed" in line for line in plugin.stderr_lines)


def test_without_bubblewrap_auto_says_so_once_and_sandbox_refuses_to_start(fresh_provider, tmp_path):
    no_bwrap = {"PATH": str(tmp_path / "empty")}
    refused = subprocess.run(
        [str(PLUGIN_EXECUTABLE), "--port", "0", "--connection-dir", str(tmp_path / "c"), *SANDBOX],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **no_bwrap},
    )
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert "--isolation sandbox is impossible here" in line and "bubblewrap" in line

    plugin = fresh_provider("--isolation", "auto", env=no_bwrap)
    assert plugin.run("import os\nlen(os.listdir('/proc')) > 3", "g")["result"] == "True"
    warnings = [line for line in plugin.stderr_lines if "unsandboxed" in line]
    assert len(warnings) == 1 and "bubblewrap is not installed" in warnings[0]


@needs_sandbox
def test_attest_works_inside_the_sandbox(tmp_path):
    store = FakeATSStore(token="t").start()
    plugin = launch(tmp_path / "conn", *SANDBOX, "--pool-size", "0", initialize=False)
    try:
        plugin.domain.Initialize(
            domain_pb2.InitializeRequest(ats_store_endpoint=store.endpoint, auth_token="t"), timeout=RPC_TIMEOUT
        )
        result = plugin.run("attest(['s'], ['p'], ['c'])['actors']", "g")
        assert result["success"], result["error"]
        assert result["result"] == "['glyph:g']"
    finally:
        assert plugin.stop() == 0
        store.stop()


def test_the_sandbox_is_a_kernel_provisioner_any_jupyter_client_can_use():
    from jupyter_client.provisioning import KernelProvisionerFactory

    entries = KernelProvisionerFactory.instance().get_provisioner_entries()
    assert entries.get("kernel-provider-sandbox") == "kernel_provider.kernels.sandbox:SandboxProvisioner"


@needs_sandbox
def test_kernel_network_host_gives_the_glyph_the_hosts_network_on_purpose(fresh_provider):
    plugin = fresh_provider(*SANDBOX, "--kernel-network", "host")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        code = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=30).close()"
        )
        assert plugin.run(code, "g")["success"]
    # Still a sandbox: its own processes only.
    assert plugin.run("import os\nlen([p for p in os.listdir('/proc') if p.isdigit()])", "g")["result"] == "2"


@needs_sandbox
def test_a_connection_folder_too_deep_for_socket_paths_still_gets_ipc_sockets_of_its_own(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    plugin = launch(deep, *SANDBOX, "--pool-size", "0")
    try:
        assert plugin.run("state = 1", "g")["success"]
        info = json.loads(connection_file_of(plugin, "g").read_text())
        assert info["transport"] == "ipc" and len(os.fsencode(info["ip"])) + 6 <= 107
        assert plugin.run("state + 1", "g")["result"] == "2"
        folder = scratch_folder_of(connection_file_of(plugin, "g"))
    finally:
        assert plugin.stop() == 0
    assert not folder.exists()
