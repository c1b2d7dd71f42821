"""Where kernels come from: starting them (IPC where possible), a warm pool, and a ceiling.

A KernelSupply hands out started kernels (process up, channels open, ready) and
takes them back. It keeps `pool_size` kernels of the default kernelspec started
ahead of need, never lets more than `max_kernels` exist at once (asking its owner
to make room, then waiting), and labels and cleans the connection folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from kernel_provider.config import ensure_private_dir

log = logging.getLogger(__name__)

KERNEL_START_TIMEOUT = 60.0
# Unix socket paths are limited to 108 bytes; ipc sockets are named "<base>-<port number>".
MAX_IPC_BASE_LENGTH = 100
POOL_RETRY_SECONDS = 5.0


class CapacityError(Exception):
    """Every kernel slot is taken by a busy kernel and none freed up in time."""


@dataclass
class StartedKernel:
    manager: AsyncKernelManager
    client: AsyncKernelClient
    kernel_name: str

    @property
    def connection_file(self) -> Path:
        return Path(self.manager.connection_file)


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
    return {"transport": "tcp", "ip": "127.0.0.1"}


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
    """Remove connection files (and their ipc sockets) left by a provider that is gone.

    A provider killed with SIGKILL cannot clean up; its kernels exit on their own
    (ipykernel watches its parent) but their files stay. Files of a provider that is
    still running (another instance sharing the folder) are left alone.
    """
    removed = 0
    for path in connection_dir.glob("kernel-*.json"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        owner = info.get("kernel_provider", {}).get("provider_pid")
        if isinstance(owner, int) and owner != os.getpid() and _process_alive(owner):
            continue
        if info.get("transport") == "ipc" and info.get("ip"):
            for socket_file in Path(info["ip"]).parent.glob(Path(info["ip"]).name + "-*"):
                socket_file.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        removed += 1
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
    ):
        self.connection_dir = connection_dir
        self.plugin_name = plugin_name
        self.capacity = Capacity(max_kernels, self._make_room_with_pool_first)
        self._make_room_for_sessions = make_room
        self._pool: list[StartedKernel] = []
        self._pool_kernel = ""
        self._pool_size = 0
        self._refill: asyncio.Task | None = None
        self._closing = False
        self._closed = asyncio.Event()

    # --- starting and stopping -------------------------------------------------------------

    async def obtain(self, kernel_name: str, connection_file: Path, timeout: float) -> StartedKernel:
        """A ready kernel of ``kernel_name`` whose connection file is ``connection_file``."""
        kernel = self._take_from_pool(kernel_name)
        if kernel is not None:
            os.replace(kernel.connection_file, connection_file)
            kernel.manager.connection_file = str(connection_file)
            return kernel
        await self.capacity.acquire(timeout)
        try:
            return await self._start(kernel_name, connection_file)
        except BaseException:
            self.capacity.release()
            raise

    async def _start(self, kernel_name: str, connection_file: Path) -> StartedKernel:
        ensure_private_dir(self.connection_dir)
        manager = AsyncKernelManager(
            kernel_name=kernel_name, connection_file=str(connection_file), **transport_options(connection_file)
        )
        await manager.start_kernel()
        label_connection_file(connection_file, plugin=self.plugin_name, provider_pid=os.getpid())
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        except BaseException:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
            raise
        return StartedKernel(manager, client, kernel_name)

    async def give_back(self, kernel: StartedKernel) -> None:
        """Stop a kernel and free its slot."""
        kernel.client.stop_channels()
        try:
            # now=True: a glyph kernel holds nothing a polite shutdown would save, and a
            # hung one must not delay the provider.
            await kernel.manager.shutdown_kernel(now=True)
        except Exception:
            log.exception("stopping kernel %s failed", kernel.connection_file.name)
        finally:
            self.capacity.release()

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
        self._schedule_refill()
        return kernel

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
            path = self.connection_dir / f"kernel-pool-{uuid.uuid4().hex[:12]}.json"
            try:
                kernel = await self._start(kernel_name, path)
            except Exception:
                self.capacity.release()
                log.exception("could not start a %s kernel for the warm pool; retrying later", kernel_name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), POOL_RETRY_SECONDS)
                continue
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
