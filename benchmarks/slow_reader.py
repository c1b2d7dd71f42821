"""Memory: a websocket client that sends runs and stops reading (issue 9, point 10).

Through the QNTX-like bridge of the tests, a page sends ``--runs`` runs that each print
about 1 MB, and never reads. After ``--wait`` seconds it prints how many of them ran and
how much the provider's resident memory grew. A provider that held every reply would grow
by about 3 MB per run (the live events and the result); ours holds its reply queue and
the results of the requests it took on. Run it from the project root:

    python benchmarks/slow_reader.py [--runs 60] [--wait 30]

To measure another checkout's provider, put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qntx_bridge import QntxBridge  # noqa: E402

from conftest import launch  # noqa: E402

RUN = "runs_done += 1\nfor _ in range(100):\n    print('x' * 10_000)\n"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to let the provider work")
    args = parser.parse_args()
    plugin = launch(Path(tempfile.mkdtemp()) / "conn", "--pool-size", "0")
    try:
        bridge = QntxBridge(plugin.channel)
        bridge.send({"glyph_id": "reader", "code": "runs_done = 0"})
        bridge.receive_until("result")
        before = rss_bytes(plugin.process.pid)
        bridge.stop_reading()
        for n in range(args.runs):
            bridge.send({"id": n, "glyph_id": "reader", "code": RUN})
        time.sleep(args.wait)
        grown = rss_bytes(plugin.process.pid) - before
        done = plugin.run("runs_done", "reader")["result"]
        print(f"runs sent {args.runs}, ran while unread {done}, provider RSS grew {grown / 2**20:.0f} MB")
        bridge.close()
    finally:
        plugin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
