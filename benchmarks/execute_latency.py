"""Execute latency: the provider's gRPC round trip against a raw jupyter_client round trip.

Both sides run a trivial statement (``1+1``) on a kernel of the same kernelspec:

* baseline: one kernel started with ``jupyter_client.AsyncKernelManager``; a round trip
  is ``execute_request`` on shell until both the iopub ``status: idle`` and the shell
  ``execute_reply`` of that request have arrived;
* provider: the plugin launched as QNTX launches it (``qntx-python-plugin --port 0``),
  initialized, then ``PythonService.Execute(code="1+1", glyph_id="bench")`` over one
  reused gRPC channel.

Both are warmed up first, then measured in alternating blocks (the order flipping from
block to block) so that machine noise falls on both alike. The script prints p50 and p99
of each and the provider/baseline ratios, the CPU time each side spends per call (the
provider's process, from /proc, against this process's own during the baseline blocks),
and the first run of a new glyph: against a steady run once the provider has settled, and
right after Initialize against one raw kernel start. It is a measurement, not a test: it
exits 0 whatever the numbers, and non-zero only when something fails to start or to run.

Run it from the project root:

    python benchmarks/execute_latency.py [--runs N] [--kernel NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

CODE = "1+1"
GLYPH_ID = "bench"
WARMUP_CALLS = 20
BLOCKS = 10
PORT_LINE_PREFIX = "QNTX_PLUGIN_PORT="
START_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
GOAL_RATIO = 0.80
GOAL_CPU_MS = 1.0
GOAL_FIRST_RUN_SETTLED = 3.0
GOAL_FIRST_RUN_AFTER_INITIALIZE = 1.2
FIRST_RUNS = 5


# --- baseline: jupyter_client directly ---------------------------------------------------


class Baseline:
    """One kernel and its async client, driven from a private event loop."""

    def __init__(self, kernel: str):
        self.runner = asyncio.Runner()
        self.manager = AsyncKernelManager(kernel_name=kernel)
        self.client: AsyncKernelClient | None = None

    def start(self) -> None:
        self.runner.run(self._start())

    async def _start(self) -> None:
        await self.manager.start_kernel()
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=START_TIMEOUT)

    def timed_calls(self, count: int) -> list[float]:
        """Run ``count`` round trips; their durations in milliseconds."""
        return self.runner.run(self._timed_calls(count))

    async def _timed_calls(self, count: int) -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await self._round_trip()
            times.append((time.perf_counter() - started) * 1000)
        return times

    async def _round_trip(self) -> None:
        assert self.client is not None
        msg_id = self.client.execute(CODE)
        idle = replied = False
        while not idle:
            msg = await self.client.get_iopub_msg(timeout=CALL_TIMEOUT)
            idle = _is_ours(msg, msg_id) and msg["msg_type"] == "status" and _is_idle(msg)
        while not replied:
            reply = await self.client.get_shell_msg(timeout=CALL_TIMEOUT)
            replied = _is_ours(reply, msg_id)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"baseline kernel failed to run {CODE!r}: {reply['content']}")

    def stop(self) -> None:
        try:
            self.runner.run(self._stop())
        finally:
            self.runner.close()

    async def _stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.manager.has_kernel:
            await self.manager.shutdown_kernel(now=True)


def _is_ours(msg: dict, msg_id: str) -> bool:
    return msg.get("parent_header", {}).get("msg_id") == msg_id


def _is_idle(msg: dict) -> bool:
    return msg["content"].get("execution_state") == "idle"


# --- provider: the plugin over gRPC ---------------------------------------------------------


def plugin_command(kernel: str, extra_flags: list[str] | None = None) -> list[str]:
    """The plugin executable next to this Python, as QNTX finds it; else the module form."""
    flags = ["--port", "0", "--kernel", kernel, "--log-level", "warn", *(extra_flags or [])]
    script = Path(sys.executable).parent / "qntx-python-plugin"
    if script.exists():
        return [str(script), *flags]
    return [sys.executable, "-m", "kernel_provider", "serve", *flags]


def read_port(process: subprocess.Popen[str]) -> int:
    """The port from the plugin's one stdout line, waiting at most START_TIMEOUT."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    if not line.startswith(PORT_LINE_PREFIX):
        raise RuntimeError(f"the plugin did not announce its port (got {line!r}, exit status {process.poll()})")
    return int(line[len(PORT_LINE_PREFIX) :])


