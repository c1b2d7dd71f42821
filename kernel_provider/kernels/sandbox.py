"""Sandboxed kernels: a jupyter_client kernel provisioner that starts a local kernel inside bubblewrap.

Any kernelspec opts in through its metadata, so JupyterLab or any Jupyter client gets the same
sandbox as the provider::

    "metadata": {"kernel_provisioner": {"provisioner_name": "kernel-provider-sandbox",
                                        "config": {"network": "none", "memory_limit_mb": 1024}}}

The provider gives every glyph kernel such a kernelspec (see ``SandboxedKernelSpecs``). Inside, a
kernel sees its own processes only, no host network (``network: none``; ``host`` shares it), a
read-only filesystem except its scratch folder (HOME and /tmp, removed with the kernel), and as
root it runs as a uid of its own. Its folder also holds its ipc sockets: nothing else of the
connection folder is visible, so it cannot reach another kernel. bwrap's ``--die-with-parent``
and pid namespace take every process it started with it, however it detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.provisioning import LocalProvisioner
from traitlets import Dict, Integer, List, Unicode, validate

from kernel_provider.config import Settings

log = logging.getLogger(__name__)

PROVISIONER_NAME = "kernel-provider-sandbox"
NETWORKS = ("none", "host")
# A socket path holds at most 107 bytes; ipc sockets are "<folder>/run/ipc-<n>".
MAX_SOCKET_PATH = 107
# Kernels of a root provider each run as a uid from this range that no account uses.
UID_BASE = 1_500_000_000
UID_RANGE = 1 << 24
# /dev/shm is a tmpfs (memory that no rlimit counts): keep it small.
SHM_BYTES = 64 * 1024 * 1024
MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1, where a root provider may write
CGROUP_REMOVE_TRIES = 40
HOME_IN_SANDBOX = "/home/glyph"
MAX_PROCESSES = 1024  # processes and threads of one kernel, where it has a uid of its own


@functools.cache
def sandbox_problem() -> str | None:
    """Why kernels cannot be sandboxed here (one sentence), or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"sandboxing needs Linux namespaces, and this is {sys.platform}."
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian: apt-get install bubblewrap)."
    if os.geteuid() == 0 and (shutil.which("setpriv") is None or shutil.which("prlimit") is None):
        return "util-linux's setpriv and prlimit are needed to drop root in the sandbox and are missing."
    probe = [shutil.which("bwrap"), *_namespace_flags("none"), "--ro-bind", "/", "/", "--proc", "/proc"]
    try:
        done = subprocess.run([*probe, "--", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not run: {exc}."
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"bubblewrap cannot create namespaces here ({reason.rstrip('.')})."
    return None


def _namespace_flags(network: str) -> list[str]:
    flags = ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    flags.append("--unshare-cgroup-try")
    if network == "none":
        flags.append("--unshare-net")
    if os.geteuid() != 0:
        # Unprivileged bwrap needs a user namespace anyway; the kernel may not make another.
        flags += ["--unshare-user", "--disable-userns"]
    return flags


class SandboxedKernelSpecs(KernelSpecManager):
    """Kernelspecs as installed, each naming the sandbox provisioner with ``sandbox_config``.

    A kernelspec that already names a provisioner of its own (a remote one, say) is left as it is.
    """

    sandbox_config = Dict(help="config of the sandbox provisioner: network, memory_limit_mb")

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = super().get_kernel_spec(kernel_name)
        named = (spec.metadata.get("kernel_provisioner") or {}).get("provisioner_name")
        if named in (None, "local-provisioner"):
            provisioner = {"provisioner_name": PROVISIONER_NAME, "config": dict(self.sandbox_config)}
            spec.metadata = {**spec.metadata, "kernel_provisioner": provisioner}
        return spec


def sandboxed_specs(settings: Settings) -> SandboxedKernelSpecs | None:
    """Kernelspecs that sandbox glyph kernels as ``settings`` say, or None when they run unsandboxed."""
    if settings.isolation == "none" or (settings.isolation == "auto" and sandbox_problem() is not None):
        return None
    config = {"network": settings.kernel_network, "memory_limit_mb": settings.kernel_memory_limit or 0}
    return SandboxedKernelSpecs(sandbox_config=config)


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner whose kernel runs inside bubblewrap; see the module's docstring."""

    network = Unicode("none", config=True, help="'none': only a private loopback; 'host': the host's network")
    memory_limit_mb = Integer(0, config=True, help="address space per process, and memory of them all together")
    read_only_paths = List(Unicode(), config=True, help="more host paths the kernel may read")

    folder: Path | None = None
    uid: int | None = None
    cgroup: Path | None = None
    kernel_pid: int | None = None
    _lock_fd: int | None = None
    _env: dict[str, str] = {}  # the kernel's environment, set by pre_launch

    @validate("network")
    def _check_network(self, proposal):
        if proposal["value"] not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {proposal['value']!r}")
        return proposal["value"]

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        problem = sandbox_problem()
        if problem is not None:
            raise RuntimeError(f"cannot start a sandboxed kernel: {problem}")
        manager = self.parent
        self.folder = self._make_folder(Path(manager.connection_file).parent)
        # The kernel's sockets go in its own folder, the only one it and the provider share;
        # TCP could not cross the network namespace.
        manager.transport, manager.ip = "ipc", str(self.folder / "run" / "ipc")
        kwargs = await super().pre_launch(**kwargs)
        connection_copy = self.folder / "connection.json"
        self._write_private(connection_copy, Path(manager.connection_file).read_bytes())
        self._write_ipython_config(self.folder / "home", (kwargs.get("env") or {}).get("IPYTHONDIR"))
        kwargs["env"] = self._env = self._kernel_env(kwargs["cmd"][0], kwargs.get("env") or {})
        kwargs["cmd"] = self._wrap(kwargs["cmd"], Path(manager.connection_file), connection_copy)
        kwargs["cwd"] = str(self.folder)
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        self.kernel_pid = None
        return await super().launch_kernel(cmd, **kwargs)

    async def send_signal(self, signum: int) -> None:
        """SIGKILL takes the whole sandbox; any other signal goes to the kernel's own process.

        jupyter_client signals the launcher's process group, but the launcher is bwrap, which
        dies of a SIGINT (and its reaper runs the kernel in a session of its own).
        """
        if self.process is None:
            return
        if signum != signal.SIGKILL:
            pid = self._find_kernel_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
                return
            if signum == signal.SIGINT:
                return  # no kernel process yet: nothing to interrupt
        self.process.send_signal(signum)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.with_suffix(".lock").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.cgroup is not None:
            # The sandbox's last processes may still be exiting (a cgroup with tasks cannot go).
            for _ in range(CGROUP_REMOVE_TRIES):
                try:
                    self.cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    log.debug("memory cgroup %s not removed yet: %s", self.cgroup, exc)
                    await asyncio.sleep(0.05)
            self.cgroup = None

    # --- the kernel's folder ---------------------------------------------------------------------

    def _make_folder(self, connection_dir: Path) -> Path:
        """``sandbox-<id>`` beside the connection file (or in a short private folder when the socket
        path would be too long), locked by this process so that a later one can tell it is stale."""
        name = f"sandbox-{self.kernel_id.replace('-', '')[:12]}"
        base = connection_dir
        if len(os.fsencode(base / name / "run" / "ipc-99999")) > MAX_SOCKET_PATH:
            base = _short_private_dir()
        _remove_stale_folders(base)
        lock = base / f"{name}.lock"
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = base / name
        shutil.rmtree(folder, ignore_errors=True)  # a restart: the kernel before left its scratch
        folder.mkdir(mode=0o755)
        self.uid = UID_BASE + secrets.randbelow(UID_RANGE) if os.geteuid() == 0 else None
        for part in ("run", "home", "tmp"):
            (folder / part).mkdir(mode=0o700)
            if self.uid is not None:
                os.chown(folder / part, self.uid, self.uid)
        return folder

    def _write_ipython_config(self, home: Path, ipython_dir: str | None) -> None:
        """The kernel's own IPython profile in its HOME (a kernel other than IPython never reads it).

        The profile of an IPYTHONDIR the launcher gives is copied, not mounted: a folder kernels
        share would be a way from one to another. Without one, history is kept in memory: HOME goes
        with the kernel, so a history database there would only cost every start its creation.
        """
        config = "c.HistoryManager.hist_file = ':memory:'\n"
        if ipython_dir:
            with contextlib.suppress(OSError):
                config = (Path(ipython_dir) / "profile_default" / "ipython_kernel_config.py").read_text()
        profile = home / ".ipython" / "profile_default"
        profile.mkdir(parents=True)
        (profile / "ipython_kernel_config.py").write_text(config)
        if self.uid is not None:
            for path in (home / ".ipython", profile, profile / "ipython_kernel_config.py"):
                os.chown(path, self.uid, self.uid)

    def _write_private(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, data)
            if self.uid is not None:
                os.fchown(fd, self.uid, self.uid)
        finally:
            os.close(fd)

    # --- the command -----------------------------------------------------------------------------

    def _wrap(self, cmd: list[str], connection_file: Path, connection_copy: Path) -> list[str]:
        assert self.folder is not None
        mounts = _Mounts()
        # /tmp first: whatever lives under it on the host (a venv, the connection folder) goes on top.
        mounts.bind(str(self.folder / "tmp"), "/tmp")
        mounts.add("--proc", "/proc")
        mounts.add("--dev", "/dev")
        mounts.add("--perms", "1777", "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm")
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                mounts.add("--symlink", os.readlink(top), top)
            elif os.path.isdir(top):
                mounts.bind(top, top, read_only=True)
        mounts.bind("/usr", "/usr", read_only=True)
        mounts.bind("/etc", "/etc", read_only=True)
        pythonpath = self._env.get("PYTHONPATH", "")
        for path in sorted(_interpreter_paths(cmd[0], pythonpath) | set(self.read_only_paths)):
            mounts.bind(path, path, read_only=True)
        mounts.bind(str(self.folder / "home"), HOME_IN_SANDBOX)
        mounts.bind(str(self.folder / "run"), str(self.folder / "run"))
        mounts.bind(str(connection_copy), str(connection_file), read_only=True)
        bwrap = [shutil.which("bwrap") or "bwrap", *_namespace_flags(self.network), *mounts.args]
        # ipykernel quits when its parent is not JPY_PARENT_PID; here its parent is bwrap's pid 1.
        bwrap += ["--remount-ro", "/", "--chdir", HOME_IN_SANDBOX, "--setenv", "JPY_PARENT_PID", "1", "--"]
        limits = []
        limit = self.memory_limit_mb * 1024 * 1024
        if limit:
            limits.append(f"--as={limit}")
        if self.uid is not None:
            # The uid is the kernel's alone, so this bounds its processes and threads (a fork bomb).
            limits.append(f"--nproc={MAX_PROCESSES}")
        inner = ["prlimit", *limits, "--"] if limits else []
        if self.uid is not None:
            inner += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
            inner += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        launcher = [*bwrap, *inner, *cmd]
        self.cgroup = self._memory_cgroup(limit) if limit else None
        if self.cgroup is not None:
            # Join the cgroup before bwrap starts, so that every process of the kernel is in it.
            join = 'echo $$ > "$0" && exec "$@"'
            launcher = ["/bin/sh", "-c", join, str(self.cgroup / "cgroup.procs"), *launcher]
        return launcher

    def _kernel_env(self, program: str, env: dict[str, str]) -> dict[str, str]:
        """A clean environment: nothing of the provider's, only what the kernelspec asks for."""
        kernel_env = {
            "PATH": os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": HOME_IN_SANDBOX,
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
        }
        interpreter_bin = os.path.dirname(program)
        if os.path.isabs(interpreter_bin):
            kernel_env["PATH"] = interpreter_bin + os.pathsep + kernel_env["PATH"]
        if self.memory_limit_mb:
            # glibc reserves 64 MB of address space per thread arena; an address space limit needs few.
            kernel_env["MALLOC_ARENA_MAX"] = "2"
        kernel_env.update({key: env[key] for key in self.kernel_spec.env if key in env})
        return kernel_env

    def _memory_cgroup(self, limit: int) -> Path | None:
        """A cgroup v1 memory group holding the kernel and its children to ``limit`` together, where we may."""
        parent = MEMORY_CGROUP_ROOT / "kernel_provider"
        if os.geteuid() != 0 or not os.access(MEMORY_CGROUP_ROOT, os.W_OK):
            return None
        group = parent / f"kernel-{self.kernel_id}"
        try:
            group.mkdir(parents=True, exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(limit))
            swap = group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        except OSError as exc:
            log.warning(
                "no memory cgroup for kernel %s (%s); its memory is bounded by rlimits only", self.kernel_id, exc
            )
            return None
        return group

    def _find_kernel_pid(self) -> int | None:
        """The host pid of the kernel: the first process under bwrap that is not bwrap."""
        if self.kernel_pid is not None and _parent_of(self.kernel_pid) is not None:
            return self.kernel_pid
        children = _children_by_parent()
        queue = [self.process.pid]
        while queue:
            pid = queue.pop(0)
            for child in children.get(pid, []):
                if _command_name(child) != "bwrap":
                    self.kernel_pid = child
                    return child
                queue.append(child)
        return None


class _Mounts:
    """bwrap mount arguments, creating each parent folder (0755) before the first mount under it."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._made = {"/"}

    def add(self, *args: str) -> None:
        self.args += args

    def bind(self, source: str, destination: str, read_only: bool = False) -> None:
        for parent in reversed(Path(destination).parents):
            if str(parent) not in self._made:
                self.args += ["--perms", "0755", "--dir", str(parent)]
                self._made.add(str(parent))
        self._made.add(destination)
        self.args += ["--ro-bind" if read_only else "--bind", source, destination]


def _interpreter_paths(program: str, pythonpath: str = "") -> set[str]:
    """Host folders a kernel's interpreter needs beyond /usr: its prefix, its venv's base prefix, and
    every folder on its sys.path (a .pth file or an editable install may point anywhere)."""
    paths: set[str] = set()
    for candidate in {Path(program), Path(program).resolve()}:
        if candidate.parent.name == "bin" and candidate.is_absolute():
            prefix = candidate.parent.parent
            paths.add(str(prefix))
            with contextlib.suppress(OSError):  # no venv, or one we may not read
                for line in (prefix / "pyvenv.cfg").read_text().splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() == "home" and value.strip():
                        paths.add(str(Path(value.strip()).parent))
    if Path(program).name.startswith("python"):
        paths |= _python_path(program, pythonpath)
    kept: set[str] = set()
    for path in sorted(p for p in paths if os.access(p, os.R_OK | os.X_OK)):
        # Parents sort first: a folder inside one kept (or inside /usr or /etc) needs no mount of its own.
        if not any(Path(path).is_relative_to(outer) for outer in (*kept, "/usr", "/etc")):
            kept.add(path)
    return kept


@functools.cache
def _python_path(program: str, pythonpath: str) -> frozenset[str]:
    """The folders on ``program``'s sys.path, asked once per interpreter."""
    env = {"PATH": os.defpath, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    try:
        done = subprocess.run(
            [program, "-c", "import sys; print('\\n'.join(sys.path))"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(line for line in done.stdout.splitlines() if line.startswith("/") and os.path.isdir(line))


def _short_private_dir() -> Path:
    base = Path(tempfile.gettempdir()) / f"kernel-provider-{os.geteuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{base} is not a private folder of ours; remove it and try again")
    return base


def _remove_stale_folders(base: Path) -> None:
    """Remove kernel folders whose lock nobody holds: their provider died without cleaning up."""
    for lock in base.glob("sandbox-*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live kernel's
        else:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    return children


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""
