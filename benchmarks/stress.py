"""Stress: N glyphs x M runs from concurrent clients, every count and every output verified.

The plugin is launched as QNTX launches it (``qntx-python-plugin --port 0``, the port read
from its stdout line). Each glyph counts in its own kernel: run k of glyph g executes

    try:
        n += 1
    except NameError:
        n = 1
    print(f"g:{n}")
    n

and the answer must print exactly this glyph's line and give the count previous + 1. The
one exception is an answer whose stderr carries the provider's notice (a line starting
``[kernel_provider]`` and containing ``state was reset``, written when it stopped the
glyph's kernel to make room or for idleness): then the count must start again at 1. A
count back at 1 without that notice is an error, as is any other count or output.

Runs of one glyph go in order, one in flight at a time; different glyphs run at once from
``--clients`` threads sharing one gRPC channel. Meanwhile a thread samples /proc every
0.2 s for the RSS of the provider and the summed RSS of all its descendants (the kernels).

Run it from the project root:

    python benchmarks/stress.py [--glyphs 50] [--runs 20] [--clients 8] [--max-kernels 64]
                                [--kernel python3] [PROVIDER FLAGS ...]

Flags it does not know (``--pool-size 2``, ``--idle-timeout 30``, ...) go to the provider
as given. ``--max-kernels 0`` leaves that flag out. It prints the totals and a final line
``verified: N runs, 0 errors``, or the errors and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

PORT_LINE_PREFIX = "QNTX_PLUGIN_PORT="
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
SAMPLE_SECONDS = 0.2
NOTICE_PREFIX = "[kernel_provider]"
RESET_WORDS = "state was reset"
MAX_ERRORS_SHOWN = 50
GOAL_WARM_P99_MS = 250.0
GOAL_LOOP_LAG_P99_MS = 20.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class LaunchError(RuntimeError):
    pass


# --- the provider process ------------------------------------------------------------------


def plugin_command(kernel: str, max_kernels: int, extra: list[str]) -> list[str]:
    """The plugin executable next to this Python, as QNTX finds it; else the module form."""
    flags = ["--port", "0", "--kernel", kernel, "--log-level", "warn"]
    if max_kernels:
        flags += ["--max-kernels", str(max_kernels)]
    script = Path(sys.executable).parent / "qntx-python-plugin"
    if script.exists():
        return [str(script), *flags, *extra]
    return [sys.executable, "-m", "kernel_provider", "serve", *flags, *extra]


def launch(command: list[str]) -> tuple[subprocess.Popen[str], int, list[str]]:
    """Start the plugin; (process, port, its stderr lines so far and to come)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    stderr = process.stderr
    # Drained in the background so that a chatty provider never blocks on a full pipe.
    drain = threading.Thread(target=lambda: stderr_lines.extend(stderr), daemon=True)
    drain.start()
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if line.startswith(PORT_LINE_PREFIX):
        return process, int(line[len(PORT_LINE_PREFIX) :]), stderr_lines
    try:
        status = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    drain.join(timeout=5)
    said = "".join(stderr_lines).strip()
    refused = [line for line in said.splitlines() if "unrecognized arguments" in line]
    if status == 2 and refused and "--max-kernels" in refused[0]:
        raise LaunchError(
            "this provider does not know --max-kernels (it exited with status 2, unknown argument); "
            "run with --max-kernels 0 to leave the flag out.\n"
            f"command: {' '.join(command)}\nprovider said: {refused[0]}"
        )
    if status == 2:
        raise LaunchError(
            f"the provider rejected its command line (exit 2).\ncommand: {' '.join(command)}\nprovider said: {said}"
        )
    raise LaunchError(f"the plugin did not announce its port (got {line!r}, exit status {status}); stderr:\n{said}")


def stop(process: subprocess.Popen[str], domain: domain_pb2_grpc.DomainPluginServiceStub | None) -> None:
    """Shutdown RPC, then wait; terminate, then kill, if it does not go."""
    if domain is not None and process.poll() is None:
        try:
            domain.Shutdown(domain_pb2.Empty(), timeout=STOP_TIMEOUT)
        except grpc.RpcError as exc:
            print(f"warning: Shutdown RPC failed: {exc.code().name}", file=sys.stderr)
    for step in (None, process.terminate, process.kill):
        if step is not None:
            step()
        try:
            process.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue


# --- memory sampling -----------------------------------------------------------------------


