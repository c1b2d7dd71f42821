"""ExecutionResult: the JSON shape QNTX's frontend renders for a py glyph run."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kernel_provider.config import GRPC_MESSAGE_LIMIT

# What one answer may take on any surface: QNTX's 4 MB gRPC ceiling, less room for the
# message framing, headers and the few small fields sent beside the result.
ANSWER_BUDGET_BYTES = GRPC_MESSAGE_LIMIT - 128 * 1024
# Strings shorter than this are never cut: cutting them would save less than the marker costs.
_SHORTEST_CUT = 256
_MARKER_BYTES = 128
# The top-level texts of an ExecutionResult.
TEXT_FIELDS = ("stdout", "stderr", "result", "error")

# Tracebacks from IPython carry terminal colours; QNTX shows error text as plain text.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI_ESCAPE.sub("", text)


@dataclass
class ExecutionResult:
    """One run's answer. ``outputs`` are nbformat v4 output dicts, in order."""

    success: bool
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: str | None = None
    duration_ms: float = 0.0
    execution_count: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_outputs(
        cls,
        outputs: list[dict[str, Any]],
        *,
        execution_count: int | None,
        duration_ms: float,
        failure: str | None = None,
    ) -> ExecutionResult:
        """Derive stdout, stderr, the last value and the error text from the outputs.

        ``failure`` is a reason the provider adds (a timeout, a dead kernel); it
        comes first in ``error``, before any traceback the kernel sent.
        """
        stdout = "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")
        stderr = "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr")
        value = None
        for output in outputs:
            if output["output_type"] == "execute_result":
                value = output.get("data", {}).get("text/plain")
        errors = [format_error(o) for o in outputs if o["output_type"] == "error"]
        if failure is not None:
            errors.insert(0, failure)
        return cls(
            success=not errors,
            stdout=stdout,
            stderr=stderr,
            result=value,
            error="\n\n".join(errors) if errors else None,
            duration_ms=round(duration_ms, 3),
            execution_count=execution_count,
            outputs=outputs,
        )

    @classmethod
    def failed(cls, reason: str, *, duration_ms: float = 0.0) -> ExecutionResult:
        return cls(success=False, error=reason, duration_ms=round(duration_ms, 3))

    def add_notice(self, text: str) -> None:
        """Tell the reader something the provider did (e.g. reset the glyph's state), first on stderr."""
        line = f"[kernel_provider] {text}\n"
        self.outputs.insert(0, {"output_type": "stream", "name": "stderr", "text": line})
        self.stderr = line + self.stderr

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the outputs are only read from here on, so asdict's deep copy is wasted work.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8", "replace")


def format_error(output: dict[str, Any]) -> str:
    """'Name: value' and then the traceback, without terminal colours."""
    head = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
    traceback = strip_ansi("\n".join(output.get("traceback", [])))
    return f"{head}\n{traceback}" if traceback else head


def json_size(value: Any) -> int:
    """Bytes of ``value`` as our answers encode it (UTF-8 JSON, escapes included)."""
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8", "replace"))


