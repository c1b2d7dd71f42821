"""Execute latency through a Jupyter Kernel Gateway, as a ratio to local kernels in the same run.

Starts a Kernel Gateway on 127.0.0.1 (random port, a token) and two providers launched as
QNTX launches them: one with local kernels, one with ``--gateway-url``. Both run a trivial
statement (``1+1``) on one glyph each, over one reused gRPC channel each, warmed up, then
in alternating blocks (the order flipping from block to block) so that machine noise falls
on both alike. Prints p50 and p99 of each and the gateway/local ratios, then the first run
of new glyphs (a kernel start included; no warm pool on either side). A measurement, not a
test: it exits 0 whatever the numbers.

    python benchmarks/gateway_latency.py [--runs N] [--gateway-nodelay]

``--gateway-nodelay`` runs the gateway with TCP_NODELAY on its websockets (see the README's
"Kernels on a Jupyter gateway" section), to show what the gateway's side of Nagle costs.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

BIN = Path(sys.executable).parent
CODE = "1+1"
WARMUP_CALLS = 20
BLOCKS = 10
FIRST_RUNS = 3
# A gateway config that turns Nagle's algorithm off on every websocket the gateway serves.
NODELAY_CONFIG = """\
# Nagle's algorithm off on every websocket this gateway serves (tornado leaves it on).
from tornado.websocket import WebSocketHandler

_detach_stream = WebSocketHandler._detach_stream


def _detach_stream_without_nagle(self):
    stream = _detach_stream(self)
    stream.set_nodelay(True)
    return stream


WebSocketHandler._detach_stream = _detach_stream_without_nagle
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(folder: Path, nodelay: bool) -> tuple[subprocess.Popen, str, str]:
    port, token = free_port(), secrets.token_hex(16)
    command = [
        str(BIN / "jupyter-kernelgateway"),
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--KernelGatewayApp.auth_token={token}",
        "--JupyterWebsocketPersonality.list_kernels=True",
    ]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(folder / "runtime")}
    if nodelay:
        (folder / "config").mkdir()
        (folder / "config" / "jupyter_kernel_gateway_config.py").write_text(NODELAY_CONFIG)
        env["JUPYTER_CONFIG_DIR"] = str(folder / "config")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(url + "/api/kernelspecs", headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(request, timeout=5).read()
            return process, url, token
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the Kernel Gateway did not start") from None
            time.sleep(0.2)


class Provider:
    def __init__(self, folder: Path, *args: str):
        command = [str(BIN / "qntx-python-plugin"), "--port", "0", "--connection-dir", str(folder), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("QNTX_PLUGIN_PORT="):
            raise SystemExit(f"provider did not start: {line!r}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{line.strip().split('=', 1)[1]}")
        domain_pb2_grpc.DomainPluginServiceStub(self.channel).Initialize(domain_pb2.InitializeRequest(), timeout=60)
        self.python = python_pb2_grpc.PythonServiceStub(self.channel)

    def execute(self, glyph: str, code: str = CODE) -> float:
        started = time.perf_counter()
        response = self.python.Execute(python_pb2.PythonExecuteRequest(code=code, glyph_id=glyph), timeout=120)
        elapsed = time.perf_counter() - started
        if not response.success:
            raise SystemExit(f"run failed: {response.error}")
        return elapsed

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=400, help="measured calls per side (default 400)")
    parser.add_argument("--gateway-nodelay", action="store_true", help="TCP_NODELAY on the gateway's websockets")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        gateway, url, token = start_gateway(folder, args.gateway_nodelay)
        local = remote = None
        try:
            local = Provider(folder / "local", "--pool-size", "0")
            remote = Provider(
                folder / "remote",
                *("--gateway-url", url, "--gateway-token", token, "--state-dir", str(folder / "state")),
            )
            sides = {"local": local, "gateway": remote}
            first = {name: [p.execute(f"first-{i}") for i in range(FIRST_RUNS)] for name, p in sides.items()}
            for provider in sides.values():
                for _ in range(WARMUP_CALLS):
                    provider.execute("bench")
            times: dict[str, list[float]] = {name: [] for name in sides}
            per_block = max(args.runs // BLOCKS, 1)
            for block in range(BLOCKS):
                order = list(sides) if block % 2 == 0 else list(reversed(sides))
                for name in order:
                    times[name].extend(sides[name].execute("bench") for _ in range(per_block))
        finally:
            for provider in (local, remote):
                if provider is not None:
                    provider.stop()
            gateway.terminate()
            gateway.wait(timeout=30)
    nagle = "TCP_NODELAY on" if args.gateway_nodelay else "Nagle on (as released)"
    print(f"Execute {CODE!r}, {per_block * BLOCKS} calls per side; gateway websockets: {nagle}")
    for name, values in times.items():
        p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
        print(f"  {name:8s} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ratio = percentile(times["gateway"], q) / percentile(times["local"], q)
        print(f"  gateway/local {label}: {ratio:.2f}x")
    print(f"First run of a new glyph (kernel start included, no warm pool), median of {FIRST_RUNS}:")
    for name, values in first.items():
        print(f"  {name:8s} {statistics.median(values) * 1000:7.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
