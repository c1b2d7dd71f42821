"""Glyph sessions: one persistent Jupyter kernel per glyph_id.

A KernelSession owns one kernel (its manager, its client, a lock that makes the
glyph's runs go one at a time in arrival order). The SessionManager maps
glyph ids to sessions, makes throwaway kernels for runs without a glyph, and
stops everything on shutdown. Failures of one kernel (a timeout that will not
interrupt, a crash) are mended here by starting the glyph a fresh kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from kernel_provider import prelude
from kernel_provider.config import Settings, ensure_private_dir
from kernel_provider.execution import InterruptFailed, KernelDied, run_code, run_silently
from kernel_provider.results import ExecutionResult

log = logging.getLogger(__name__)

KERNEL_START_TIMEOUT = 60.0
_PRELUDE_SOURCE = Path(prelude.__file__).read_text()


class ProviderClosing(Exception):
    """The provider is shutting down and takes no new runs."""


@dataclass
class RunRequest:
    code: str
    upstream: Any  # the decoded attestation (a dict) or None
    timeout: float
    output_limit: int
    # Called with each nbformat output as the kernel sends it (live output streams).
    on_output: Callable[[dict[str, Any]], None] | None = None


def connection_file_name(glyph_id: str) -> str:
    """A file name for a glyph's connection file that can never leave its folder.

    The readable part keeps only safe characters; the hash keeps two glyph ids
    that differ in other characters apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", glyph_id)[:40]
    digest = hashlib.sha256(glyph_id.encode("utf-8", "replace")).hexdigest()[:12]
    return f"kernel-{readable}-{digest}.json"