def _ppid_map() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class MemorySampler:
    pid: int
    peak_provider: int = 0
    peak_children: int = 0
    peak_child_count: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_SECONDS)

    def sample(self) -> None:
        kids = descendants(self.pid, _ppid_map())
        self.peak_provider = max(self.peak_provider, _rss(self.pid))
        self.peak_children = max(self.peak_children, sum(_rss(pid) for pid in kids))
        self.peak_child_count = max(self.peak_child_count, len(kids))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- the load ------------------------------------------------------------------------------


def glyph_code(glyph_id: str) -> str:
    return f'try:\n    n += 1\nexcept NameError:\n    n = 1\nprint(f"{glyph_id}:{{n}}")\nn'


@dataclass
class GlyphState:
    glyph_id: str
    code: str
    done: int = 0  # runs answered
    count: int = 0  # the count the kernel should hold now


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    # Runs of a glyph that already had its kernel and were not told of a reset.
    warm_latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resets: int = 0
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def verify(glyph: GlyphState, result: dict) -> tuple[list[str], bool]:
    """(errors, whether the answer says the glyph's state was reset) for run ``glyph.done + 1``."""
    where = f"{glyph.glyph_id} run {glyph.done + 1}"
    if not result.get("success"):
        return [f"{where}: failed: {(result.get('error') or '').strip().splitlines()[-1:]}"], False
    stderr_lines = (result.get("stderr") or "").splitlines()
    notices = [line for line in stderr_lines if line.startswith(NOTICE_PREFIX)]
    others = [line for line in stderr_lines if not line.startswith(NOTICE_PREFIX)]
    reset = any(RESET_WORDS in line for line in notices)
    expected = 1 if reset else glyph.count + 1
    errors = []
    if result.get("stdout") != f"{glyph.glyph_id}:{expected}\n":
        errors.append(f"{where}: printed {result.get('stdout')!r}, expected {glyph.glyph_id}:{expected}")
    if result.get("result") != str(expected):
        got = result.get("result")
        why = ""
        if got == "1" and not reset:
            why = " (a restart without a reset notice"
            why += f"; the notice {notices[0]!r} does not say {RESET_WORDS!r})" if notices else ")"
        errors.append(f"{where}: count {got!r}, expected {expected}{why}")
    if others:
        errors.append(f"{where}: unexpected stderr {others[:3]!r}")
    return errors, reset


def client(
    stub: python_pb2_grpc.PythonServiceStub,
    ready: queue.Queue[GlyphState],
    runs: int,
    total: int,
    tally: Tally,
    call_timeout: float,
    abort: threading.Event,
) -> None:
    """Take a glyph whose previous run is answered, send its next run, verify, put it back."""
    while not abort.is_set():
        try:
            glyph = ready.get(timeout=0.1)
        except queue.Empty:
            with tally.lock:
                if tally.answered >= total:
                    return
            continue
        request = python_pb2.PythonExecuteRequest(code=glyph.code, glyph_id=glyph.glyph_id)
        started = time.perf_counter()
        try:
            response = stub.Execute(request, timeout=call_timeout)
            result = json.loads(response.result)
        except grpc.RpcError as exc:
            errors, reset, result = (
                [f"{glyph.glyph_id} run {glyph.done + 1}: {exc.code().name}: {exc.details()}"],
                False,
                None,
            )
        else:
            errors, reset = verify(glyph, result)
        elapsed = (time.perf_counter() - started) * 1000
        # Whatever the kernel now holds is what the next run builds on.
        if result is not None and result.get("success") and str(result.get("result", "")).isdigit():
            glyph.count = int(result["result"])
        glyph.done += 1
        with tally.lock:
            tally.latencies.append(elapsed)
            if glyph.done > 1 and not reset:
                tally.warm_latencies.append(elapsed)
            tally.errors.extend(errors)
            tally.resets += reset
            tally.answered += 1
        if glyph.done < runs:
            ready.put(glyph)


def percentiles(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return (times[0], times[0]) if times else (0.0, 0.0)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49], cuts[98]


