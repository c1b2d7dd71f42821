"""Each glyph's runs in order (code, outputs, execution count), kept to export its session as a notebook.

Bounded three ways: the last MAX_RUNS_PER_GLYPH runs of a glyph, at most
MAX_BYTES_PER_GLYPH of code and outputs per glyph (so its notebook fits QNTX's 4 MB
gRPC answer), and MAX_GLYPHS glyphs (the one that ran longest ago is forgotten first).
A run whose outputs alone are over the byte bound keeps its code and a note instead.
The record lives in the provider's memory: like the glyph sessions, it does not
survive a provider restart.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from kernel_provider.results import ExecutionResult

MAX_RUNS_PER_GLYPH = 200
MAX_BYTES_PER_GLYPH = 2 * 1024 * 1024
MAX_GLYPHS = 1000


@dataclass(frozen=True)
class Run:
    code: str
    outputs: list[dict[str, Any]]
    execution_count: int | None
    kernel_name: str
    size: int  # bytes of code and outputs as JSON, what the bound counts
    number: int  # 1 for the glyph's first recorded run, and so on: a stable cell id


def _size(code: str, outputs: list[dict[str, Any]]) -> int:
    return len(code.encode("utf-8", "replace")) + len(
        json.dumps(outputs, ensure_ascii=False).encode("utf-8", "replace")
    )


class SessionHistory:
    def __init__(
        self,
        max_runs: int = MAX_RUNS_PER_GLYPH,
        max_bytes: int = MAX_BYTES_PER_GLYPH,
        max_glyphs: int = MAX_GLYPHS,
    ):
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self.max_glyphs = max_glyphs
        self._runs: OrderedDict[str, deque[Run]] = OrderedDict()
        self._bytes: dict[str, int] = {}

    def record(self, glyph_id: str, kernel_name: str, code: str, result: ExecutionResult) -> None:
        outputs = result.outputs
        size = _size(code, outputs)
        if size > self.max_bytes:
            note = f"[kernel_provider] this run's outputs ({size} bytes) were too large to keep in the notebook.\n"
            outputs = [{"output_type": "stream", "name": "stderr", "text": note}]
            size = _size(code, outputs)
        runs = self._runs.pop(glyph_id, None) or deque()
        self._runs[glyph_id] = runs  # most recently run last
        number = runs[-1].number + 1 if runs else 1
        runs.append(Run(code, outputs, result.execution_count, kernel_name, size, number))
        total = self._bytes.get(glyph_id, 0) + size
        while runs and (len(runs) > self.max_runs or total > self.max_bytes):
            total -= runs.popleft().size
        self._bytes[glyph_id] = total
        while len(self._runs) > self.max_glyphs:
            oldest, _ = self._runs.popitem(last=False)
            self._bytes.pop(oldest, None)

    def runs(self, glyph_id: str) -> list[Run]:
        return list(self._runs.get(glyph_id, ()))

    def forget(self, glyph_id: str) -> None:
        self._runs.pop(glyph_id, None)
        self._bytes.pop(glyph_id, None)
