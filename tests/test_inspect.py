"""Inspecting a glyph's live kernel: attach with jupyter_client, list with `kernel-provider kernels`,
open in a real JupyterLab (`kernel-provider lab`), and see it in a real headless Chromium.

Everything here is real: a launched provider, real ipykernel kernels, a real jupyter_server
and, for the last test, Debian's chromium driven by Playwright.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient
from tornado.websocket import websocket_connect

from conftest import attached_client, http, terminate
from kernel_provider.lab import jupyter_program

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
START_TIMEOUT = 60


def kernels_route(plugin) -> list[dict]:
    status, _, answer = http(plugin, "GET", "/kernels")
    assert status == 200
    return answer["kernels"]


def connection_file_of(plugin, glyph_id: str) -> Path:
    (kernel,) = [k for k in kernels_route(plugin) if k["glyph_id"] == glyph_id]
    return Path(kernel["connection_file"])


def evaluate(client: BlockingKernelClient, expr: str) -> str:
    reply = client.execute_interactive("", user_expressions={"value": expr}, timeout=30)
    value = reply["content"]["user_expressions"]["value"]
    assert value["status"] == "ok", value
    return value["data"]["text/plain"]


def test_a_person_attaches_to_a_glyph_kernel_through_its_connection_file(fresh_provider):
    plugin = fresh_provider("--isolation", "auto")  # sandboxed where possible
    assert plugin.run("seen_by_person = 21", "inspected")["success"]
    path = connection_file_of(plugin, "inspected")
    assert path.parent == plugin.connection_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Owner only (the folder may also carry the sticky bit, which keeps its sockets from being reaped).
    assert plugin.connection_dir.stat().st_mode & 0o777 == 0o700
    info = json.loads(path.read_text())
    assert info["kernel_name"] == "python3" and info["key"]
    assert info["kernel_provider"]["glyph_id"] == "inspected"
    assert info["kernel_provider"]["plugin"] == "python"

    with attached_client(path) as person:
        assert evaluate(person, "seen_by_person") == "21"
        assert evaluate(person, "__glyph_id__") == "'inspected'"
        reply = person.execute_interactive("set_by_person = seen_by_person * 2", timeout=30)
        assert reply["content"]["status"] == "ok"
    assert plugin.run("set_by_person + 1", "inspected")["result"] == "43"


def kernel_provider(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kernel_provider", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_kernels_command_lists_glyphs_with_the_line_to_attach(fresh_provider):
    plugin = fresh_provider("--isolation", "auto")  # sandboxed where possible
    assert plugin.run("1", "listed-a")["success"]
    assert plugin.run("2", "listed b")["success"]
    expected = {"listed-a": connection_file_of(plugin, "listed-a"), "listed b": connection_file_of(plugin, "listed b")}

    by_route = kernel_provider("kernels", "--target", f"127.0.0.1:{plugin.port}")
    by_files = kernel_provider("kernels", "--connection-dir", str(plugin.connection_dir))
    for listing, state in ((by_route, "idle"), (by_files, "unknown")):
        assert listing.returncode == 0, listing.stderr
        header, *rows = listing.stdout.splitlines()
        assert header.split() == ["GLYPH", "KERNELSPEC", "STATE", "ATTACH"]
        assert len(rows) == 2, listing.stdout
        for glyph_id, path in expected.items():
            (row,) = [r for r in rows if r.startswith(glyph_id + " ")]
            assert " python3 " in row and f" {state} " in row
            attach = row.split(f" {state} ", 1)[1].strip()
            # The printed line is a shell command: Jupyter's console on the file, which exists.
            assert attach == f"{jupyter_program()} console --existing {shlex.quote(str(path))}"
            assert Path(attach.split(" --existing ", 1)[1]).is_file()

    as_json = kernel_provider("kernels", "--target", f"127.0.0.1:{plugin.port}", "--json")
    assert as_json.returncode == 0, as_json.stderr
    listed = {k["glyph_id"]: k for k in json.loads(as_json.stdout)}
    assert set(listed) == set(expected)
    assert listed["listed b"]["attach"].endswith(f" console --existing {shlex.quote(str(expected['listed b']))}")
    assert Path(listed["listed b"]["connection_file"]).is_file()

    # A stopped glyph is gone from both listings, and so is its file.
    from kernel_provider.proto import domain_pb2

    plugin.domain.HandleHTTP(domain_pb2.HTTPRequest(method="DELETE", path="/kernels/listed-a"), timeout=60)
    assert not expected["listed-a"].exists()
    after = kernel_provider("kernels", "--connection-dir", str(plugin.connection_dir), "--json")
    assert [k["glyph_id"] for k in json.loads(after.stdout)] == ["listed b"]

    unreachable = kernel_provider("kernels", "--target", "127.0.0.1:1")
    assert unreachable.returncode == 2 and "no provider answered" in unreachable.stderr


def test_the_printed_attach_line_attaches_a_console(fresh_provider):
    plugin = fresh_provider()
    assert plugin.run("seen = 21", "consoled")["success"]
    listing = kernel_provider("kernels", "--target", f"127.0.0.1:{plugin.port}", "--json")
    assert listing.returncode == 0, listing.stderr
    (kernel,) = json.loads(listing.stdout)
    # Run the line as a person pastes it into a shell; end of input leaves the console and keeps the kernel.
    console = subprocess.run(
        kernel["attach"] + " --simple-prompt",
        shell=True,
        input="print('from the console', seen * 2)\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert console.returncode == 0, console.stderr
    assert "from the console 42" in console.stdout
    assert plugin.run("seen + 1", "consoled")["result"] == "22"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """`kernel-provider lab` as a subprocess, isolated from the user's Jupyter config."""

    def __init__(self, connection_dir: Path, home: Path):
        self.port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "HOME": str(home),
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        }
        env.pop("JUPYTER_TOKEN", None)
        command = [sys.executable, "-m", "kernel_provider", "lab", "--connection-dir", str(connection_dir)]
        command += ["--port", str(self.port), "--no-browser"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=home
        )
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        line = self.process.stdout.readline()
        assert line.startswith("JupyterLab: http://127.0.0.1:"), f"got {line!r}; log: {''.join(self.log)}"
        self.url = line.split(" ", 1)[1].strip()
        assert f":{self.port}/lab?token=" in self.url
        self.token = self.url.rsplit("token=", 1)[1]
        assert len(self.token) >= 32
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.get("/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer: " + "".join(self.log)
                time.sleep(0.2)

    def request(self, method: str, path: str) -> tuple[int, object]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        request.add_header("Authorization", f"token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else None
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return body

    def stop(self) -> int:
        return terminate(self.process)


@pytest.fixture
def lab(tmp_path):
    labs: list[Lab] = []

    def start(connection_dir: Path) -> Lab:
        labs.append(Lab(connection_dir, tmp_path / f"lab{len(labs)}"))
        return labs[-1]

    yield start
    for started in labs:
        started.stop()


async def run_over_websocket(lab: Lab, kernel_id: str, code: str) -> dict:
    """Run code as JupyterLab does, over the kernel's websocket; return its outputs and reply."""
    session = uuid.uuid4().hex
    url = f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?session_id={session}&token={lab.token}"
    connection = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    message = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "test",
            "session": session,
            "date": "",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False},
        "channel": "shell",
        "buffers": [],
    }
    await connection.write_message(json.dumps(message))
    got: dict = {"stdout": "", "results": [], "reply": None, "idle": False}
    try:
        while got["reply"] is None or not got["idle"]:
            raw = await asyncio.wait_for(connection.read_message(), timeout=60)
            assert raw is not None, "JupyterLab closed the kernel's websocket"
            reply = json.loads(raw)
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = reply["msg_type"]
            if kind == "stream" and reply["content"]["name"] == "stdout":
                got["stdout"] += reply["content"]["text"]
            elif kind == "execute_result":
                got["results"].append(reply["content"]["data"]["text/plain"])
            elif kind == "execute_reply":
                got["reply"] = reply["content"]
            elif kind == "status" and reply["content"]["execution_state"] == "idle":
                got["idle"] = True
    finally:
        connection.close()
    return got


