"""Every shell block of README.md runs, as a newcomer would run it, and succeeds.

The README is read afresh on every run: each ```sh (or bash, shell) block is one test, in the
README's order. A block whose fence is preceded, on the line just before it, by
`<!-- not run by tests: REASON -->` is skipped with that reason.

The blocks run in one scratch world set up once per session, as a person following the README
has it: a copy of this clone (what `git clone` gives, without .git, .venv and build debris), the
package installed from that copy into its own `.venv` (`pip install --no-deps -e`, the
dependencies coming from the test environment's site-packages through a .pth file, so nothing is
downloaded), that venv's `bin` first on PATH (as `pip install .` would put the commands there),
and a HOME, Jupyter folders and a `~/.qntx` of its own. Each block runs with `bash -e -o pipefail`
in the copy's folder, so any failing command fails the test; blocks share what they leave on disk
and the servers they start, not shell variables.

A line starting a long-running server (`./dev serve`, `kernel-provider serve`, `qntx-python-plugin`,
`kernel-provider lab`) is started in the background instead, its ready line awaited (the port line,
JupyterLab's URL), and left running for the blocks after it, as in a second terminal; all are
stopped at the end. As root, the servers and the blocks that name a loopback address run in a
network namespace of their own, so the README's fixed port 9000 is ours even when other providers
run on this machine; the other blocks run in the machine's network, where pip reaches its index.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGUAGES = {"sh", "bash", "shell"}
SKIP_MARKER = re.compile(r"<!-- not run by tests: (?P<reason>.+?) -->")
# (start of a command line, start of the stdout line that says it is ready)
SERVERS = [
    ("./dev serve", "QNTX_PLUGIN_PORT="),
    ("kernel-provider serve", "QNTX_PLUGIN_PORT="),
    ("qntx-python-plugin", "QNTX_PLUGIN_PORT="),
    ("kernel-provider lab", "JupyterLab: http://"),
    ("./dev kernel-provider lab", "JupyterLab: http://"),
]
# A block naming one of these talks to a server the README started: it runs in the servers' namespace.
LOOPBACK = re.compile(r"\b(127\.0\.0\.1|localhost):\d+")
SERVER_READY_SECONDS = 300  # a busy machine; what matters is that the line comes
BLOCK_SECONDS = 900  # building an environment runs pip in a fresh venv
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "test-artifacts", ".ruff_cache")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    heading: str
    text: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-") or "top"
        return f"{slug}-line{self.line}"


def shell_blocks(markdown: str) -> list[Block]:
    """The shell code blocks of a Markdown text, with their heading and skip reason."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    heading = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", line)
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            index += 1
            continue
        ticks, language = fence.group(1), fence.group(2).lower()
        end = index + 1
        while end < len(lines) and not lines[end].startswith(ticks):
            end += 1
        if language in SHELL_LANGUAGES:
            marker = SKIP_MARKER.fullmatch(lines[index - 1].strip()) if index > 0 else None
            blocks.append(
                Block(
                    line=index + 1,
                    heading=heading,
                    text="\n".join(lines[index + 1 : end]) + "\n",
                    skip_reason=marker.group("reason") if marker else None,
                )
            )
        index = end + 1
    return blocks


def test_the_block_reader_finds_blocks_and_skip_markers():
    text = (
        "# Top\n```sh\necho one\n```\n## Two\n<!-- not run by tests: needs a GPU -->\n```bash\nnvidia-smi\n```\n"
        "```python\nprint(1)\n```\n```json\n{}\n```\n````sh\necho ```\n````\n"
    )
    found = shell_blocks(text)
    assert [(b.heading, b.text, b.skip_reason) for b in found] == [
        ("Top", "echo one\n", None),
        ("Two", "nvidia-smi\n", "needs a GPU"),
        ("Two", "echo ```\n", None),
    ]


# ---------------------------------------------------------------------------- the scratch world


