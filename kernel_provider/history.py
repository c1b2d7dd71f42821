"""Each glyph's runs in order (code, outputs, execution count), kept to export its session as a notebook.

Bounded three ways: the last MAX_RUNS_PER_GLYPH runs of a glyph, at most
MAX_BYTES_PER_GLYPH of code and outputs per glyph (so its notebook fits QNTX's 4 MB
gRPC answer), and MAX_GLYPHS glyphs (the one that ran longest ago is forgotten first).
A run whose outputs alone are over the byte bound keeps its code and a note instead.

Where glyph sessions survive a provider restart (kernels on a gateway, issue 11), the record
does too: each glyph's runs are also written to a file of their own in the state folder,
and read back when the provider starts. With local kernels, which a restart replaces, the
record lives in memory only, like the kernels themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_provider.config import ensure_private_dir
from kernel_provider.results import ExecutionResult

log = logging.getLogger(__name__)

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
        folder: Path | None = None,
    ):
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self.max_glyphs = max_glyphs
        self._runs: OrderedDict[str, deque[Run]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        # Where the record outlives the provider (see the module's docstring); None: memory only.
        self.folder = folder
        self._folder_ready = False
        # Read only a folder of our own; it is made (0700) at the first save, after the gateway
        # backend has checked that the state folder around it is ours.
        if folder is not None and folder.is_dir() and folder.stat().st_uid == os.getuid():
            self._load()

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
            self.forget(oldest)
        self._save(glyph_id)

    def runs(self, glyph_id: str) -> list[Run]:
        return list(self._runs.get(glyph_id, ()))

    def forget(self, glyph_id: str) -> None:
        self._runs.pop(glyph_id, None)
        self._bytes.pop(glyph_id, None)
        if self.folder is not None:
            self._file(glyph_id).unlink(missing_ok=True)

    # --- the record on disk -------------------------------------------------------------------

    def _file(self, glyph_id: str) -> Path:
        # Named by a hash: a glyph id never becomes a path.
        assert self.folder is not None
        return self.folder / f"history-{hashlib.sha256(glyph_id.encode('utf-8', 'replace')).hexdigest()[:32]}.json"

    def _save(self, glyph_id: str) -> None:
        if self.folder is None or glyph_id not in self._runs:
            return
        path = self._file(glyph_id)
        temporary = path.with_suffix(".tmp")
        record = {"glyph_id": glyph_id, "runs": [dataclasses.asdict(run) for run in self._runs[glyph_id]]}
        try:
            if not self._folder_ready:
                ensure_private_dir(self.folder)
                self._folder_ready = True
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, ensure_ascii=False)
            os.replace(temporary, path)
        except (OSError, ValueError) as exc:  # the notebook is a convenience: a run never fails for it
            log.warning("could not save the run history of glyph %r: %s", glyph_id, exc)

    def _load(self) -> None:
        assert self.folder is not None
        files = sorted(self.folder.glob("history-*.json"), key=lambda f: f.stat().st_mtime)
        for path in files[-self.max_glyphs :]:  # the most recently written last, as in memory
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                runs = deque(Run(**run) for run in record["runs"])
                glyph_id = record["glyph_id"]
                if not isinstance(glyph_id, str) or path != self._file(glyph_id):
                    raise ValueError("the file does not belong to its glyph")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring the unreadable run history %s: %s", path.name, exc)
                continue
            while len(runs) > self.max_runs:
                runs.popleft()
            self._runs[glyph_id] = runs
            self._bytes[glyph_id] = sum(run.size for run in runs)
