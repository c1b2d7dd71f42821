"""Kernel start in the sandbox against an unsandboxed start, measured in the same run.

One start is what a glyph waits for when no pooled kernel is ready: ``start_kernel()`` of a
``jupyter_client.AsyncKernelManager`` until its client has the kernel's ``kernel_info_reply``
(``wait_for_ready``). The two kinds alternate (the order flipping each round) so that machine
noise falls on both alike; the script prints the median and p90 of each and the
sandboxed/unsandboxed ratio of the medians (goal: at most 1.10). It is a measurement, not a test:
it exits 0 whatever the numbers, and non-zero only when a kernel fails to start.

Run it from the project root:

    python benchmarks/sandbox_start.py [--rounds N] [--kernel NAME] [--memory-limit MB]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from jupyter_client import AsyncKernelManager

from kernel_provider.kernels.local import KERNEL_CONFIG
from kernel_provider.kernels.sandbox import SandboxedKernelSpecs, sandbox_problem

GOAL_RATIO = 1.10
READY_TIMEOUT = 60.0


async def start_and_stop(kernel: str, folder: Path, specs: SandboxedKernelSpecs | None) -> float:
    """Seconds from start_kernel() to the kernel's first kernel_info_reply; the kernel is then stopped."""
    name = uuid.uuid4().hex[:8]
    options = {"kernel_spec_manager": specs} if specs is not None else {}
    manager = AsyncKernelManager(
        kernel_name=kernel,
        connection_file=str(folder / f"kernel-{name}.json"),
        transport="ipc",
        ip=str(folder / f"ipc-{name}"),
        **options,
    )
    # The IPython profile the provider gives its kernels (history in memory), for both kinds.
    environment = {**os.environ, "IPYTHONDIR": str(folder / "ipython")}
    started = time.perf_counter()
    await manager.start_kernel(env=environment)
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=READY_TIMEOUT)
        return time.perf_counter() - started
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="starts of each kind (default 20)")
    parser.add_argument("--kernel", default="python3", help="kernelspec (default python3)")
    parser.add_argument("--memory-limit", type=int, default=0, help="the sandbox's --kernel-memory-limit (MB)")
    args = parser.parse_args()
    problem = sandbox_problem()
    if problem is not None:
        print(f"sandbox_start: cannot sandbox kernels here: {problem}", file=sys.stderr)
        return 1
    specs = SandboxedKernelSpecs(sandbox_config={"network": "none", "memory_limit_mb": args.memory_limit})
    times: dict[str, list[float]] = {"unsandboxed": [], "sandboxed": []}
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as folder:
        profile = Path(folder) / "ipython" / "profile_default"
        profile.mkdir(parents=True)
        (profile / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)
        await start_and_stop(args.kernel, Path(folder), None)  # warm the disk cache for both
        await start_and_stop(args.kernel, Path(folder), specs)
        for round_number in range(args.rounds):
            kinds = [("unsandboxed", None), ("sandboxed", specs)]
            for kind, kind_specs in kinds if round_number % 2 == 0 else reversed(kinds):
                times[kind].append(await start_and_stop(args.kernel, Path(folder), kind_specs))
    print(f"kernel start + ready, {args.rounds} of each, kernelspec {args.kernel}:")
    print(f"{'':14} {'median ms':>10} {'p90 ms':>10}")
    for kind, values in times.items():
        print(f"{kind:14} {statistics.median(values) * 1000:10.0f} {percentile(values, 0.9) * 1000:10.0f}")
    ratio = statistics.median(times["sandboxed"]) / statistics.median(times["unsandboxed"])
    print(f"ratio (median): {ratio:.3f} (goal <= {GOAL_RATIO:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