class World:
    """The scratch clone, HOME and venv, the optional network namespace, and the servers started."""

    def __init__(self, root: Path):
        self.clone = root / "clone"
        self.home = root / "home"
        self.logs = root / "logs"
        shutil.copytree(ROOT, self.clone, ignore=COPY_IGNORE)
        self.home.mkdir()
        self.logs.mkdir()
        self.venv = self.clone / ".venv"
        self._install()
        self.env = self._environment()
        self.namespace = self._network_namespace()
        self.servers: list[tuple[str, subprocess.Popen]] = []

    def _install(self) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        python = self.venv / "bin" / "python"
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # The test environment's packages (jupyter_client, ipykernel, pip, ...) without copying them.
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (Path(site) / "test-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
        install = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
        try:
            import setuptools  # noqa: F401  (present: build with it instead of fetching it)

            install.append("--no-build-isolation")
        except ImportError:
            pass
        subprocess.run([*install, "-e", str(self.clone)], check=True, capture_output=True, timeout=300)
        # What ./dev records after installing: it then uses this venv as it is.
        for extras in ("base", "lab", "test"):
            (self.venv / f".kernel_provider-installed-{extras}").touch()

    def _environment(self) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "PATH": os.pathsep.join([str(self.venv / "bin"), str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "BROWSER": "true",  # `kernel-provider lab` opens "a browser" that does nothing
            "PYTHONUNBUFFERED": "1",
        }
        # pip's own settings (an index, a proxy) still apply to the environments the README builds.
        env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")})
        # pip's cache stays the user's: the environments built here need not download again each session.
        env.setdefault("PIP_CACHE_DIR", str(Path("~/.cache/pip").expanduser()))
        return env

    def _network_namespace(self) -> subprocess.Popen | None:
        """A process holding a fresh network namespace with loopback up, or None when we cannot have one."""
        if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
            return None
        holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE,
            text=True,
        )
        if holder.stdout.readline().strip() != "up":
            holder.kill()
            holder.wait()
            return None
        return holder

    def command(self, script: str, isolated: bool = True) -> list[str]:
        inner = ["bash", "-e", "-o", "pipefail", "-c", script]
        if self.namespace is None or not isolated:
            return inner
        return ["nsenter", f"--net=/proc/{self.namespace.pid}/ns/net", "--", *inner]

    def run(self, script: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(script, isolated=bool(LOOPBACK.search(script))),
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_SECONDS,
            start_new_session=True,
        )

    def start_server(self, line: str, ready: str) -> str:
        """Start LINE in the background; return its ready line (or fail with what it said)."""
        log = self.logs / f"server{len(self.servers)}.stderr"
        process = subprocess.Popen(
            self.command(f"exec {line}"),
            cwd=self.clone,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            start_new_session=True,
        )
        self.servers.append((line, process))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + SERVER_READY_SECONDS
        while time.monotonic() < deadline:
            found = [text for text in lines if text.startswith(ready)]
            if found:
                return found[0].strip()
            if process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"`{line}` printed no {ready!r} line: stdout {lines!r}, stderr:\n{log.read_text()[-3000:]}")

    def close(self) -> None:
        for _, process in reversed(self.servers):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in self.servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self.namespace is not None:
            self.namespace.kill()
            self.namespace.wait()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    made = World(tmp_path_factory.mktemp("readme"))
    if made.namespace is None:
        with __import__("socket").socket() as probe:
            try:
                probe.bind(("127.0.0.1", 9000))
            except OSError:
                made.close()
                pytest.skip("port 9000, which the README uses, is taken and no network namespace is available")
    yield made
    made.close()


def split_servers(script: str) -> list[tuple[str, str | None]]:
    """The block as (shell text, None) chunks and (server line, ready prefix) entries, in order."""
    parts: list[tuple[str, str | None]] = []
    chunk: list[str] = []
    for line in script.splitlines():
        command = line.strip()
        server = next((ready for start, ready in SERVERS if command.startswith(start + " ") or command == start), None)
        if server is None:
            chunk.append(line)
            continue
        if chunk:
            parts.append(("\n".join(chunk) + "\n", None))
            chunk = []
        parts.append((command, server))
    if chunk:
        parts.append(("\n".join(chunk) + "\n", None))
    return parts


BLOCKS = shell_blocks(README.read_text(encoding="utf-8"))


@pytest.mark.timeout(BLOCK_SECONDS + SERVER_READY_SECONDS)
@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_readme_block_runs(world, block):
    if block.skip_reason is not None:
        pytest.skip(f"README line {block.line}: {block.skip_reason}")
    for text, ready in split_servers(block.text):
        if ready is not None:
            world.start_server(text, ready)
            continue
        if not text.strip():
            continue
        done = world.run(text)
        assert done.returncode == 0, (
            f"README line {block.line} ({block.heading}) failed with exit {done.returncode}:\n{text}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )


def test_the_readme_has_blocks_that_run():
    # A README whose every block is skipped (or a reader that finds none) would pass the test above vacuously.
    assert [b for b in BLOCKS if b.skip_reason is None]
