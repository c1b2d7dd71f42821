"""Glyph sessions: one persistent Jupyter kernel per glyph_id.

A KernelSession owns one kernel (from the kernel layer, with a lock that makes the
glyph's runs go one at a time in arrival order). The SessionManager maps
glyph ids to sessions, makes throwaway kernels for runs without a glyph, and
stops everything on shutdown. Failures of one kernel (a timeout that will not
interrupt, a crash) are mended here by starting the glyph a fresh kernel.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel_provider import prelude
from kernel_provider.config import Settings
from kernel_provider.connection_dir import claim_connection_dir
from kernel_provider.execution import (
    INTERRUPT_GRACE_SECONDS,
    InterruptFailed,
    KernelDied,
    interrupt_until_idle,
    run_code,
    send_silently,
)
from kernel_provider.history import SessionHistory
from kernel_provider.kernels import (
    KERNEL_START_TIMEOUT,
    CapacityError,
    GatewayUnavailable,
    Kernel,
    Supply,
    clean_stale_files,
    make_supply,
)
from kernel_provider.kernels.sandbox import sandboxed_specs
from kernel_provider.results import ExecutionResult
from kernel_provider.watchers import WatcherRunners

if TYPE_CHECKING:
    from kernel_provider.attestations import AttestationService

log = logging.getLogger(__name__)

_PRELUDE_SOURCE = Path(prelude.__file__).read_text()
# The prelude's functions, deleted from the user namespace once set-up has run.
_PRELUDE_NAMES = tuple(node.name for node in ast.parse(_PRELUDE_SOURCE).body if isinstance(node, ast.FunctionDef))


# How long an interrupt waits for a queued or starting run to begin its code.
INTERRUPT_WAIT_SECONDS = 5.0

# How much lower the CPU priority of runner kernels (runs without a glyph) is than a glyph's.
RUNNER_NICENESS = 10

# Reset notices kept for glyphs that have not run since; past this, the oldest are forgotten.
MAX_REMEMBERED_RESETS = 10_000


class ProviderClosing(Exception):
    """The provider is shutting down and takes no new runs."""


@dataclass
class RunRequest:
    code: str
    upstream: Any  # the decoded attestation (a dict) or None
    timeout: float
    output_limit: int
    # Called with each live event (an output, clear_output, update_display_data) as the
    # kernel sends it: see execution.OutputCollector.
    on_event: Callable[[dict[str, Any]], None] | None = None
    # A silent run leaves no trace in the kernel's history (used to evaluate expressions).
    silent: bool = False
    user_expressions: dict[str, str] | None = None


_KERNEL_DIRECTIVE = re.compile(r"#\|\s*kernel:\s*(?P<name>\S+)\s*")


def requested_kernel(code: str) -> str | None:
    """The kernelspec a glyph asks for on its first line, `#| kernel: NAME` (Quarto's cell-option style)."""
    first_line = code.lstrip().split("\n", 1)[0].strip()
    match = _KERNEL_DIRECTIVE.fullmatch(first_line)
    return match.group("name") if match else None


class KernelSession:
    """One glyph's kernel, started on first use and kept alive between runs."""

    def __init__(
        self,
        glyph_id: str,
        kernel_name: str,
        supply: Supply,
        attestations: AttestationService | None = None,
        actor: str | None = None,
    ):
        self.glyph_id = glyph_id
        self.kernel_name = kernel_name
        self.supply = supply
        # Answers the kernel's attest() and last(), as this session's actor: the provider
        # decides who is acting, from whose kernel asked.
        self.attestations = attestations
        self.actor = actor or f"glyph:{glyph_id}"
        self.lock = asyncio.Lock()
        self.callers = 0  # runs asked for and not yet answered, queued ones included
        self.last_activity = time.time()
        self.busy = False
        # Set while the kernel is running this glyph's code: ipykernel ignores an interrupt
        # that arrives before it starts the code, so interrupt() waits for this first.
        self.code_running = asyncio.Event()
        self.execution_count = 0
        self.kernel_id: str | None = None
        # A kernel start runs as its own task, shielded from the run that asked for it:
        # a cancelled run must not leave a half-started kernel nobody will stop.
        self._starting: asyncio.Task | None = None
        self.kernel: Kernel | None = None  # None until started, and once stopped

    @property
    def connection_file(self) -> Path | None:
        return self.kernel.connection_file if self.kernel is not None else None

    async def run(self, request: RunRequest) -> ExecutionResult:
        result, _ = await self.run_with_expressions(request)
        return result

    async def run_with_expressions(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        """Run, and also return the kernel's answers to ``request.user_expressions``."""
        # The run holds the glyph's lock in a task of its own, so a caller that goes away
        # (a cancelled stream or call) cannot release the lock before the kernel is back
        # at rest: cancelling the caller cancels the task, which winds the kernel down.
        task = asyncio.ensure_future(self._run_serialized(request))
        self.callers += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self.callers -= 1

    async def _run_serialized(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        async with self.lock:
            self.busy = True
            self.code_running.clear()
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
                self.code_running.clear()
                self.last_activity = time.time()

    async def _run_locked(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        started = time.perf_counter()
        if self.kernel is None:
            try:
                await self._start_shielded(request.timeout)
            except CapacityError as exc:
                return ExecutionResult.failed(f"CapacityError: {exc}"), {}
            except GatewayUnavailable as exc:
                log.warning("glyph %r has no kernel: %s", self.glyph_id, exc)
                return ExecutionResult.failed(f"Unavailable: {exc}; the next run tries again."), {}
            except Exception as exc:
                log.exception("could not start kernel %s for glyph %r", self.kernel_name, self.glyph_id)
                failed = ExecutionResult.failed(
                    f"KernelStartError: could not start a {self.kernel_name!r} kernel: {exc}",
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
                return failed, {}
        kernel = self.kernel
        assert kernel is not None

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            outcome = await run_code(
                kernel.connection,
                request.code,
                timeout=request.timeout,
                output_limit=request.output_limit,
                is_alive=kernel.is_alive,
                interrupt=kernel.interrupt,
                request_metadata={"upstream": request.upstream, "glyph_id": self.glyph_id},
                on_event=request.on_event,
                on_started=self.code_running.set,
                on_service_call=self._service_call,
                silent=request.silent,
                user_expressions=request.user_expressions,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                # Nobody cancelled us: shutdown closed the connection a wait was on.
                self._raise_if_stopped_under_run(kernel)
            # run_code sends its request before it first waits: the code is on the kernel.
            await self._interrupt_abandoned_run(kernel)
            raise
        except KernelDied as died:
            self._raise_if_stopped_under_run(kernel)
            log.warning("kernel of glyph %r died mid-run; starting a fresh one", self.glyph_id)
            await self._renew_after_failure()
            result = ExecutionResult.from_outputs(
                died.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure="KernelDied: the kernel died while running this code and was restarted; "
                "the glyph's variables were lost.",
            )
            return result, {}
        except InterruptFailed as stuck:
            self._raise_if_stopped_under_run(kernel)
            log.warning("kernel of glyph %r ignored an interrupt; restarting it", self.glyph_id)
            await self._renew_after_failure()
            result = ExecutionResult.from_outputs(
                stuck.outputs,
                execution_count=None,
                duration_ms=elapsed_ms(),
                failure=f"TimeoutError: execution timed out after {request.timeout:g} seconds and the "
                "kernel did not respond to an interrupt, so it was restarted; the glyph's state was lost.",
            )
            return result, {}
        except Exception:
            self._raise_if_stopped_under_run(kernel)
            raise

        missed = kernel.missed_output()
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
        if missed:
            result.add_notice(f"while the provider was away, the glyph's code printed:\n{missed.rstrip()}")
        if outcome.execution_count is not None:
            self.execution_count = outcome.execution_count
        return result, outcome.user_expressions

    def _raise_if_stopped_under_run(self, kernel: Kernel) -> None:
        """A run whose kernel was stopped from under it (shutdown does that) ends as ProviderClosing.

        Its connection is closed then, so the run fails in some way (a closed connection,
        a dead kernel); the caller must hear why, not a bare error, and no fresh kernel
        may be started for a provider on its way out.
        """
        if self.kernel is not kernel:
            raise ProviderClosing("the provider shut down while this code was running")

    async def _service_call(self, request: Any) -> Any:
        if self.attestations is None:
            raise RuntimeError("no attestation service")
        return await self.attestations.answer(self.actor, request)

    async def _interrupt_abandoned_run(self, kernel: Kernel) -> None:
        """Stop the code of a run whose caller went away and wait until the kernel is idle.

        Called with the lock held. A kernel not idle within INTERRUPT_GRACE_SECONDS is
        stopped (the glyph's next run starts a fresh one) rather than left running code
        nobody waits for.
        """
        if self.kernel is not kernel:
            return  # stopped meanwhile (shutdown)
        try:
            if await interrupt_until_idle(
                kernel.connection, kernel.interrupt, kernel.is_alive, INTERRUPT_GRACE_SECONDS
            ):
                log.info("interrupted the run of glyph %r: its caller went away", self.glyph_id)
                return
        except Exception:
            log.exception("interrupting the abandoned run of glyph %r failed", self.glyph_id)
        if self.kernel is kernel:
            log.warning("kernel of glyph %r did not come back after an interrupt; stopping it", self.glyph_id)
            await self._stop()

    async def _start(self, timeout: float = KERNEL_START_TIMEOUT) -> None:
        kernel = await self.supply.obtain(self.kernel_name, self.glyph_id or None, timeout)
        # The prelude ran when the kernel started (KernelSupply's set-up code), and each run
        # tells the kernel its glyph (run metadata). A runner of runs without a glyph (watcher
        # actions, which come in bursts) yields the CPU to glyphs, from before its first run.
        if not self.glyph_id:
            send_silently(kernel.connection, f"__import__('_kernel_provider').lower_priority({RUNNER_NICENESS})")
        self.kernel = kernel
        self.kernel_id = getattr(kernel, "kernel_id", None) or str(uuid.uuid4())
        self.execution_count = 0
        log.info(
            "%s kernel %s for glyph %r", "resumed" if kernel.resumed else "started", self.kernel_name, self.glyph_id
        )

    async def _start_shielded(self, timeout: float = KERNEL_START_TIMEOUT) -> None:
        self._starting = asyncio.ensure_future(self._start(timeout))
        await asyncio.shield(self._starting)

    async def _replace_kernel(self) -> None:
        await self._stop()
        await self._start_shielded()

    async def _renew_after_failure(self) -> None:
        """A fresh kernel for the glyph; when none can start now (a gateway down), its next run tries again."""
        try:
            await self._replace_kernel()
        except Exception as exc:
            log.warning("could not start a fresh kernel for glyph %r: %s", self.glyph_id, exc)

    def info(self) -> dict[str, Any]:
        """What a person (or GET /kernels) wants to know about this glyph's kernel."""
        if self.kernel is None:
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
            "connection_file": str(self.connection_file) if self.connection_file is not None else None,
        }

    async def interrupt(self) -> None:
        if self.busy and not self.code_running.is_set():
            # Queued or starting: wait (briefly) until the code runs, or the signal is lost.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.code_running.wait(), INTERRUPT_WAIT_SECONDS)
        if self.kernel is not None:
            await self.kernel.interrupt()

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

    async def _stop(self, detach: bool = False) -> None:
        """Stop the kernel; ``detach``: let go of it only (provider shutdown), if the backend keeps kernels."""
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        kernel = self.kernel
        self.kernel = None
        if kernel is not None:
            await (self.supply.detach(kernel) if detach else self.supply.give_back(kernel))

    async def resume(self) -> bool:
        """Take over the kernel a previous provider left for this glyph; False when it was gone."""
        async with self.lock:
            if self.kernel is None:
                await self._start_shielded()
            return self.kernel is not None and self.kernel.resumed


class SessionManager:
    """glyph_id -> KernelSession, plus throwaway kernels for runs without a glyph."""

    def __init__(self, settings: Settings, attestations: AttestationService | None = None):
        self.settings = settings
        self.attestations = attestations
        self.sessions: dict[str, KernelSession] = {}
        self._throwaway: set[KernelSession] = set()
        self._closing = False
        self.connection_dir = settings.resolved_connection_dir()
        self.supply = make_supply(settings, self._evict_one, self._kernel_setup)
        # Why a glyph lost its kernel while nobody was asking (culled, evicted): told at its next run.
        self._reset_reasons: dict[str, str] = {}
        self.watchers = WatcherRunners(
            self._new_runner,
            settings.watcher_kernels,
            settings.watcher_queue,
            settings.watcher_mode,
            settings.watcher_share,
        )
        self._retiring: dict[str, asyncio.Future] = {}  # glyph -> its old kernel being stopped
        self._resuming: dict[str, asyncio.Future] = {}  # glyph -> re-attaching its surviving kernel
        self._culler: asyncio.Task | None = None
        # Each glyph's runs, for `GET /kernels/{glyph}/notebook` (see history.py); kept on disk
        # where the sessions themselves survive a restart (kernels on a gateway).
        self.history = SessionHistory(
            folder=settings.resolved_state_dir() / "notebooks" if settings.gateway_url else None
        )

    async def start(self) -> None:
        """Clean what a killed predecessor left, warm the pool, and start culling idle kernels."""
        claim_connection_dir(self.connection_dir, default=self.settings.connection_dir is None)
        for folder in (self.supply.pool_dir, self.supply.runner_dir):
            if folder is not None and folder.is_dir():
                claim_connection_dir(folder)
        # One pass over the folder and its subfolders: a pooled kernel's sockets stay in the
        # pool folder after its connection file moved up to the glyph's name.
        removed = clean_stale_files(self.connection_dir)
        if removed:
            log.info("removed %d stale connection files from %s", removed, self.connection_dir)
        self._apply_lifecycle_settings()
        self._culler = asyncio.ensure_future(self._cull_idle_kernels())
        for glyph_id, kernel_name in self.supply.remembered().items():
            self._resuming[glyph_id] = asyncio.ensure_future(self._resume(glyph_id, kernel_name))

    async def _resume(self, glyph_id: str, kernel_name: str) -> None:
        """Re-attach a glyph to the kernel it had before the provider (re)started."""
        try:
            if not await self._session(glyph_id, kernel_name).resume():
                self._reset_reasons[glyph_id] = "its kernel was gone when the provider started again"
        except Exception as exc:  # the gateway is down: the glyph's next run tries again
            log.warning("could not re-attach glyph %r to its kernel: %s", glyph_id, exc)
        finally:
            self._resuming.pop(glyph_id, None)

    def _apply_lifecycle_settings(self) -> None:
        self.supply.capacity.limit = self.settings.max_kernels
        self.supply.sandboxed_specs = sandboxed_specs(self.settings)
        self.supply.configure_pool(self.settings.kernel, self.settings.pool_size)

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
            result, _ = await self._run_once(request, kernel_name)
            return result
        if glyph_id in self._resuming:  # its kernel is being re-attached after a provider restart
            await asyncio.gather(asyncio.shield(self._resuming[glyph_id]), return_exceptions=True)
        reset = self._reset_reasons.pop(glyph_id, None)
        notice = f"{reset}; its state was reset." if reset else None
        if glyph_id in self._retiring:
            # Its old kernel is still being stopped; the new one reuses its file names.
            await asyncio.gather(asyncio.shield(self._retiring[glyph_id]), return_exceptions=True)
        session = self.sessions.get(glyph_id)
        if session is not None and session.kernel_name != kernel_name:
            # The glyph's directive changed: its old kernel cannot run the new environment.
            await self._retire(session)
            notice = f"glyph moved from kernelspec {session.kernel_name!r} to {kernel_name!r}; its state was reset."
        session = self._session(glyph_id, kernel_name)
        try:
            with self.watchers.glyphs_first.glyph_run():
                result = await session.run(request)
        finally:
            self._forget_if_kernelless(session)
        if notice:
            result.add_notice(notice)
        self.history.record(glyph_id, kernel_name, request.code, result)
        return result

    async def evaluate(self, glyph_id: str, expression: str, timeout: float) -> tuple[ExecutionResult, dict]:
        """Evaluate one expression silently (no history entry) and return the kernel's answer bundle."""
        if self._closing:
            raise ProviderClosing("the provider is shutting down")
        request = RunRequest(
            code="pass",  # not "": IPython skips an empty cell's pre_execute, which names the glyph
            upstream=None,
            timeout=timeout,
            output_limit=self.settings.max_output_bytes,
            silent=True,
            user_expressions={"value": expression},
        )
        if glyph_id:
            session = self._session(glyph_id)
            try:
                with self.watchers.glyphs_first.glyph_run():
                    result, answers = await session.run_with_expressions(request)
            finally:
                self._forget_if_kernelless(session)
        else:
            result, answers = await self._run_once(request, self.settings.kernel)
        return result, answers.get("value", {})

    def _new_session(self, glyph_id: str, kernel_name: str) -> KernelSession:
        return KernelSession(
            glyph_id,
            kernel_name,
            self.supply,
            self.attestations,
            # A run without a glyph is a QNTX watcher action: it has no glyph to name, and
            # its attestations say a watcher of this plugin made them.
            actor=None if glyph_id else f"watcher:{self.settings.name}",
        )

    def _kernel_setup(self) -> str:
        """The code every kernel runs once it is up, before any glyph claims it (see prelude.py)."""
        setup = f"_kernel_provider_setup({self.settings.kernel_memory_limit!r}, {_PRELUDE_NAMES!r})"
        return f"{_PRELUDE_SOURCE}\n{setup}\ndel {', '.join(_PRELUDE_NAMES)}\n"

    async def _retire(self, session: KernelSession, reason: str | None = None) -> None:
        """Forget a glyph's session and stop its kernel; ``reason`` is told at the glyph's next run.

        A run that arrives for the glyph meanwhile waits for the stop to finish, so the old
        kernel's clean-up never removes the files of the kernel that replaces it.
        """
        glyph_id = session.glyph_id
        if self.sessions.get(glyph_id) is session:
            del self.sessions[glyph_id]
            if reason:
                self._remember_reset(glyph_id, reason)
        stopping = asyncio.ensure_future(session.stop())
        self._retiring[glyph_id] = stopping
        try:
            await asyncio.shield(stopping)
        finally:
            if self._retiring.get(glyph_id) is stopping:
                del self._retiring[glyph_id]

    def _forget_if_kernelless(self, session: KernelSession) -> None:
        """Drop a glyph whose run left it without a kernel and with nothing queued.

        A run refused at the ceiling, or whose kernel would not start, leaves such a
        session behind; without this every new glyph id tried at the ceiling would stay
        in the table forever. A glyph that had a kernel is told at its next run.
        """
        if session.kernel is not None or session.callers or session.lock.locked():
            return
        if self.sessions.get(session.glyph_id) is session:
            del self.sessions[session.glyph_id]
            if session.kernel_id is not None:
                self._remember_reset(session.glyph_id, "its kernel had stopped")

    def _remember_reset(self, glyph_id: str, reason: str) -> None:
        self._reset_reasons[glyph_id] = reason
        while len(self._reset_reasons) > MAX_REMEMBERED_RESETS:
            self._reset_reasons.pop(next(iter(self._reset_reasons)))

    def _idle_sessions(self) -> list[KernelSession]:
        """Glyph kernels nobody is using or waiting for, least recently used first."""
        idle = [s for s in self.sessions.values() if s.kernel is not None and not s.busy and not s.lock.locked()]
        return sorted(idle, key=lambda s: s.last_activity)

    async def _evict_one(self) -> bool:
        """Make room at the ceiling: stop the least recently used idle glyph kernel."""
        for session in self._idle_sessions():
            log.info("stopping the kernel of glyph %r to make room", session.glyph_id)
            await self._retire(
                session,
                f"its kernel was stopped to make room for other glyphs (at most {self.settings.max_kernels} kernels)",
            )
            return True
        return False

    async def _cull_idle_kernels(self) -> None:
        while not self._closing:
            timeout = self.settings.idle_timeout
            await asyncio.sleep(min(max(timeout / 4, 0.2), 30) if timeout else 30)
            if not timeout:
                continue
            horizon = time.time() - timeout
            for session in self._idle_sessions():
                if session.last_activity < horizon:
                    log.info("culling the idle kernel of glyph %r", session.glyph_id)
                    await self._retire(session, f"its kernel was stopped after {timeout:g} seconds without a run")

    def _session(self, glyph_id: str, kernel_name: str | None = None) -> KernelSession:
        session = self.sessions.get(glyph_id)
        if session is None:
            kernel_name = kernel_name or self.settings.kernel
            session = self._new_session(glyph_id, kernel_name)
            self.sessions[glyph_id] = session
        return session

    async def remove(self, glyph_id: str) -> bool:
        """Stop a glyph's kernel and forget the glyph; False when there was no such glyph."""
        self.history.forget(glyph_id)
        session = self.sessions.get(glyph_id)
        if session is None:
            return False
        await self._retire(session)
        return True

    def _new_runner(self) -> KernelSession:
        return self._new_session("", self.settings.kernel)

    async def _run_once(self, request: RunRequest, kernel_name: str) -> tuple[ExecutionResult, dict[str, Any]]:
        """QNTX's watcher actions send no glyph: a runner kernel takes them (see watchers.py).

        A run whose directive asks for another kernelspec than the default gets a kernel
        of that kernelspec for this one run.
        """
        if kernel_name == self.settings.kernel:
            return await self.watchers.run(request)
        session = self._new_session("", kernel_name)
        self._throwaway.add(session)  # so that shutdown stops it too
        try:
            return await session.run_with_expressions(request)
        finally:
            self._throwaway.discard(session)
            await session.stop()

    async def reconfigure(self, settings: Settings) -> None:
        """Take new settings; kernels of a kernelspec no longer served are stopped."""
        previous, self.settings = self.settings, settings
        if _backend(settings) != _backend(previous):
            await self._switch_backend()
        # Kernels of a kernelspec no longer served stop now; a glyph whose spec is still
        # served but no longer its choice (the default changed) moves at its next run.
        stale = [g for g, session in self.sessions.items() if session.kernel_name not in settings.served_kernels]
        await asyncio.gather(*(self._retire(self.sessions[g]) for g in stale))
        self.watchers.resize(
            settings.watcher_kernels, settings.watcher_queue, settings.watcher_mode, settings.watcher_share
        )
        if self._culler is not None:  # started: the pool and the ceiling follow the new settings
            self._apply_lifecycle_settings()

    async def _switch_backend(self) -> None:
        """Initialize named another kernel backend: let go of every kernel, and take up the new backend's."""
        supply = make_supply(self.settings, self._evict_one, self._kernel_setup)  # a bad state folder fails here
        sessions = list(self.sessions.values())
        self.sessions.clear()
        await asyncio.gather(*(s._stop(detach=True) for s in sessions), return_exceptions=True)
        await self.supply.close()
        self.supply = supply
        if self._culler is not None:  # started: re-attach what the new backend remembers
            for glyph_id, kernel_name in supply.remembered().items():
                self._resuming[glyph_id] = asyncio.ensure_future(self._resume(glyph_id, kernel_name))

    def counts(self) -> tuple[int, int]:
        """(live glyph kernels, busy kernels); pooled kernels are not counted here."""
        live = [s for s in [*self.sessions.values(), *self._throwaway, *self.watchers.sessions()] if s.kernel]
        return len(live), sum(1 for s in live if s.busy)

    def close(self) -> None:
        """Refuse new runs from now on; the ones under way go on."""
        self._closing = True

    async def shutdown(self) -> None:
        """Let go of every kernel (a gateway keeps glyph kernels for the next start); refuse new runs."""
        self.close()
        sessions = [*self.sessions.values(), *self._throwaway]
        self.sessions.clear()
        if self._culler is not None:
            self._culler.cancel()
        for resuming in list(self._resuming.values()):
            resuming.cancel()
        # Stop without waiting for each glyph's lock: a run in progress is cut short.
        await asyncio.gather(*(s._stop(detach=True) for s in sessions), self.watchers.close(), return_exceptions=True)
        await self.supply.close()
        if self.attestations is not None:
            await self.attestations.close()


def _backend(settings: Settings) -> tuple:
    """What picks the kernel backend (see kernels.make_supply): a change means another backend."""
    if not settings.gateway_url:
        return ("local",)
    return (settings.gateway_url, settings.gateway_token, settings.resolved_state_dir())
