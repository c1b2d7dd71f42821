"""Kernels on this machine: started by jupyter_client (IPC where possible), a warm pool, a ceiling.

A KernelSupply hands out started kernels (process up, channels open, ready) and
takes them back. It keeps `pool_size` kernels of the default kernelspec started
ahead of need, never lets more than `max_kernels` exist at once (asking its owner
to make room, then waiting), and labels and cleans the connection folder. Pooled
kernels wait in a subfolder of their own: the connection folder is what people
inspect (JupyterLab, `jupyter console --existing`), and it holds glyph kernels only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from jupyter_client import AsyncKernelManager

from kernel_provider import execution
from kernel_provider.connection_dir import (
    claim_connection_dir,
    connection_file_label,
    ipc_base_name,
    ipc_socket_base,
    our_folders,
    read_connection_file,
)
from kernel_provider.kernels.connection import ZMQConnection
from kernel_provider.kernels.sandbox import SandboxedKernelSpecs

log = logging.getLogger(__name__)

KERNEL_START_TIMEOUT = 60.0
# Unix socket paths are limited to 108 bytes; ipc sockets are named "<base>-<port number>".
MAX_IPC_BASE_LENGTH = 100
POOL_RETRY_SECONDS = 5.0
POOL_REFILL_DELAY_SECONDS = 0.5


class CapacityError(Exception):
    """Every kernel slot is taken by a busy kernel and none freed up in time."""


# Settings every kernel gets through its own IPython profile folder (IPYTHONDIR): history
# in memory, so that kernels do not queue on the one history.sqlite they would otherwise
# share (In, Out and %history still work within the session); and no sleep before each
# reply (ipykernel's 0.5 ms _execute_sleep, there for front ends that race their own output).
KERNEL_CONFIG = """\
c.HistoryManager.hist_file = ":memory:"
c.IPythonKernel._execute_sleep = 0.0
"""

# Kernels that are no glyph's wait in subfolders: the connection folder itself is what people inspect.
POOL_FOLDER = "pool"
RUNNER_FOLDER = "runners"


@dataclass
class StartedKernel:
    """A ready kernel on this machine: jupyter_client's manager starts, signals and stops it."""

    manager: AsyncKernelManager
    connection: ZMQConnection
    kernel_name: str
    resumed = False  # a local kernel never outlives its provider

    @property
    def connection_file(self) -> Path:
        return Path(self.manager.connection_file)

    async def interrupt(self) -> None:
        await self.manager.interrupt_kernel()

    async def is_alive(self) -> bool:
        return await self.manager.is_alive()

    def missed_output(self) -> str:
        """Nothing: a local kernel never runs without its provider."""
        return ""


