"""Watcher actions: runs without a glyph against a glyph's steady runs, in the same provider.

QNTX runs a watcher's action once per matching attestation through Execute with an empty
glyph_id and the attestation injected into the code. This launches the provider as QNTX
does and measures, in one run:

* sequential p50 of such runs against a glyph's steady run p50 (goal <= 3x);
* the same from 8 concurrent callers (8 glyphs for the glyph side) (goal <= 3x);
* runs without a glyph sustained for --seconds from 8 concurrent callers, every answer
  checked (goal >= 50 runs/s), while one glyph runs steadily beside them: its p99 against
  its p99 on an idle provider (goal <= 2x).

Glyphs come first (kernel_provider/watchers.py, GlyphsFirst): for a second after a glyph's
run, runs without a glyph are paced. The two p50 ratios compare what each kind of run costs,
so the runs without a glyph are timed after the glyphs have been quiet that second; the
sustained load is the one measured beside a running glyph, paced.

``--watcher-mode fresh`` measures the "a kernel per run" setting instead. A measurement, not
a test: it exits 0 whatever the numbers, non-zero only when a run fails or answers wrongly.

    python benchmarks/watchers.py [--runs N] [--seconds S] [--watcher-mode reset|fresh]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from execute_latency import CALL_TIMEOUT, percentiles, running_provider  # noqa: E402

from kernel_provider import watchers  # noqa: E402
from kernel_provider.proto import python_pb2  # noqa: E402

CALLERS = 8
GOAL_P50_RATIO = 3.0
GOAL_RUNS_PER_SECOND = 50.0
GOAL_GLYPH_P99_RATIO = 2.0
GLYPH_PAUSE = 0.01  # between the runs of the glyph that runs beside the sustained load
# How long after a glyph's run watchers are paced (0 for a provider that predates the pacing).
GLYPHS_QUIET_SECONDS = getattr(getattr(watchers, "GlyphsFirst", None), "QUIET_SECONDS", 0.0)


def after_glyphs_are_quiet() -> None:
    time.sleep(GLYPHS_QUIET_SECONDS + 0.1)


def watcher_request(index: int) -> python_pb2.PythonExecuteRequest:
    attestation = {"id": f"as-{index}", "subjects": [f"S{index}"], "predicates": ["seen"]}
    code = (
        f"import json\n_attestation_json = {json.dumps(json.dumps(attestation))}\n"
        "attestation = json.loads(_attestation_json)\n"
        "print(attestation['subjects'][0])"
    )
    return python_pb2.PythonExecuteRequest(
        code=code, glyph_id="", upstream_attestation=json.dumps(attestation).encode()
    )


def check(response, index: int) -> None:
    if not response.success or response.output != f"S{index}\n":
        raise RuntimeError(f"run {index} answered wrongly: {response.error or response.output!r}")


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def glyph_runs(stub, glyph: str, count: int) -> list[float]:
    """A glyph's steady runs of the same code a watcher run has (its attestation injected)."""
    request = watcher_request(0)
    request.glyph_id = glyph
    return [timed(lambda: check(stub.Execute(request, timeout=CALL_TIMEOUT), 0)) for _ in range(count)]


def glyph_in_rhythm(stub, enough) -> list[float]:
    """A glyph run every GLYPH_PAUSE seconds until ``enough(times)``: the glyph beside the load.

    Its idle figure is taken in the same rhythm: on this machine a run that follows a 10 ms
    pause takes nearly twice one that follows another run (threads and cores wake from
    idle), so back-to-back idle runs would be no baseline for paused ones.
    """
    times: list[float] = []
    while not enough(times):
        times.extend(glyph_runs(stub, "steady", 1))
        time.sleep(GLYPH_PAUSE)
    return times


def watcher_runs(stub, count: int, start: int = 0) -> list[float]:
    times = []
    for index in range(start, start + count):
        request = watcher_request(index)
        times.append(timed(lambda r=request, i=index: check(stub.Execute(r, timeout=CALL_TIMEOUT), i)))
    return times


