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
import json
import logging
import os
import queue
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from kernel_provider import prelude
from kernel_provider.config import Settings, ensure_private_dir
from kernel_provider.execution import (
    INTERRUPT_GRACE_SECONDS,
    InterruptFailed,
    KernelDied,
    run_code,
    run_silently,
)
from kernel_provider.results import ExecutionResult

if TYPE_CHECKING:
    from kernel_provider.attestations import CallbackServer

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
    # A silent run leaves no trace in the kernel's history (used to evaluate expressions).
    silent: bool = False
    user_expressions: dict[str, str] | None = None


_KERNEL_DIRECTIVE = re.compile(r"#\|\s*kernel:\s*(?P<name>\S+)\s*")


def requested_kernel(code: str) -> str | None:
    """The kernelspec a glyph asks for on its first line, `#| kernel: NAME` (Quarto's cell-option style)."""
    first_line = code.lstrip().split("\n", 1)[0].strip()
    match = _KERNEL_DIRECTIVE.fullmatch(first_line)
    return match.group("name") if match else None


def connection_file_name(glyph_id: str) -> str:
    """A file name for a glyph's connection file that can never leave its folder.

    The readable part keeps only safe characters; the hash keeps two glyph ids
    that differ in other characters apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", glyph_id)[:40]
    digest = hashlib.sha256(glyph_id.encode("utf-8", "replace")).hexdigest()[:12]
    return f"kernel-{readable}-{digest}.json"


def label_connection_file(path: Path, **labels: str) -> None:
    """Add whose kernel this is to a standard connection file, for a person attaching to it.

    jupyter_client rewrites the file while it starts a kernel, so the labels go in
    afterwards; the replace is atomic and keeps the file private (0600).
    """
    info = json.loads(path.read_text())
    info["kernel_provider"] = labels
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=1)
    os.replace(temporary, path)


class KernelSession:
    """One glyph's kernel, started on first use and kept alive between runs."""

    def __init__(
        self,
        glyph_id: str,
        kernel_name: str,
        connection_dir: Path,
        callbacks: CallbackServer | None = None,
        plugin_name: str = "",
    ):
        self.glyph_id = glyph_id
        self.plugin_name = plugin_name
        # Where the kernel's attest() and last() call back; its token names this glyph.
        self.callbacks = callbacks
        self._callback_token: str | None = None
        self.kernel_name = kernel_name
        self.connection_dir = connection_dir
        self.lock = asyncio.Lock()
        self.last_activity = time.time()
        self.busy = False
        self.execution_count = 0
        self.kernel_id: str | None = None
        self.manager: AsyncKernelManager | None = None
        self.client: AsyncKernelClient | None = None
        # A kernel start runs as its own task, shielded from the run that asked for it:
        # a cancelled run must not leave a half-started kernel nobody will stop.
        self._starting: asyncio.Task | None = None
        name = connection_file_name(glyph_id) if glyph_id else f"kernel-once-{uuid.uuid4().hex}.json"
        self.connection_file = connection_dir / name

    async def run(self, request: RunRequest) -> ExecutionResult:
        result, _ = await self.run_with_expressions(request)
        return result

    async def run_with_expressions(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        """Run, and also return the kernel's answers to ``request.user_expressions``."""
        # The run holds the glyph's lock in a task of its own, so a caller that goes away
        # (a cancelled stream or call) cannot release the lock before the kernel is back
        # at rest: cancelling the caller cancels the task, which winds the kernel down.
        task = asyncio.ensure_future(self._run_serialized(request))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _run_serialized(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        async with self.lock:
            self.busy = True
            try:
                return await self._run_locked(request)
            except asyncio.CancelledError:
                # A kernel start goes on without the cancelled run; the lock stays held until
                # it ends, or the glyph's next run would start a second kernel beside it.
                if self._starting is not None and not self._starting.done():
                    await asyncio.gather(self._starting, return_exceptions=True)
                raise
            finally:
                self.busy = False
                self.last_activity = time.time()

    async def _run_locked(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        started = time.perf_counter()
        if self.manager is None:
            try:
                await self._start_shielded()
            except Exception as exc:
                log.exception("could not start kernel %s for glyph %r", self.kernel_name, self.glyph_id)
                failed = ExecutionResult.failed(
                    f"KernelStartError: could not start a {self.kernel_name!r} kernel: {exc}",
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
                return failed, {}
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
                silent=request.silent,
                user_expressions=request.user_expressions,
            )
        except asyncio.CancelledError:
            # run_code sends its request before it first waits: the code is on the kernel.
            await self._interrupt_abandoned_run(manager)
            raise
        except KernelDied as died:
            log.warning("kernel of glyph %r died mid-run; starting a fresh one", self.glyph_id)
            await self._replace_kernel()
            result = ExecutionResult.from_outputs(
                died.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure="KernelDied: the kernel died while running this code and was restarted; "
                "the glyph's variables were lost.",
            )
            return result, {}
        except InterruptFailed as stuck:
            log.warning("kernel of glyph %r ignored an interrupt; restarting it", self.glyph_id)
            await self._replace_kernel()
            result = ExecutionResult.from_outputs(
                stuck.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure=f"TimeoutError: execution timed out after {request.timeout:g} seconds and the "
                "kernel did not respond to an interrupt, so it was restarted; the glyph's state was lost.",
            )
            return result, {}

        failure = None
        if outcome.timed_out:
            failure = (
                f"TimeoutError: execution timed out after {request.timeout:g} seconds; the run was "
                "interrupted and the glyph kept its kernel and state."
            )
        result = ExecutionResult.from_outputs(
            outcome.outputs,
            execution_count=outcome.execution_count,
            duration_ms=elapsed_ms(),
            failure=failure,
        )
        if outcome.execution_count is not None:
            self.execution_count = outcome.execution_count
        return result, outcome.user_expressions

    async def _interrupt_abandoned_run(self, manager: AsyncKernelManager) -> None:
        """Stop the code of a run whose caller went away and wait until the kernel is idle.

        Called with the lock held. A silent empty request queued behind the abandoned
        one is answered only once the kernel is done with it; an interrupt that lands
        before the code started is ignored by the kernel, hence one more each second. A
        kernel not idle within INTERRUPT_GRACE_SECONDS is stopped (the glyph's next run
        starts a fresh one) rather than left running code nobody waits for.
        """
        client = self.client
        if client is None or self.manager is not manager:
            return  # stopped meanwhile (shutdown)
        try:
            await manager.interrupt_kernel()
            drain_id = client.execute("", silent=True, store_history=False, allow_stdin=False)
            deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    reply = await client.get_shell_msg(timeout=min(remaining, 1.0))
                except queue.Empty:
                    if not await manager.is_alive():
                        break
                    await manager.interrupt_kernel()
                    continue
                if reply.get("parent_header", {}).get("msg_id") == drain_id:
                    log.info("interrupted the run of glyph %r: its caller went away", self.glyph_id)
                    return
        except Exception:
            log.exception("interrupting the abandoned run of glyph %r failed", self.glyph_id)
        if self.manager is manager:
            log.warning("kernel of glyph %r did not come back after an interrupt; stopping it", self.glyph_id)
            await self._stop()

    async def _start(self) -> None:
        ensure_private_dir(self.connection_dir)
        manager = AsyncKernelManager(kernel_name=self.kernel_name, connection_file=str(self.connection_file))
        await manager.start_kernel()
        label_connection_file(self.connection_file, plugin=self.plugin_name, glyph_id=self.glyph_id)
        client = manager.client()
        client.start_channels()
        port, token = 0, None
        try:
            if self.callbacks is not None:
                port = await self.callbacks.start()
                token = self.callbacks.register(self.glyph_id)
            await client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
            await run_silently(
                client,
                f"{_PRELUDE_SOURCE}\n_kernel_provider_setup({self.glyph_id!r}, {port!r}, {token!r})\n"
                "del _kernel_provider_setup, _attestation_functions\n",
                timeout=KERNEL_START_TIMEOUT,
            )
        except BaseException:
            if self.callbacks is not None:
                self.callbacks.forget(token)
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
            raise
        self.manager, self.client, self._callback_token = manager, client, token
        self.kernel_id = str(uuid.uuid4())
        self.execution_count = 0
        log.info("started kernel %s for glyph %r", self.kernel_name, self.glyph_id)

    async def _start_shielded(self) -> None:
        self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _replace_kernel(self) -> None:
        await self._stop()
        await self._start_shielded()

    def info(self) -> dict[str, Any]:
        """What a person (or GET /kernels) wants to know about this glyph's kernel."""
        if self.manager is None:
            state = "starting" if self._starting is not None and not self._starting.done() else "stopped"
        else:
            state = "busy" if self.busy else "idle"
        return {
            "glyph_id": self.glyph_id,
            "kernel_name": self.kernel_name,
            "kernel_id": self.kernel_id,
            "execution_state": state,
            "last_activity": datetime.fromtimestamp(self.last_activity, tz=UTC).isoformat(),
            "execution_count": self.execution_count,
            "connection_file": str(self.connection_file) if self.manager is not None else None,
        }

    async def interrupt(self) -> None:
        if self.manager is not None:
            await self.manager.interrupt_kernel()

    async def restart(self) -> None:
        """A fresh kernel for this glyph; a run under way is interrupted first, so this need not wait."""
        if self.busy:
            await self.interrupt()
        async with self.lock:
            await self._replace_kernel()
            self.last_activity = time.time()

    async def stop(self) -> None:
        if self.busy:
            await self.interrupt()
        async with self.lock:
            await self._stop()

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        manager, client = self.manager, self.client
        self.manager = self.client = None
        if self.callbacks is not None:
            self.callbacks.forget(self._callback_token)
            self._callback_token = None
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

    def __init__(self, settings: Settings, callbacks: CallbackServer | None = None):
        self.settings = settings
        self.callbacks = callbacks
        self.sessions: dict[str, KernelSession] = {}
        self._throwaway: set[KernelSession] = set()
        self._closing = False

    @property
    def connection_dir(self) -> Path:
        return self.settings.resolved_connection_dir()

    async def execute(self, glyph_id: str, request: RunRequest) -> ExecutionResult:
        if self._closing:
            raise ProviderClosing("the provider is shutting down")
        kernel_name = requested_kernel(request.code) or self.settings.kernel
        served = self.settings.served_kernels
        if kernel_name not in served:
            return ExecutionResult.failed(
                f"KernelspecError: this provider does not serve the kernelspec {kernel_name!r}; "
                f"it serves: {', '.join(served)}."
            )
        if not glyph_id:
            return await self._execute_once(request, kernel_name)
        notice = None
        session = self.sessions.get(glyph_id)
        if session is not None and session.kernel_name != kernel_name:
            # The glyph's directive changed: its old kernel cannot run the new environment.
            del self.sessions[glyph_id]
            await session.stop()
            notice = f"glyph moved from kernelspec {session.kernel_name!r} to {kernel_name!r}; its state was reset."
        result = await self._session(glyph_id, kernel_name).run(request)
        if notice:
            result.add_notice(notice)
        return result

    async def evaluate(self, glyph_id: str, expression: str, timeout: float) -> tuple[ExecutionResult, dict]:
        """Evaluate one expression silently (no history entry) and return the kernel's answer bundle."""
        if self._closing:
            raise ProviderClosing("the provider is shutting down")
        request = RunRequest(
            code="",
            upstream=None,
            timeout=timeout,
            output_limit=self.settings.max_output_bytes,
            silent=True,
            user_expressions={"value": expression},
        )
        session = self._session(glyph_id) if glyph_id else self._new_session("", self.settings.kernel)
        try:
            result, answers = await session.run_with_expressions(request)
        finally:
            if not glyph_id:
                await session.stop()
        return result, answers.get("value", {})

    def _new_session(self, glyph_id: str, kernel_name: str) -> KernelSession:
        return KernelSession(glyph_id, kernel_name, self.connection_dir, self.callbacks, plugin_name=self.settings.name)

    def _session(self, glyph_id: str, kernel_name: str | None = None) -> KernelSession:
        session = self.sessions.get(glyph_id)
        if session is None:
            kernel_name = kernel_name or self.settings.kernel
            session = self._new_session(glyph_id, kernel_name)
            self.sessions[glyph_id] = session
        return session

    async def remove(self, glyph_id: str) -> bool:
        """Stop a glyph's kernel and forget the glyph; False when there was no such glyph."""
        session = self.sessions.pop(glyph_id, None)
        if session is None:
            return False
        await session.stop()
        return True

    async def _execute_once(self, request: RunRequest, kernel_name: str) -> ExecutionResult:
        """QNTX's watcher actions send no glyph: they get a kernel for this one run."""
        session = self._new_session("", kernel_name)
        self._throwaway.add(session)
        try:
            return await session.run(request)
        finally:
            self._throwaway.discard(session)
            await session.stop()

    async def reconfigure(self, settings: Settings) -> None:
        """Take new settings; kernels of a kernelspec no longer served are stopped."""
        self.settings = settings
        # Kernels of a kernelspec no longer served stop now; a glyph whose spec is still
        # served but no longer its choice (the default changed) moves at its next run.
        stale = [g for g, session in self.sessions.items() if session.kernel_name not in settings.served_kernels]
        sessions = [self.sessions.pop(g) for g in stale]
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
        if self.callbacks is not None:
            await self.callbacks.close()