def mb(value: int) -> str:
    return f"{value / 2**20:.1f} MB"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], epilog="Other flags are passed to the provider as given."
    )
    parser.add_argument("--glyphs", type=int, default=50, help="glyphs, each counting in its own kernel")
    parser.add_argument("--runs", type=int, default=20, help="runs of each glyph")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument(
        "--max-kernels", type=int, default=64, help="passed to the provider; 0 = do not pass it (default 64)"
    )
    parser.add_argument("--kernel", default="python3", help="kernelspec of the glyph kernels (default python3)")
    parser.add_argument("--call-timeout", type=float, default=300.0, help="gRPC deadline of each run in seconds")
    args, extra = parser.parse_known_args(argv)
    for name in ("glyphs", "runs", "clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.max_kernels < 0:
        parser.error("--max-kernels must be 0 (leave it out) or more")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    command = plugin_command(args.kernel, args.max_kernels, extra)
    print(f"provider: {' '.join(command[1:])}")
    try:
        process, port, stderr_lines = launch(command)
    except LaunchError as exc:
        print(f"stress: {exc}", file=sys.stderr)
        return 2
    sampler = MemorySampler(process.pid)
    sampler.start()
    tally = Tally()
    abort = threading.Event()
    domain = None
    total = args.glyphs * args.runs
    started = time.perf_counter()
    wall = 0.0
    lag: dict[str, str] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            domain = domain_pb2_grpc.DomainPluginServiceStub(channel)
            domain.Initialize(domain_pb2.InitializeRequest(), timeout=START_TIMEOUT, wait_for_ready=True)
            stub = python_pb2_grpc.PythonServiceStub(channel)
            ready: queue.Queue[GlyphState] = queue.Queue()
            width = len(str(args.glyphs - 1))
            for index in range(args.glyphs):
                glyph_id = f"stress-g{index:0{width}d}"
                ready.put(GlyphState(glyph_id, glyph_code(glyph_id)))
            threads = [
                threading.Thread(
                    target=client, args=(stub, ready, args.runs, total, tally, args.call_timeout, abort), daemon=True
                )
                for _ in range(args.clients)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    while thread.is_alive():
                        thread.join(timeout=0.5)
            except KeyboardInterrupt:
                abort.set()
                tally.errors.append("interrupted by the user")
                for thread in threads:
                    thread.join(timeout=args.call_timeout)
            wall = time.perf_counter() - started
            sampler.sample()
            # The provider keeps its event loop's lag over the last minute: read it before stopping.
            lag = domain.Health(domain_pb2.Empty(), timeout=START_TIMEOUT).details
            stop(process, domain)
    except grpc.RpcError as exc:
        tally.errors.append(f"provider call failed: {exc.code().name}: {exc.details()}")
    except Exception as exc:  # noqa: BLE001 - reported, then the provider is stopped below
        tally.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        abort.set()
        sampler.stop()
        stop(process, None)
    if not wall:
        wall = time.perf_counter() - started

    answered = len(tally.latencies)
    if answered != total:
        tally.errors.append(f"only {answered} of {total} runs were answered")
    p50, p99 = percentiles(tally.latencies)
    print(f"glyphs {args.glyphs} x runs {args.runs}, {args.clients} clients, kernelspec {args.kernel!r}")
    print(f"total runs           {answered} of {total}")
    print(f"wall time            {wall:.2f} s")
    print(f"throughput           {answered / wall if wall else 0:.1f} runs/s")
    print(f"latency p50 / p99    {p50:.1f} / {p99:.1f} ms")
    warm_p50, warm_p99 = percentiles(tally.warm_latencies)
    print(f"warm runs p50 / p99  {warm_p50:.1f} / {warm_p99:.1f} ms (goal p99 <= {GOAL_WARM_P99_MS:.0f} ms)")
    print(
        f"event loop lag p99  {lag.get('loop_lag_p99_ms', '?')} ms, max {lag.get('loop_lag_max_ms', '?')} ms "
        f"(last minute; goal p99 <= {GOAL_LOOP_LAG_P99_MS:.0f} ms)"
    )
    print(f"peak provider RSS    {mb(sampler.peak_provider)}")
    print(f"peak kernels RSS     {mb(sampler.peak_children)} (all descendants summed)")
    print(f"peak child processes {sampler.peak_child_count}")
    print(f"state resets         {tally.resets}")
    print(f"provider exit status {process.returncode}")
    if tally.errors:
        print(f"{len(tally.errors)} errors:")
        for error in tally.errors[:MAX_ERRORS_SHOWN]:
            print(f"  {error}")
        if len(tally.errors) > MAX_ERRORS_SHOWN:
            print(f"  ... and {len(tally.errors) - MAX_ERRORS_SHOWN} more")
        tail = "".join(stderr_lines[-20:]).rstrip()
        if tail:
            print(f"provider stderr (last lines):\n{tail}", file=sys.stderr)
        print(f"verified: {answered} runs, {len(tally.errors)} errors")
        return 1
    print(f"verified: {answered} runs, 0 errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
