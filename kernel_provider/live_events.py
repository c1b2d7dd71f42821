"""The live events of a run as both live surfaces send them, each within the 4 MB limit.

While code runs, the output collector reports each output it keeps, each clear_output and
each update_display_data (see execution.OutputCollector). ExecuteStream and the websocket
carry the same events; this module turns one into what they send: the output as JSON,
once. JSON escapes a control character as six bytes (\\u0001), so an output can grow past
gRPC's 4 MB message limit on the way: a stream chunk that would is split into several
chunks, and any other output that would is replaced by a line on stderr saying so (the
run's final answer has the output, or says it left it out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kernel_provider.config import GRPC_MESSAGE_LIMIT

# The most an event's output JSON may take; the rest of the 4 MB carries the event's other
# fields (glyph id, request id, display id) and the message framing.
EVENT_OUTPUT_LIMIT = GRPC_MESSAGE_LIMIT - 64 * 1024
# What JSON makes of one character at most, in UTF-8 bytes (a control character as \u0001).
MAX_ESCAPED_CHARACTER_BYTES = 6
# Room for a stream output's own keys beside its text.
STREAM_OVERHEAD_BYTES = 256


@dataclass(frozen=True)
class LiveEvent:
    """One live event: an output, a clear_output, or an update of a display."""

    kind: str  # "output", "clear_output" or "update_display_data"
    output: bytes = b""  # the nbformat v4 output as UTF-8 JSON; empty for clear_output
    display_id: str | None = None
    wait: bool = False  # clear_output only: clear when the next output arrives


def live_events(event: dict[str, Any], limit: int = EVENT_OUTPUT_LIMIT) -> list[LiveEvent]:
    """What to send for one event of the collector: usually one LiveEvent, more for a huge stream chunk."""
    if event["type"] == "clear_output":
        return [LiveEvent("clear_output", wait=event["wait"])]
    output = event["output"]
    body = output_json(output)
    if len(body) <= limit:
        return [LiveEvent(event["type"], body, event.get("display_id"))]
    if output["output_type"] == "stream":
        step = max((limit - STREAM_OVERHEAD_BYTES) // MAX_ESCAPED_CHARACTER_BYTES, 1)
        text = output["text"]
        return [
            LiveEvent("output", output_json({**output, "text": text[start : start + step]}))
            for start in range(0, len(text), step)
        ]
    notice = {
        "output_type": "stream",
        "name": "stderr",
        "text": (
            f"[kernel_provider: a {output['output_type']} output of {len(body)} bytes of JSON was left out "
            f"of the live events: it is over the {limit}-byte message limit]\n"
        ),
    }
    return [LiveEvent("output", output_json(notice))]


def output_json(output: dict[str, Any]) -> bytes:
    # Kernels can send lone surrogates; they become "?" rather than fail the run.
    return json.dumps(output, ensure_ascii=False).encode("utf-8", "replace")