def connection_file_name(glyph_id: str) -> str:
    """A file name for a glyph's connection file that can never leave its folder.

    The readable part keeps only safe characters; the hash keeps two glyph ids
    that differ in other characters apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", glyph_id)[:40]
    digest = hashlib.sha256(glyph_id.encode("utf-8", "replace")).hexdigest()[:12]
    return f"kernel-{readable}-{digest}.json"


def kernel_interpreter(argv: list[str]) -> str:
    """The program jupyter_client really runs for a kernelspec's argv.

    Like KernelManager.format_kernel_cmd, a bare "python", "python3" or "python3.X" of
    our own version means the interpreter jupyter_client itself runs in.
    """
    version = sys.version_info
    if argv[0] in {"python", f"python{version[0]}", f"python{version[0]}.{version[1]}"}:
        return sys.executable
    return argv[0]


def transport_options(connection_file: Path) -> dict[str, str]:
    """IPC (unix sockets next to the connection file, in the 0700 folder) when the path fits, else TCP.

    IPC keeps the kernel's channels out of reach of other users and off the network;
    a folder too deep for a socket path falls back to TCP on loopback.
    """
    # Unique per start: a kernel being stopped unlinks its socket files as it exits, which
    # would take the sockets of a successor bound at the same paths (a glyph's restart).
    base = connection_file.parent / f"ipc-{uuid.uuid4().hex[:12]}"
    if len(os.fsencode(base)) + 6 <= MAX_IPC_BASE_LENGTH:
        return {"transport": "ipc", "ip": str(base)}
    if not _warned_about_tcp:
        _warned_about_tcp.append(True)
        log.warning(
            "the connection folder %s is too deep for unix socket paths (%d bytes at most); kernels use TCP "
            "on 127.0.0.1 instead, which any local user can reach: choose a shorter --connection-dir",
            connection_file.parent,
            MAX_IPC_BASE_LENGTH,
        )
    return {"transport": "tcp", "ip": "127.0.0.1"}


_warned_about_tcp: list[bool] = []  # said once per process


def label_connection_file(path: Path, **labels: str | int) -> None:
    """Add whose kernel this is to a standard connection file, for a person attaching to it.

    jupyter_client rewrites the file while it starts a kernel, so the labels go in
    afterwards; the replace is atomic and keeps the file private (0600).
    """
    info = json.loads(path.read_text())
    info["kernel_provider"] = {**info.get("kernel_provider", {}), **labels}
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=1)
    os.replace(temporary, path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it just has not been reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def clean_stale_files(connection_dir: Path) -> int:
    """Remove our connection files (and their ipc sockets) left by a provider that is gone.

    A provider killed with SIGKILL cannot clean up; its kernels exit on their own
    (ipykernel watches its parent) but their files stay. Only files we wrote are
    removed (connection files with our label, sockets with our names, in this folder
    and the subfolders we claimed), and of those not the ones of a provider that is
    still running (another instance sharing the folder).
    """
    folders = our_folders(connection_dir)
    removed, kept_bases = 0, set()
    for path in (p for folder in folders for p in folder.glob("kernel-*.json")):
        info = read_connection_file(path)
        label = connection_file_label(info)
        owner = label.get("provider_pid") if label is not None else None
        if label is None or (isinstance(owner, int) and owner != os.getpid() and _process_alive(owner)):
            kept_bases.add(ipc_base_name(info or {}))  # not ours, or a live provider's: its sockets stay
            continue
        path.unlink(missing_ok=True)
        removed += 1
    # Sockets are named by us, not found through a path in a file: none outside our folders is touched.
    for path in (p for folder in folders for p in folder.iterdir()):
        base = ipc_socket_base(path)
        if base is not None and base not in kept_bases:
            path.unlink(missing_ok=True)
    return removed


class Capacity:
    """At most ``limit`` kernels at once; past it, ask for room, then wait for it."""

    def __init__(self, limit: int, make_room: Callable[[], Awaitable[bool]]):
        self.limit = limit
        self.used = 0
        self._make_room = make_room
        self._freed = asyncio.Event()

    async def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.used < self.limit:
                self.used += 1
                return
            if await self._make_room():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CapacityError(
                    f"capacity: all {self.limit} kernels are busy and none freed up within {timeout:g} seconds; "
                    "try again later, or raise --max-kernels."
                )
            self._freed.clear()
            # Re-check now and then: a kernel may become idle (evictable) without freeing a slot.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout=min(remaining, 0.5))

    def release(self) -> None:
        self.used = max(self.used - 1, 0)
        self._freed.set()


class KernelSupply:
    """Starts, lends and stops kernels for the glyph sessions."""

    def __init__(
        self,
        connection_dir: Path,
        plugin_name: str,
        max_kernels: int,
        make_room: Callable[[], Awaitable[bool]],
        setup_code: Callable[[], str] | None = None,
    ):
        self.connection_dir = connection_dir
        # Code each kernel runs once it is ready, before anyone claims it (so a pooled
        # kernel is ready to the last line when a glyph takes it).
        self._setup_code = setup_code
        self.pool_dir = connection_dir / POOL_FOLDER
        self.runner_dir = connection_dir / RUNNER_FOLDER
        self.plugin_name = plugin_name
        self.capacity = Capacity(max_kernels, self._make_room_with_pool_first)
        self._make_room_for_sessions = make_room
        self._pool: list[StartedKernel] = []
        self._pool_kernel = ""
        self._pool_size = 0
        self._refill: asyncio.Task | None = None
        # The pool kernel starting right now, and whether a run has claimed it: the first run
        # after start-up takes the kernel already booting rather than booting a second one.
        self._booting: asyncio.Future[StartedKernel | None] | None = None
        self._booting_claimed = False
        self._closing = False
        self._closed = asyncio.Event()
        self._ipython_dir: Path | None = None
        self.started = 0  # kernels started since the supply was made (pool and glyphs)
        self._boots = asyncio.Semaphore(max(1, (os.cpu_count() or 2) // 2))
        # Kernelspecs naming the sandbox provisioner (kernels/sandbox.py); None: kernels run unsandboxed.
        self.sandboxed_specs: SandboxedKernelSpecs | None = None

    # --- starting and stopping -------------------------------------------------------------

    async def obtain(self, kernel_name: str, glyph_id: str | None, timeout: float) -> StartedKernel:
        """A ready kernel of ``kernel_name`` for ``glyph_id`` (None: a run without a glyph)."""
        if glyph_id:
            connection_file = self.connection_dir / connection_file_name(glyph_id)
        else:  # a runner of runs without a glyph: no glyph to inspect, so not in the inspected folder
            connection_file = self.runner_dir / f"kernel-runner-{uuid.uuid4().hex[:12]}.json"
        kernel = self._take_from_pool(kernel_name) or await self._claim_booting(kernel_name)
        if kernel is not None:
            try:
                os.replace(kernel.connection_file, connection_file)
                kernel.manager.connection_file = str(connection_file)
            except OSError as exc:  # someone removed its file: stop it rather than lend it unnamed
                log.warning("pooled kernel %s lost its connection file (%s); stopping it", kernel.connection_file, exc)
                await self.give_back(kernel)
                kernel = None
        if kernel is None:
            await self.capacity.acquire(timeout)
            try:
                kernel = await self._start(kernel_name, connection_file)
            except BaseException:
                self.capacity.release()
                raise
        if glyph_id:
            label_connection_file(connection_file, glyph_id=glyph_id)
        return kernel

    def _kernel_environment(self) -> dict[str, str]:
        if self._ipython_dir is None:
            self._ipython_dir = claim_connection_dir(self.connection_dir / "ipython")
            profile = claim_connection_dir(self._ipython_dir / "profile_default")
            (profile / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)
        # jupyter_client starts from the provider's environment and adds this.
        return {**os.environ, "IPYTHONDIR": str(self._ipython_dir)}

    async def _start(self, kernel_name: str, connection_file: Path) -> StartedKernel:
        # Boots one or two at a time: a burst of new glyphs booting thirty kernels at once would
        # take every core from the glyphs already running (their p99 went past a second), and
        # boots sharing the cores finish no sooner than boots in turn.
        async with self._boots:
            return await self._boot(kernel_name, connection_file)

    async def _boot(self, kernel_name: str, connection_file: Path) -> StartedKernel:
        claim_connection_dir(connection_file.parent)
        # A sandboxed kernel's provisioner puts its ipc sockets in the kernel's own folder.
        if self.sandboxed_specs is not None:
            options = {"kernel_spec_manager": self.sandboxed_specs}
        else:
            options = transport_options(connection_file)
        manager = AsyncKernelManager(kernel_name=kernel_name, connection_file=str(connection_file), **options)
        await manager.start_kernel(env=self._kernel_environment())
        self.started += 1
        label_connection_file(connection_file, plugin=self.plugin_name, provider_pid=os.getpid())
        connection = ZMQConnection(manager.get_connection_info())
        try:
            await execution.wait_for_ready(connection, manager.is_alive, KERNEL_START_TIMEOUT)
            if self._setup_code is not None:
                await execution.run_silently(connection, self._setup_code(), timeout=KERNEL_START_TIMEOUT)
        except BaseException:
            await connection.close()
            await manager.shutdown_kernel(now=True)
            raise
        return StartedKernel(manager, connection, kernel_name)

    async def give_back(self, kernel: StartedKernel) -> None:
        """Stop a kernel and free its slot."""
        await kernel.connection.close()
        try:
            # now=True: a glyph kernel holds nothing a polite shutdown would save, and a
            # hung one must not delay the provider.
            await kernel.manager.shutdown_kernel(now=True)
        except Exception:
            log.exception("stopping kernel %s failed", kernel.connection_file.name)
        finally:
            self.capacity.release()

    async def detach(self, kernel: StartedKernel) -> None:
        """On provider shutdown: a local kernel cannot outlive its provider, so it stops."""
        await self.give_back(kernel)

    def remembered(self) -> dict[str, str]:
        """No kernel of a previous provider run survives on this machine (see clean_stale_files)."""
        return {}

    # --- the warm pool --------------------------------------------------------------------------

    def configure_pool(self, kernel_name: str, size: int) -> None:
        """Keep ``size`` kernels of ``kernel_name`` started ahead of need (0: none)."""
        if kernel_name != self._pool_kernel:
            stale, self._pool = self._pool, []
            for kernel in stale:
                asyncio.ensure_future(self.give_back(kernel))
        self._pool_kernel, self._pool_size = kernel_name, size
        self._schedule_refill()

    def _take_from_pool(self, kernel_name: str) -> StartedKernel | None:
        if kernel_name != self._pool_kernel or not self._pool:
            return None
        kernel = self._pool.pop(0)
        # Refill a moment later: a boot started now would take a core from the very run that
        # claimed this kernel (a new glyph's first run cost 8x a steady one on 2 busy cores).
        asyncio.get_running_loop().call_later(POOL_REFILL_DELAY_SECONDS, self._schedule_refill)
        return kernel

    async def _claim_booting(self, kernel_name: str) -> StartedKernel | None:
        """Wait for the pool kernel that is starting now, if no other run has claimed it."""
        booting = self._booting
        if booting is None or self._booting_claimed or kernel_name != self._pool_kernel:
            return None
        self._booting_claimed = True
        try:
            return await asyncio.shield(booting)
        except asyncio.CancelledError:
            # The run went away; the kernel it claimed goes back to the pool once it is up.
            booting.add_done_callback(self._unclaimed)
            raise
        except Exception:
            return None  # it failed to start: the run starts its own

    def _unclaimed(self, booting: asyncio.Future) -> None:
        kernel = None if booting.cancelled() or booting.exception() else booting.result()
        if kernel is None:
            return
        if self._closing or kernel.kernel_name != self._pool_kernel:
            asyncio.ensure_future(self.give_back(kernel))
        else:
            os.replace(kernel.connection_file, self._pool_file())
            kernel.manager.connection_file = str(self._pool_file())
            self._pool.append(kernel)

    def _pool_file(self) -> Path:
        return self.pool_dir / f"kernel-pool-{uuid.uuid4().hex[:12]}.json"

    def _schedule_refill(self) -> None:
        if self._closing or (self._refill is not None and not self._refill.done()):
            return
        if len(self._pool) < self._pool_size:
            self._refill = asyncio.ensure_future(self._fill_pool())

    async def _fill_pool(self) -> None:
        while not self._closing and len(self._pool) < self._pool_size:
            # The pool only takes a free slot; it never evicts a glyph to warm up a kernel.
            if self.capacity.used >= self.capacity.limit:
                return
            self.capacity.used += 1
            kernel_name = self._pool_kernel
            booting = self._booting = asyncio.get_running_loop().create_future()
            self._booting_claimed = False
            try:
                kernel = await self._start(kernel_name, self._pool_file())
            except Exception:
                booting.set_result(None)
                self.capacity.release()
                log.exception("could not start a %s kernel for the warm pool; retrying later", kernel_name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), POOL_RETRY_SECONDS)
                continue
            finally:
                self._booting = None
            if self._booting_claimed:
                booting.set_result(kernel)  # a run waited for this one; it is the run's now
                continue
            booting.set_result(None)
            if self._closing or kernel_name != self._pool_kernel:
                await self.give_back(kernel)
                return
            self._pool.append(kernel)
            log.debug("warm pool: %d of %d %s kernels ready", len(self._pool), self._pool_size, kernel_name)

    async def _make_room_with_pool_first(self) -> bool:
        """Room for a kernel someone needs now: a pooled kernel goes first, then an idle glyph."""
        if self._pool:
            await self.give_back(self._pool.pop())
            return True
        return await self._make_room_for_sessions()

    @property
    def pooled(self) -> int:
        return len(self._pool)

    async def close(self) -> None:
        self._closing = True
        self._closed.set()
        if self._refill is not None:
            # Not cancelled: a kernel start cut short would leave a process nobody stops.
            await asyncio.gather(self._refill, return_exceptions=True)
        pool, self._pool = self._pool, []
        await asyncio.gather(*(self.give_back(k) for k in pool), return_exceptions=True)