class KernelSession:
    """One glyph's kernel, started on first use and kept alive between runs."""

    def __init__(self, glyph_id: str, kernel_name: str, connection_dir: Path):
        self.glyph_id = glyph_id
        self.kernel_name = kernel_name
        self.connection_dir = connection_dir
        self.lock = asyncio.Lock()
        self.last_activity = time.time()
        self.busy = False
        self.manager: AsyncKernelManager | None = None
        self.client: AsyncKernelClient | None = None
        # A kernel start runs as its own task, shielded from the run that asked for it:
        # a cancelled run must not leave a half-started kernel nobody will stop.
        self._starting: asyncio.Task | None = None
        name = connection_file_name(glyph_id) if glyph_id else f"kernel-once-{uuid.uuid4().hex}.json"
        self.connection_file = connection_dir / name

    async def run(self, request: RunRequest) -> ExecutionResult:
        async with self.lock:
            self.busy = True
            try:
                return await self._run_locked(request)
            finally:
                self.busy = False
                self.last_activity = time.time()

    async def _run_locked(self, request: RunRequest) -> ExecutionResult:
        started = time.perf_counter()
        if self.manager is None:
            try:
                await self._start_shielded()
            except Exception as exc:
                log.exception("could not start kernel %s for glyph %r", self.kernel_name, self.glyph_id)
                return ExecutionResult.failed(
                    f"KernelStartError: could not start a {self.kernel_name!r} kernel: {exc}",
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
        assert self.manager is not None and self.client is not None
        manager = self.manager

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            outcome = await run_code(
                self.client,
                request.code,
                timeout=request.timeout,
                output_limit=request.output_limit,
                is_alive=manager.is_alive,
                interrupt=manager.interrupt_kernel,
                request_metadata={"upstream": request.upstream},
                on_output=request.on_output,
            )
        except KernelDied as died:
            log.warning("kernel of glyph %r died mid-run; starting a fresh one", self.glyph_id)
            await self._replace_kernel()
            return ExecutionResult.from_outputs(
                died.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure="KernelDied: the kernel died while running this code and was restarted; "
                "the glyph's variables were lost.",
            )
        except InterruptFailed as stuck:
            log.warning("kernel of glyph %r ignored an interrupt; restarting it", self.glyph_id)
            await self._replace_kernel()
            return ExecutionResult.from_outputs(
                stuck.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure=f"TimeoutError: execution timed out after {request.timeout:g} seconds and the "
                "kernel did not respond to an interrupt, so it was restarted; the glyph's state was lost.",
            )

        failure = None
        if outcome.timed_out:
            failure = (
                f"TimeoutError: execution timed out after {request.timeout:g} seconds; the run was "
                "interrupted and the glyph kept its kernel and state."
            )
        return ExecutionResult.from_outputs(
            outcome.outputs,
            execution_count=outcome.execution_count,
            duration_ms=elapsed_ms(),
            failure=failure,
        )

    async def _start(self) -> None:
        ensure_private_dir(self.connection_dir)
        manager = AsyncKernelManager(kernel_name=self.kernel_name, connection_file=str(self.connection_file))
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
            await run_silently(
                client,
                f"{_PRELUDE_SOURCE}\n_kernel_provider_setup({self.glyph_id!r})\ndel _kernel_provider_setup\n",
                timeout=KERNEL_START_TIMEOUT,
            )
        except BaseException:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
            raise
        self.manager, self.client = manager, client
        log.info("started kernel %s for glyph %r", self.kernel_name, self.glyph_id)

    async def _start_shielded(self) -> None:
        self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _replace_kernel(self) -> None:
        await self._stop()
        await self._start_shielded()

    async def stop(self) -> None:
        async with self.lock:
            await self._stop()

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        manager, client = self.manager, self.client
        self.manager = self.client = None
        if client is not None:
            client.stop_channels()
        if manager is not None:
            try:
                # now=True: a glyph kernel holds nothing that a polite shutdown would save,
                # and a hung one must not delay the provider's exit.
                await manager.shutdown_kernel(now=True)
            except Exception:
                log.exception("stopping the kernel of glyph %r failed", self.glyph_id)


class SessionManager:
    """glyph_id -> KernelSession, plus throwaway kernels for runs without a glyph."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.sessions: dict[str, KernelSession] = {}
        self._throwaway: set[KernelSession] = set()
        self._closing = False

    @property
    def connection_dir(self) -> Path:
        return self.settings.resolved_connection_dir()

    async def execute(self, glyph_id: str, request: RunRequest) -> ExecutionResult:
        if self._closing:
            raise ProviderClosing("the provider is shutting down")
        if not glyph_id:
            return await self._execute_once(request)
        session = self.sessions.get(glyph_id)
        if session is None:
            session = KernelSession(glyph_id, self.settings.kernel, self.connection_dir)
            self.sessions[glyph_id] = session
        return await session.run(request)

    async def _execute_once(self, request: RunRequest) -> ExecutionResult:
        """QNTX's watcher actions send no glyph: they get a kernel for this one run."""
        session = KernelSession("", self.settings.kernel, self.connection_dir)
        self._throwaway.add(session)
        try:
            return await session.run(request)
        finally:
            self._throwaway.discard(session)
            await session.stop()

    async def reconfigure(self, settings: Settings) -> None:
        """Take new settings; kernels of a kernelspec no longer served are stopped."""
        old_kernel = self.settings.kernel
        self.settings = settings
        if settings.kernel != old_kernel:
            sessions, self.sessions = list(self.sessions.values()), {}
            await asyncio.gather(*(s.stop() for s in sessions))

    def counts(self) -> tuple[int, int]:
        """(live kernels, busy kernels)."""
        live = [s for s in [*self.sessions.values(), *self._throwaway] if s.manager is not None]
        return len(live), sum(1 for s in live if s.busy)

    def close(self) -> None:
        """Refuse new runs from now on; the ones under way go on."""
        self._closing = True

    async def shutdown(self) -> None:
        """Stop every kernel; refuse new runs from now on."""
        self.close()
        sessions = [*self.sessions.values(), *self._throwaway]
        self.sessions.clear()
        # Stop without waiting for each glyph's lock: a run in progress is cut short.
        await asyncio.gather(*(s._stop() for s in sessions), return_exceptions=True)