def test_jupyterlab_shows_runs_and_never_stops_a_glyph_kernel(fresh_provider, lab):
    plugin = fresh_provider("--isolation", "auto")  # sandboxed where possible
    assert plugin.run("from_glyph = 21\nimport time", "lab-glyph")["success"]
    server = lab(plugin.connection_dir)

    kernels = server.get("/api/kernels")
    # The glyph's kernel, and only it (no spare kernel a glyph has not taken yet).
    assert [k["name"] for k in kernels] == ["python3"], kernels
    kernel_id = kernels[0]["id"]

    async def scenario():
        got = await run_over_websocket(server, kernel_id, "print(__glyph_id__)\nfrom_lab = from_glyph * 2\nfrom_glyph")
        assert got["reply"]["status"] == "ok", got
        assert got["stdout"] == "lab-glyph\n" and got["results"] == ["21"]
        # While JupyterLab's code prints, the glyph's own run answers with its outputs only.
        loop = asyncio.get_running_loop()
        person = asyncio.ensure_future(
            run_over_websocket(
                server, kernel_id, "for i in range(20):\n    print('lab', i, flush=True)\n    time.sleep(0.05)"
            )
        )
        await asyncio.sleep(0.3)
        result = await loop.run_in_executor(None, plugin.run, "print('glyph')\nfrom_lab", "lab-glyph")
        assert result["stdout"] == "glyph\n" and result["result"] == "42"
        assert all("lab" not in json.dumps(o) for o in result["outputs"])
        assert (await person)["stdout"].count("lab ") == 20

    asyncio.run(scenario())

    # JupyterLab may not shut down or restart the provider's kernel.
    status, body = server.request("DELETE", f"/api/kernels/{kernel_id}")
    assert status == 403 and "kernel_provider" in body["message"]
    status, body = server.request("POST", f"/api/kernels/{kernel_id}/restart")
    assert status == 403 and "kernel_provider" in body["message"] and "/restart" in body["message"]
    assert [k["id"] for k in server.get("/api/kernels")] == [kernel_id]

    # Stopping JupyterLab leaves the glyph's kernel and its state alone.
    assert server.stop() == 0
    assert connection_file_of(plugin, "lab-glyph").is_file()
    assert plugin.run("from_lab + 1", "lab-glyph")["result"] == "43"