def concurrently(work, callers: int = CALLERS) -> list[float]:
    """Run ``work(caller_index)`` in ``callers`` threads; all their timings."""
    results: list[list[float]] = [[] for _ in range(callers)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [t for times in results for t in times]


def sustained(port: int, seconds: float) -> tuple[int, float]:
    """Runs without a glyph from CALLERS callers for ``seconds``; (runs, runs per second).

    Runs in a process of its own (see main): callers sharing this process's GIL with the thread
    that times the glyph beside them would slow that thread, not the provider.
    """
    import grpc

    from kernel_provider.proto import python_pb2_grpc

    stop = time.monotonic() + seconds
    counts = [0] * CALLERS
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = python_pb2_grpc.PythonServiceStub(channel)

        def caller(index: int) -> list[float]:
            n = 0
            while time.monotonic() < stop:
                run_index = index * 1_000_000 + n
                check(stub.Execute(watcher_request(run_index), timeout=CALL_TIMEOUT), run_index)
                n += 1
            counts[index] = n
            return []

        started = time.perf_counter()
        concurrently(caller)
        elapsed = time.perf_counter() - started
    return sum(counts), sum(counts) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each kind (default 200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the sustained load (default 30)")
    parser.add_argument("--watcher-mode", default="reset", choices=["reset", "fresh"])
    parser.add_argument("--watcher-kernels", type=int, help="runner kernels (default: the provider's)")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    # The default mode needs no flag, so the same script also measures providers that predate it.
    extra = [] if args.watcher_mode == "reset" else ["--watcher-mode", args.watcher_mode]
    if args.watcher_kernels:
        extra += ["--watcher-kernels", str(args.watcher_kernels)]
    try:
        with running_provider(args.kernel, extra_flags=extra) as (stub, _, _, port):
            glyph_runs(stub, "steady", 20)
            watcher_runs(stub, 20, start=-20)
            glyph_seq = glyph_runs(stub, "steady", args.runs)
            after_glyphs_are_quiet()
            watcher_seq = watcher_runs(stub, args.runs)
            per_caller = max(args.runs // CALLERS, 5)
            for i in range(CALLERS):
                glyph_runs(stub, f"steady-{i}", 3)
            glyph_conc = concurrently(lambda i: glyph_runs(stub, f"steady-{i}", per_caller))
            after_glyphs_are_quiet()
            watcher_conc = concurrently(lambda i: watcher_runs(stub, per_caller, start=10_000 + i * per_caller))
            # Enough runs for a p99 that is not just the second-slowest of 200.
            idle_glyph = glyph_in_rhythm(stub, lambda times: len(times) >= max(args.runs, 600))
            beside: list[float] = []
            done = threading.Event()

            def glyph_beside() -> None:
                beside.extend(glyph_in_rhythm(stub, lambda _: done.is_set()))

            thread = threading.Thread(target=glyph_beside)
            thread.start()
            try:
                with multiprocessing.get_context("spawn").Pool(1) as load:
                    total, per_second = load.apply(sustained, (port, args.seconds))
            finally:
                done.set()
                thread.join()
    except Exception as exc:
        print(f"watchers: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    seq_ratio = statistics.median(watcher_seq) / statistics.median(glyph_seq)
    conc_ratio = statistics.median(watcher_conc) / statistics.median(glyph_conc)
    idle_p99, beside_p99 = percentiles(idle_glyph)[1], percentiles(beside)[1]
    print(f"runs without a glyph, watcher mode {args.watcher_mode!r}, kernelspec {args.kernel!r}")
    print(f"{'':<34}{'p50 ms':>9}{'p99 ms':>9}")
    for label, times in [
        ("glyph steady, sequential", glyph_seq),
        ("no glyph, sequential", watcher_seq),
        (f"glyph steady, {CALLERS} callers", glyph_conc),
        (f"no glyph, {CALLERS} callers", watcher_conc),
        ("glyph every 10 ms, idle provider", idle_glyph),
        ("glyph every 10 ms, beside the load", beside),
    ]:
        p50, p99 = percentiles(times)
        print(f"{label:<34}{p50:>9.2f}{p99:>9.2f}")
    print(f"sequential p50 ratio {seq_ratio:.2f} (goal <= {GOAL_P50_RATIO:.1f})")
    print(f"{CALLERS} callers p50 ratio {conc_ratio:.2f} (goal <= {GOAL_P50_RATIO:.1f})")
    print(
        f"sustained {per_second:.1f} runs/s over {args.seconds:g} s, {total} answers all exact "
        f"(goal >= {GOAL_RUNS_PER_SECOND:.0f})"
    )
    print(f"glyph p99 beside the load {beside_p99 / idle_p99:.2f}x idle (goal <= {GOAL_GLYPH_P99_RATIO:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
