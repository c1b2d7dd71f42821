"""The provider's own memory under hostile output: resident and peak, from /proc, after each kind of run.

The plugin is launched as QNTX launches it (``qntx-python-plugin --port 0``, the port read from
its stdout line); each hostile run is sent three times on one glyph. Run it from the project root:

    python benchmarks/provider_memory.py

It prints one line per step: the provider's RSS and its peak RSS (VmHWM) so far, in MB.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc, python_pb2, python_pb2_grpc

HOSTILE_RUNS = [
    'raise ValueError("E" * 5_000_000)',
    'print("\\x01" * 900_000)',
    "for i in range(80000): print(i)",
]


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    plugin = Path(sys.executable).parent / "qntx-python-plugin"
    folder = Path(tempfile.mkdtemp()) / "conn"
    command = [str(plugin), "--port", "0", "--pool-size", "0", "--connection-dir", str(folder)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=process.stderr.read, daemon=True).start()  # drain the log
    try:
        port = int(process.stdout.readline().strip().split("=", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            domain_pb2_grpc.DomainPluginServiceStub(channel).Initialize(domain_pb2.InitializeRequest(), timeout=60)
            python = python_pb2_grpc.PythonServiceStub(channel)

            def execute(code: str) -> None:
                python.Execute(python_pb2.PythonExecuteRequest(code=code, glyph_id="memory"), timeout=120)

            execute("1")
            rss, peak = memory_mb(process.pid)
            print(f"after a first run:           RSS {rss:6.1f} MB, peak {peak:6.1f} MB")
            for code in HOSTILE_RUNS:
                for _ in range(3):
                    execute(code)
                rss, peak = memory_mb(process.pid)
                print(f"after 3 x {code[:20]:20s}: RSS {rss:6.1f} MB, peak {peak:6.1f} MB")
    finally:
        process.terminate()
        process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
