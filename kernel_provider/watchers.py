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

Glyphs come first (GlyphsFirst): a person waits on a glyph's answer, nobody on a watcher's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from kernel_provider.execution import run_silently
from kernel_provider.results import ExecutionResult

if TYPE_CHECKING:
    from kernel_provider.sessions import KernelSession, RunRequest

log = logging.getLogger(__name__)

# Run by the provider after each run, silently; the prelude defines _kernel_provider.reset().
RESET_CODE = "__import__('_kernel_provider').reset()"
RESET_TIMEOUT = 10.0


class GlyphsFirst:
    """Decides when a run without a glyph may start, so that watchers take what glyphs leave.

    Eight callers streaming watcher runs at a provider on 2 cores kept both cores busy, and a
    glyph's p99 went from 4 ms to over 100 ms; the same load on a second provider, sharing
    only the cores, still doubled a glyph's p50. So watchers must leave the machine room, not
    just the event loop. While glyphs are active (a glyph run under way, or one ended less
    than QUIET_SECONDS ago), runs without a glyph go one at a time, and after each a runner
    rests so that it works at most ``share`` of the time (by default half: it rests as long as
    its run and reset took). Watchers slow down beside glyphs but never stop. With no glyph
    active, or a share of 1, every runner takes runs back to back.
    """

    QUIET_SECONDS = 1.0

    def __init__(self, share: float) -> None:
        self.share = share  # settings.watcher_share
        self.glyph_runs = 0  # under way now
        self._last_glyph_run = -math.inf  # when the last one ended (time.monotonic())
        self._rest_until = -math.inf  # no run without a glyph starts before this while glyphs are active
        self._changed = asyncio.Event()
        self._turn = asyncio.Lock()  # one waiter looks at the clock at a time, in arrival order
        self.paced = 0  # runs without a glyph that waited for glyphs, since the start

    @contextlib.contextmanager
    def glyph_run(self) -> Iterator[None]:
        """Wrap a glyph's run: watchers yield to it."""
        self.glyph_runs += 1
        try:
            yield
        finally:
            self.glyph_runs -= 1
            self._last_glyph_run = time.monotonic()
            self.changed()

    def glyphs_active(self) -> bool:
        return self.glyph_runs > 0 or time.monotonic() - self._last_glyph_run < self.QUIET_SECONDS

    def changed(self) -> None:
        """Wake the run waiting for its turn: a glyph or a watcher run ended."""
        self._changed.set()
        self._changed = asyncio.Event()

    def runner_rested(self, busy_seconds: float) -> None:
        """A runner is back after ``busy_seconds`` of run and reset; rest as long, if glyphs are active."""
        self._rest_until = time.monotonic() + busy_seconds * (1 / self.share - 1)
        self.changed()

    async def wait_turn(self, busy: Callable[[], int]) -> None:
        """Return when a run without a glyph may start, ``busy()`` being the runners at work."""
        async with self._turn:
            waited = False
            while self.share < 1:
                now = time.monotonic()
                quiet_in = self.QUIET_SECONDS - (now - self._last_glyph_run)
                if self.glyph_runs == 0 and quiet_in <= 0:
                    break  # no glyph active: every runner may work
                rest = self._rest_until - now
                if busy() == 0 and rest <= 0:
                    break
                # Wait for a run to end, the glyphs to fall quiet, or the rest to be over.
                deadlines = [quiet_in] if self.glyph_runs == 0 else []
                if busy() == 0:
                    deadlines.append(rest)
                waited = True
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(min(deadlines), 0.0005) if deadlines else None):
                        await changed.wait()
            if waited:
                self.paced += 1


class WatcherRunners:
    """Takes glyph-less runs: ``size`` runner kernels at once, at most ``queue_limit`` waiting."""

    def __init__(self, new_session: Callable[[], KernelSession], size: int, queue_limit: int, mode: str, share: float):
        self._new_session = new_session
        self.size, self.queue_limit, self.mode = size, queue_limit, mode
        self._runners: list[KernelSession] = []
        self._idle: asyncio.Queue[KernelSession] = asyncio.Queue()
        # Kernels of "fresh" runs under way, and the semaphore each took its place from.
        self._fresh: dict[KernelSession, asyncio.Semaphore] = {}
        self._fresh_slots = asyncio.Semaphore(size)  # "fresh" runs go side by side up to the same bound
        self.glyphs_first = GlyphsFirst(share)
        self.busy = 0
        self.resetting = 0
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
            "share_beside_glyphs": self.glyphs_first.share,
            "glyphs_active": self.glyphs_first.glyphs_active(),
            "paced_for_glyphs": self.glyphs_first.paced,
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
            # A runner resetting after its run still works the cores and the event loop.
            await self.glyphs_first.wait_turn(lambda: self.busy + self.resetting)
            self.busy += 1  # from here, so that no second run passes wait_turn meanwhile
            try:
                runner = await self._take()
            except BaseException:
                self.busy -= 1
                raise
        finally:
            self.queued -= 1
        started = time.monotonic()
        self.runs += 1
        try:
            return await runner.run_with_expressions(request)
        finally:
            self.busy -= 1
            asyncio.ensure_future(self._give_back(runner, started))

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

    async def _give_back(self, runner: KernelSession, started: float) -> None:
        """Reset a runner for the next run (or stop a fresh run's kernel), then free its place."""
        if runner in self._fresh:
            try:
                await runner.stop()
            finally:
                slots = self._fresh.pop(runner, None)  # gone when close() stopped it first
                if slots is not None:
                    slots.release()
                self.glyphs_first.runner_rested(time.monotonic() - started)
            return
        kernel = runner.kernel
        if kernel is not None:
            self.resetting += 1
            try:
                async with runner.lock:
                    await run_silently(kernel.connection, RESET_CODE, timeout=RESET_TIMEOUT)
            except Exception as exc:
                # A runner that cannot be reset must not carry this run's state to the next.
                if runner in self._runners:  # not when close() is stopping it anyway
                    log.warning("could not reset a watcher runner (%s); stopping its kernel", exc)
                await runner.stop()
            finally:
                self.resetting -= 1
        self.glyphs_first.runner_rested(time.monotonic() - started)
        if runner in self._runners:
            self._idle.put_nowait(runner)

    def resize(self, size: int, queue_limit: int, mode: str, share: float) -> None:
        """New settings take effect as runners come back; extra runners are stopped when idle."""
        if size != self.size:
            self._fresh_slots = asyncio.Semaphore(size)
        self.size, self.queue_limit, self.mode = size, queue_limit, mode
        self.glyphs_first.share = share
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