def cut_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of JSON, with a marker saying how much went."""
    if json_size(text) <= max_bytes:
        return text
    keep = min(len(text), max_bytes)
    while True:
        marker = f"\n[kernel_provider: {len(text) - keep} more characters cut to fit the 4 MB answer limit]\n"
        cut = text[:keep] + marker
        size = json_size(cut)
        if size <= max_bytes or keep == 0:
            return cut
        # Escapes (control characters take 6 bytes each) make the prefix larger than its length.
        keep = max(0, min(keep - 1, keep * (max_bytes - json_size(marker)) // max(json_size(text[:keep]), 1)))


def fit_result(
    result: ExecutionResult, budget: int = ANSWER_BUDGET_BYTES, *, sent_again: Mapping[str, int] | None = None
) -> ExecutionResult:
    """``result``, or a copy of it cut so that its JSON fits in ``budget`` bytes (see fit_result_json)."""
    return fit_result_json(result, budget, sent_again=sent_again)[0]


def fit_result_json(
    result: ExecutionResult, budget: int = ANSWER_BUDGET_BYTES, *, sent_again: Mapping[str, int] | None = None
) -> tuple[ExecutionResult, bytes]:
    """``result``, or a copy of it cut so that its JSON fits in ``budget`` bytes, and that JSON.

    The JSON is the one measured on the way, so a surface that sends it encodes it once.

    Every surface's answer comes through here. ``sent_again`` names fields the surface
    also sends outside the JSON, and how many more times (Execute sends stdout and error
    again, a job its log lines), so they weigh as much as they cost. The longest texts
    are cut first, each to the same length, each with a marker; when that is not enough
    (a million tiny outputs) the outputs go, replaced by a note, and then the texts again.
    """
    weights = {name: 1 + extra for name, extra in (sent_again or {}).items()}

    def measure(candidate: ExecutionResult) -> tuple[int, bytes]:
        extra = sum((weight - 1) * json_size(getattr(candidate, name) or "") for name, weight in weights.items())
        encoded = candidate.to_json()
        return len(encoded) + extra, encoded

    total, encoded = measure(result)
    if total <= budget:
        return result, encoded
    # A shallow copy: _cut_longest_texts copies each output it cuts before changing it.
    fitted = dataclasses.replace(result, outputs=list(result.outputs))
    for drop_outputs in (False, True):
        if drop_outputs:
            note = "[kernel_provider: outputs left out to fit the 4 MB answer limit]\n"
            fitted.outputs = [{"output_type": "stream", "name": "stderr", "text": note}]
        for _ in range(4):  # each pass measures what the cuts really saved
            total, encoded = measure(fitted)
            if total <= budget:
                return fitted, encoded
            if not _cut_longest_texts(fitted, total - budget, weights):
                break
    fitted.outputs = []
    fitted.stdout, fitted.stderr = "", "[kernel_provider: output left out to fit the 4 MB answer limit]\n"
    fitted.result = None
    fitted.error = cut_text(fitted.error or "", 64 * 1024) or None
    return fitted, fitted.to_json()


def _cut_longest_texts(result: ExecutionResult, excess: int, weights: Mapping[str, int]) -> bool:
    """Cut the longest strings of ``result`` to one common length so that about ``excess`` bytes go.

    False when there is no string long enough to cut.
    """
    slots: list[tuple[Any, Any, int]] = [(result.__dict__, name, weights.get(name, 1)) for name in TEXT_FIELDS]
    for index, output in enumerate(result.outputs):
        if any(len(holder[key]) > _SHORTEST_CUT for holder, key in _string_slots(output)):
            result.outputs[index] = output = copy.deepcopy(output)
            slots += [(holder, key, 1) for holder, key in _string_slots(output)]
    long_ones = []  # (holder, key, weight, weighted size)
    for holder, key, weight in slots:
        text = holder[key]
        if isinstance(text, str) and len(text) > _SHORTEST_CUT:
            long_ones.append((holder, key, weight, json_size(text) * weight))
    if not long_ones:
        return False

    def freed(cap: int) -> int:
        return sum(size - cap - _MARKER_BYTES * weight for _, _, weight, size in long_ones if size > cap)

    # The common (weighted) length: the largest that frees enough once every longer text is cut to it.
    low, high = 0, max(size for *_, size in long_ones)
    while low < high:
        cap = (low + high + 1) // 2
        low, high = (cap, high) if freed(cap) >= excess else (low, cap - 1)
    for holder, key, weight, size in long_ones:
        if size > low:
            holder[key] = cut_text(holder[key], low // weight)
    return True


def _string_slots(value: dict | list) -> list[tuple[Any, Any]]:
    """(container, key) of every string inside nested lists and dicts."""
    slots: list[tuple[Any, Any]] = []
    pending = [value]
    while pending:
        container = pending.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(item, str):
                slots.append((container, key))
            elif isinstance(item, dict | list):
                pending.append(item)
    return slots