def stop_process(process: subprocess.Popen[str]) -> None:
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_provider(
    kernel: str, initialize: bool = True, extra_flags: list[str] | None = None
) -> Iterator[tuple[python_pb2_grpc.PythonServiceStub, domain_pb2_grpc.DomainPluginServiceStub, int, int]]:
    """Launch (and initialize) the plugin; yield its two services, pid and port; shut it down however we leave."""
    process = subprocess.Popen(plugin_command(kernel, extra_flags), stdout=subprocess.PIPE, text=True)
    try:
        port = read_port(process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            plugin = domain_pb2_grpc.DomainPluginServiceStub(channel)
            if initialize:
                plugin.Initialize(domain_pb2.InitializeRequest(), timeout=START_TIMEOUT, wait_for_ready=True)
            try:
                yield python_pb2_grpc.PythonServiceStub(channel), plugin, process.pid, port
            finally:
                try:
                    plugin.Shutdown(domain_pb2.Empty(), timeout=STOP_TIMEOUT)
                except grpc.RpcError as exc:
                    print(f"warning: Shutdown RPC failed: {exc.code().name}", file=sys.stderr)
    finally:
        stop_process(process)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CPUMeter:
    """CPU seconds a process spends inside the measured calls, and how many calls."""

    def __init__(self, read: Callable[[], float]):
        self.read, self.seconds, self.calls = read, 0.0, 0

    def wrap(self, timed_calls: Callable[[int], list[float]]) -> Callable[[int], list[float]]:
        def measured(count: int) -> list[float]:
            before = self.read()
            times = timed_calls(count)
            self.seconds += self.read() - before
            self.calls += count
            return times

        return measured

    @property
    def ms_per_call(self) -> float:
        return self.seconds * 1000 / max(self.calls, 1)


def provider_timed_calls(stub: python_pb2_grpc.PythonServiceStub, count: int, glyph_id: str = GLYPH_ID) -> list[float]:
    """Run ``count`` Execute calls; their durations in milliseconds."""
    request = python_pb2.PythonExecuteRequest(code=CODE, glyph_id=glyph_id)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = stub.Execute(request, timeout=CALL_TIMEOUT)
        times.append((time.perf_counter() - started) * 1000)
        if not response.success:
            raise RuntimeError(f"the provider failed to run {CODE!r}: {response.error}")
    return times


def hop_timed_calls(plugin: domain_pb2_grpc.DomainPluginServiceStub, count: int) -> list[float]:
    """``count`` Health calls, which touch no kernel: the cost of the gRPC hop alone, in ms."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        plugin.Health(domain_pb2.Empty(), timeout=CALL_TIMEOUT)
        times.append((time.perf_counter() - started) * 1000)
    return times


# --- measuring and reporting ------------------------------------------------------------------


def interleaved(
    baseline: Callable[[int], list[float]], provider: Callable[[int], list[float]], runs: int
) -> tuple[list[float], list[float]]:
    """``runs`` timings of each, taken in BLOCKS alternating blocks (ABBA...)."""
    base_times: list[float] = []
    prov_times: list[float] = []
    sizes = [runs // BLOCKS + (1 if i < runs % BLOCKS else 0) for i in range(BLOCKS)]
    for block, size in enumerate(sizes):
        if block % 2 == 0:
            base_times += baseline(size)
            prov_times += provider(size)
        else:
            prov_times += provider(size)
            base_times += baseline(size)
    return base_times, prov_times


def percentiles(times: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49], cuts[98]


def first_runs(stub: python_pb2_grpc.PythonServiceStub, plugin: domain_pb2_grpc.DomainPluginServiceStub) -> list[float]:
    """First runs of new glyphs once the provider has settled (its warm pool refilled), in ms."""
    times = []
    for index in range(FIRST_RUNS):
        wait_until_pool_is_full(plugin)
        times += provider_timed_calls(stub, 1, glyph_id=f"first-run-{index}")
    return times


def wait_until_pool_is_full(plugin: domain_pb2_grpc.DomainPluginServiceStub) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        details = plugin.Health(domain_pb2.Empty(), timeout=CALL_TIMEOUT).details
        if int(details.get("pooled_kernels", "0")) >= int(details.get("pool_size", "1")):
            return
        time.sleep(0.05)
    raise RuntimeError("the warm pool did not refill within the start timeout")


def first_run_after_initialize(kernel: str) -> float:
    """A new glyph's first run sent the moment Initialize returns, in ms (Initialize included)."""
    with running_provider(kernel, initialize=False) as (stub, plugin, _, _):
        plugin.Health(domain_pb2.Empty(), timeout=START_TIMEOUT, wait_for_ready=True)  # the server is up
        started = time.perf_counter()
        plugin.Initialize(domain_pb2.InitializeRequest(), timeout=START_TIMEOUT)
        provider_timed_calls(stub, 1, glyph_id="first-after-initialize")
        return (time.perf_counter() - started) * 1000


def raw_kernel_start(kernel: str) -> float:
    """One kernel started and ready with jupyter_client alone, in ms."""

    async def start() -> float:
        manager = AsyncKernelManager(kernel_name=kernel)
        started = time.perf_counter()
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=START_TIMEOUT)
            return (time.perf_counter() - started) * 1000
        finally:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    return asyncio.run(start())


