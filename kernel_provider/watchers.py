"""Runs without a glyph (QNTX's watcher actions): a few runner kernels, reset between runs.

QNTX runs a watcher's action once per matching attestation, with an empty glyph_id. Booting a
kernel per run bounds that by kernel boots (a few runs a second); instead a small set of
runner kernels takes the runs, side by side up to their number, the rest queueing, and each
runner's user namespace is reset after every run, so that no variable, function or import
binding of one run is visible to the next. What a reset does not undo (module state, threads a
run left behind, files it wrote) is written down in the README ("Runs without a glyph").

A run that crashes or hangs its runner is mended the way a glyph's is (KernelSession starts a
fresh kernel), so no later run inherits the damage. ``mode = "fresh"`` keeps the strongest
separation instead: a kernel of its own for every run, stopped afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kernel_provider.execution import run_silently
from kernel_provider.results import ExecutionResult

if TYPE_CHECKING:
    from kernel_provider.sessions import KernelSession, RunRequest

log = logging.getLogger(__name__)

# Run by the provider after each run, silently; the prelude defines _kernel_provider.reset().
RESET_CODE = "__import__('_kernel_provider').reset()"
RESET_TIMEOUT = 10.0


class WatcherRunners:
    """Takes glyph-less runs: ``size`` runner kernels at once, at most ``queue_limit`` waiting."""

    def __init__(self, new_session: Callable[[], KernelSession], size: int, queue_limit: int, mode: str):
        self._new_session = new_session
        self.size, self.queue_limit, self.mode = size, queue_limit, mode
        self._runners: list[KernelSession] = []
        self._idle: asyncio.Queue[KernelSession] = asyncio.Queue()
        # Kernels of "fresh" runs under way, and the semaphore each took its place from.
        self._fresh: dict[KernelSession, asyncio.Semaphore] = {}
        self._fresh_slots = asyncio.Semaphore(size)  # "fresh" runs go side by side up to the same bound
        self.busy = 0
        self.queued = 0
        self.runs = 0

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "runners": self.size if self.mode == "reset" else 0,
            "busy": self.busy,
            "queued": self.queued,
            "queue_limit": self.queue_limit,
            "runs": self.runs,
        }

    async def run(self, request: RunRequest) -> tuple[ExecutionResult, dict[str, Any]]:
        if self.queued >= self.queue_limit:
            return (
                ExecutionResult.failed(
                    f"CapacityError: capacity: {self.queued} runs without a glyph are already waiting "
                    f"(at most {self.queue_limit}); try again later."
                ),
                {},
            )
        self.queued += 1
        try:
            runner = await self._take()
        finally:
            self.queued -= 1
        self.busy += 1
        self.runs += 1
        try:
            return await runner.run_with_expressions(request)
        finally:
            self.busy -= 1
            asyncio.ensure_future(self._give_back(runner))

    async def _take(self) -> KernelSession:
        if self.mode == "fresh":
            slots = self._fresh_slots
            await slots.acquire()
            session = self._new_session()
            self._fresh[session] = slots
            return session
        if self._idle.empty() and len(self._runners) < self.size:
            runner = self._new_session()
            self._runners.append(runner)
            return runner
        return await self._idle.get()

    async def _give_back(self, runner: KernelSession) -> None:
        """Reset a runner for the next run (or stop a fresh run's kernel), then free its place."""
        if runner in self._fresh:
            try:
                await runner.stop()
            finally:
                slots = self._fresh.pop(runner, None)  # gone when close() stopped it first
                if slots is not None:
                    slots.release()
            return
        kernel = runner.kernel
        if kernel is not None:
            try:
                async with runner.lock:
                    await run_silently(kernel.connection, RESET_CODE, timeout=RESET_TIMEOUT)
            except Exception as exc:
                # A runner that cannot be reset must not carry this run's state to the next.
                log.warning("could not reset a watcher runner (%s); stopping its kernel", exc)
                await runner.stop()
        if runner in self._runners:
            self._idle.put_nowait(runner)

    def resize(self, size: int, queue_limit: int, mode: str) -> None:
        """New settings take effect as runners come back; extra runners are stopped when idle."""
        if size != self.size:
            self._fresh_slots = asyncio.Semaphore(size)
        self.size, self.queue_limit, self.mode = size, queue_limit, mode
        while len(self._runners) > size and not self._idle.empty():
            runner = self._idle.get_nowait()
            self._runners.remove(runner)
            asyncio.ensure_future(runner.stop())

    def sessions(self) -> list[KernelSession]:
        return [*self._runners, *self._fresh]

    async def close(self) -> None:
        sessions = self.sessions()
        self._runners.clear()
        self._fresh.clear()
        await asyncio.gather(*(s._stop() for s in sessions), return_exceptions=True)
