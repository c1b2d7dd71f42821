"""Launch the provider the way QNTX launches a plugin, and talk to it over real gRPC.

QNTX runs `qntx-NAME-plugin --port N [args]`, reads `QNTX_PLUGIN_PORT=<port>`
from the process's stdout, then calls Metadata and Initialize. The helpers here
do exactly that, with real kernels behind the provider; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from jupyter_client import BlockingKernelClient

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

BIN_DIR = Path(sys.executable).parent
PLUGIN_EXECUTABLE = BIN_DIR / "qntx-python-plugin"
LAUNCH_TIMEOUT = 60
RPC_TIMEOUT = 120


@dataclass
class Plugin:
    """A launched plugin process and stubs for its two services."""

    process: subprocess.Popen
    port: int
    connection_dir: Path
    stderr_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.domain = domain_pb2_grpc.DomainPluginServiceStub(self.channel)
        self.python = python_pb2_grpc.PythonServiceStub(self.channel)

    def execute(self, code: str, glyph_id: str = "", upstream: bytes = b"", timeout: float = RPC_TIMEOUT):
        request = python_pb2.PythonExecuteRequest(code=code, glyph_id=glyph_id, upstream_attestation=upstream)
        return self.python.Execute(request, timeout=timeout)

    def run(self, code: str, glyph_id: str = "", **kwargs) -> dict:
        """Execute and return the decoded ExecutionResult, checking it agrees with the response fields."""
        response = self.execute(code, glyph_id, **kwargs)
        result = json.loads(response.result)
        assert result["success"] == response.success
        assert result["stdout"] == response.output
        assert (result["error"] or "") == response.error
        return result

    def initialize(self, **config: str):
        return self.domain.Initialize(domain_pb2.InitializeRequest(config=config), timeout=RPC_TIMEOUT)

    def health(self):
        return self.domain.Health(domain_pb2.Empty(), timeout=RPC_TIMEOUT)

    def kernel_pids(self) -> list[int]:
        return kernel_pids_using(self.connection_dir)

    def stop(self) -> int:
        self.channel.close()
        return terminate(self.process)


def terminate(process: subprocess.Popen) -> int:
    """SIGTERM, as QNTX stops a plugin; SIGKILL only if it does not exit within 30 s. The exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def http(plugin: Plugin, method: str, path: str, body=None) -> tuple[int, dict, dict]:
    """One request through HandleHTTP as QNTX forwards it; (status, headers, decoded JSON body).

    ``body`` is bytes as given, or anything else JSON-encoded. Every answer must be JSON.
    """
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    response = plugin.domain.HandleHTTP(domain_pb2.HTTPRequest(method=method, path=path, body=raw), timeout=120)
    headers = {h.name: list(h.values) for h in response.headers}
    assert headers["Content-Type"][0].startswith("application/json")
    return response.status_code, headers, json.loads(response.body)


@contextmanager
def attached_client(connection_file: Path) -> Iterator[BlockingKernelClient]:
    """A second Jupyter client on a glyph's kernel, as a person attaching from JupyterLab would be."""
    client = BlockingKernelClient(connection_file=str(connection_file))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        yield client
    finally:
        client.stop_channels()


def kernel_pids_using(connection_dir: Path) -> list[int]:
    """Processes whose command line names a connection file in ``connection_dir``: our kernels.

    The bubblewrap processes around a sandboxed kernel name it too; they are not kernels.
    """
    pids = []
    marker = str(connection_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            command = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if marker in cmdline and "-f" in cmdline and command != "bwrap":
            pids.append(int(entry.name))
    return pids


def launch(
    connection_dir: Path,
    *args: str,
    executable: Path = PLUGIN_EXECUTABLE,
    port: int = 0,
    initialize: bool = True,
    env: dict[str, str] | None = None,
) -> Plugin:
    if "--isolation" not in args:
        # Most tests hand files to a glyph through tmp_path, which a sandboxed kernel cannot see;
        # the sandbox has tests of its own (test_sandbox.py, test_inspect.py ask for it).
        args = ("--isolation", "none", *args)
    command = [str(executable), "--port", str(port), "--connection-dir", str(connection_dir), *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    stderr_lines: list[str] = []
    # Drain stderr in the background so a chatty provider never blocks on a full pipe.
    threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True).start()
    line = process.stdout.readline()
    assert line.startswith("QNTX_PLUGIN_PORT="), f"no port line, got {line!r}; stderr: {''.join(stderr_lines)}"
    plugin = Plugin(process, int(line.strip().split("=", 1)[1]), connection_dir, stderr_lines)
    if initialize:
        plugin.domain.Metadata(domain_pb2.Empty(), timeout=LAUNCH_TIMEOUT)
        plugin.initialize()
    return plugin


def install_copy_of_python3(data_dir: Path, name: str) -> dict[str, str]:
    """A second kernelspec (the same Python under another name) in a private Jupyter data dir.

    Returns the environment that makes Jupyter see it.
    """
    spec_dir = data_dir / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({name})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return {"JUPYTER_PATH": str(data_dir)}


@pytest.fixture(scope="session")
def provider(tmp_path_factory):
    """One provider shared by the tests that only need glyph runs; each test uses its own glyph ids."""
    plugin = launch(tmp_path_factory.mktemp("conn"))
    yield plugin
    assert plugin.stop() == 0


@pytest.fixture
def fresh_provider(tmp_path):
    """A provider of the test's own, for tests that change settings or stop it."""
    plugins: list[Plugin] = []

    def start(*args: str, **kwargs) -> Plugin:
        # No warm pool unless a test asks for one: these tests count a glyph's kernels and
        # connection files, and a pooled kernel warming up beside them would blur the count.
        if "--pool-size" not in args:
            args = ("--pool-size", "0", *args)
        plugin = launch(tmp_path / f"conn{len(plugins)}", *args, **kwargs)
        plugins.append(plugin)
        return plugin

    yield start
    for plugin in plugins:
        plugin.stop()
        leftover = plugin.kernel_pids()
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        assert not leftover, f"kernels outlived their provider: {leftover}"


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium driven by Playwright (its own browser download is not needed)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra brings playwright")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: tests may run as root, where chromium's own sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()