def test_lab_without_jupyterlab_says_how_to_install_it(tmp_path):
    # A stub package named jupyterlab that cannot be found: shadow it with a path entry that hides it.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'jupyterlab':\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    result = kernel_provider(
        "lab", "--connection-dir", str(tmp_path / "conn"), "--no-browser", env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.returncode == 2
    assert "./dev kernel-provider lab" in result.stderr and "pip install '.[lab]'" in result.stderr


# JupyterLab's "Running Terminals and Kernels" panel as text, with the titles of its entries.
RUNNING_PANEL_TEXT = (
    "() => { const p = document.querySelector('#jp-running-sessions:not(.lm-mod-hidden)'); if (!p) return '';"
    " const titles = [...p.querySelectorAll('[title]')].map(e => e.title);"
    " return p.innerText + '\\n' + titles.join('\\n'); }"
)


@pytest.mark.timeout(150)
def test_jupyterlab_in_chromium_lists_the_glyph_kernel(fresh_provider, lab, browser):
    plugin = fresh_provider("--isolation", "auto")  # sandboxed where possible
    assert plugin.run("x = 1", "browser-glyph")["success"]
    server = lab(plugin.connection_dir)
    (kernel,) = server.get("/api/kernels")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(server.url)
        # Open the left sidebar's "Running Terminals and Kernels" panel once JupyterLab shows it.
        page.locator("li[data-id='jp-running-sessions']").click(timeout=90_000)
        page.wait_for_function(
            f"() => {{ const text = ({RUNNING_PANEL_TEXT})();"
            f" return text.includes({json.dumps(kernel['id'])}) || text.includes('Python 3 (ipykernel)'); }}",
            timeout=90_000,
        )
        text = page.evaluate(RUNNING_PANEL_TEXT)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-running-kernels.png"))
        assert "Kernels" in text, text
        assert kernel["id"] in text or "Python 3 (ipykernel)" in text, text
    finally:
        page.close()
    # The page was a JupyterLab client of the kernel; the glyph still answers as before.
    assert plugin.run("x + 1", "browser-glyph")["result"] == "2"