def report(
    kernel: str,
    runs: int,
    base_times: list[float],
    prov_times: list[float],
    hop_times: list[float],
    base_cpu: CPUMeter,
    prov_cpu: CPUMeter,
    settled_first: list[float],
    after_initialize: list[float],
    raw_starts: list[float],
) -> None:
    base_p50, base_p99 = percentiles(base_times)
    prov_p50, prov_p99 = percentiles(prov_times)
    print(f"execute latency of {CODE!r}, kernelspec {kernel!r}, {runs} calls each (after {WARMUP_CALLS} warm-up)")
    print(f"{'':<22}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms':>9}")
    print(f"{'jupyter_client':<22}{base_p50:>9.3f}{base_p99:>9.3f}{base_cpu.ms_per_call:>9.3f}")
    print(f"{'provider (gRPC)':<22}{prov_p50:>9.3f}{prov_p99:>9.3f}{prov_cpu.ms_per_call:>9.3f}")
    print(f"{'ratio provider/base':<22}{prov_p50 / base_p50:>9.2f}{prov_p99 / base_p99:>9.2f}")
    hop_p50, hop_p99 = percentiles(hop_times)
    # The hop is what any gRPC plugin pays; what is left is the provider's own work.
    print(f"{'gRPC hop (Health)':<22}{hop_p50:>9.3f}{hop_p99:>9.3f}")
    print(f"{'(provider-hop)/base':<22}{(prov_p50 - hop_p50) / base_p50:>9.2f}")
    steady = statistics.median(prov_times)
    settled = statistics.median(settled_first)
    initialize = statistics.median(after_initialize)
    raw_start = statistics.median(raw_starts)
    print(f"first run of a new glyph, settled: {settled:.1f} ms = {settled / steady:.2f}x a steady run")
    print(
        f"first run right after Initialize: {initialize:.1f} ms = {initialize / raw_start:.2f}x a raw kernel start "
        f"({raw_start:.1f} ms)"
    )
    print(f"p50 ratio {prov_p50 / base_p50:.2f} (goal <= {GOAL_RATIO:.2f})")
    print(f"provider CPU per Execute {prov_cpu.ms_per_call:.2f} ms (goal <= {GOAL_CPU_MS:.2f} ms)")
    print(f"first run settled {settled / steady:.2f}x steady (goal <= {GOAL_FIRST_RUN_SETTLED:.1f}x)")
    print(
        f"first run after Initialize {initialize / raw_start:.2f}x a raw kernel start "
        f"(goal <= {GOAL_FIRST_RUN_AFTER_INITIALIZE:.1f}x)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=500, help="timed calls of each side (default 500)")
    parser.add_argument("--kernel", default="python3", help="kernelspec both sides use (default python3)")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    baseline = Baseline(args.kernel)
    try:
        baseline.start()
        with running_provider(args.kernel) as (stub, plugin, pid, _):
            baseline.timed_calls(WARMUP_CALLS)
            provider_timed_calls(stub, WARMUP_CALLS)  # the first call also starts the glyph's kernel
            base_cpu, prov_cpu = CPUMeter(time.process_time), CPUMeter(functools.partial(process_cpu_seconds, pid))
            provider = prov_cpu.wrap(functools.partial(provider_timed_calls, stub))
            base_times, prov_times = interleaved(base_cpu.wrap(baseline.timed_calls), provider, args.runs)
            hop_times = hop_timed_calls(plugin, args.runs)
            settled_first = first_runs(stub, plugin)
        after_initialize, raw_starts = [], []
        for _ in range(3):  # alternated, like the latency blocks
            after_initialize.append(first_run_after_initialize(args.kernel))
            raw_starts.append(raw_kernel_start(args.kernel))
    except Exception as exc:
        print(f"execute_latency: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        baseline.stop()
    report(
        args.kernel,
        args.runs,
        base_times,
        prov_times,
        hop_times,
        base_cpu,
        prov_cpu,
        settled_first,
        after_initialize,
        raw_starts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
