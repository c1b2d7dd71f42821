"""ExecutionResult: the JSON shape QNTX's frontend renders for a py glyph run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

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
