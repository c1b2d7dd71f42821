"""PythonService: the gRPC face of a glyph run (ADR-022's Execute, and ExecuteStream)."""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from typing import Any

import grpc

from kernel_provider.live_events import LiveEvent, live_events
from kernel_provider.proto import python_pb2, python_pb2_grpc
from kernel_provider.provider import Provider
from kernel_provider.reply_queue import ReplyQueue
from kernel_provider.results import ExecutionResult, fit_result_json
from kernel_provider.sessions import ProviderClosing, RunRequest

log = logging.getLogger(__name__)

MAX_GLYPH_ID_LENGTH = 256
# Time kept back from a gRPC deadline so that the interrupted run can still be answered.
DEADLINE_MARGIN_SECONDS = 0.5


class BadRequest(ValueError):
    """A request we refuse; the message is one sentence saying what is wrong."""


def validate_glyph_id(glyph_id: str) -> str:
    if len(glyph_id) > MAX_GLYPH_ID_LENGTH:
        raise BadRequest(f"glyph_id is {len(glyph_id)} characters long; at most {MAX_GLYPH_ID_LENGTH} are allowed.")
    if any(unicodedata.category(ch) == "Cc" for ch in glyph_id):
        raise BadRequest("glyph_id must not contain control characters.")
    return glyph_id


def validate_code(code: str) -> str:
    if not code.strip():
        raise BadRequest("code is empty: send the Python source to run.")
    return code


def load_json(raw: bytes, what: str) -> Any:
    """Decode a JSON document from a request, or raise BadRequest saying what is wrong with it.

    Every JSON entry point (upstream, HTTP bodies, job payloads, websocket data) comes
    through here, so each refuses the same hostile inputs the same way: bytes that are
    not UTF-8, nesting deep enough to exhaust the parser, and escaped lone surrogates
    ("\\ud800"), which decode to text that cannot be sent on to a kernel.
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc.msg} at byte {exc.pos}).") from None
    except RecursionError:
        raise BadRequest(f"{what} is JSON nested too deeply to decode.") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} holds a lone surrogate escape (such as \\ud800), which is not valid text.") from None
    except RecursionError:
        raise BadRequest(f"{what} is JSON nested too deeply to decode.") from None
    return value


def decode_upstream(raw: bytes) -> Any:
    """The attestation QNTX sent, as a dict; None when it sent nothing."""
    if not raw:
        return None
    value = load_json(raw, "upstream_attestation")
    if value is not None and not isinstance(value, dict):
        raise BadRequest(f"upstream_attestation must be a JSON object, got a JSON {type(value).__name__}.")
    return value


def parse_request(glyph_id: str, code: str, upstream: bytes) -> tuple[str, str, Any]:
    """(glyph_id, code, decoded upstream) of a run request; raises BadRequest. Every entry point uses it."""
    return validate_glyph_id(glyph_id), validate_code(code), decode_upstream(upstream)


def to_response(result: ExecutionResult) -> python_pb2.PythonExecuteResponse:
    """Build the wire answer, keeping it under gRPC's 4 MB default whatever the kernel said."""
    # stdout and the error text travel twice: in their own fields and inside `result`.
    result, encoded = fit_result_json(result, sent_again={"stdout": 1, "error": 1})
    return python_pb2.PythonExecuteResponse(
        success=result.success,
        output=_valid_text(result.stdout),
        error=_valid_text(result.error or ""),
        result=encoded,
    )


def _valid_text(text: str) -> str:
    # Kernels can send lone surrogates; protobuf strings must be valid UTF-8.
    return text.encode("utf-8", "replace").decode("utf-8")


def run_timeout(provider: Provider, context: grpc.aio.ServicerContext) -> float:
    """The configured timeout, or QNTX's gRPC deadline when that is sooner."""
    timeout = provider.settings.execute_timeout
    remaining = context.time_remaining()
    if remaining is not None:
        timeout = min(timeout, max(remaining - DEADLINE_MARGIN_SECONDS, 0.1))
    return timeout


class PythonServicer(python_pb2_grpc.PythonServiceServicer):
    def __init__(self, provider: Provider):
        self.provider = provider

    async def _run_request(
        self, request: python_pb2.PythonExecuteRequest, context: grpc.aio.ServicerContext
    ) -> tuple[str, RunRequest]:
        """The glyph and the run a request asks for; a bad request is aborted with INVALID_ARGUMENT."""
        try:
            glyph_id, code, upstream = parse_request(request.glyph_id, request.code, request.upstream_attestation)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return glyph_id, self.provider.run_request(code, upstream, run_timeout(self.provider, context))

    async def Execute(self, request: python_pb2.PythonExecuteRequest, context: grpc.aio.ServicerContext):
        glyph_id, run = await self._run_request(request, context)
        try:
            result = await self.provider.sessions.execute(glyph_id, run)
        except ProviderClosing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again once it is back.")
        return to_response(result)

    async def ExecuteStream(self, request: python_pb2.PythonExecuteRequest, context: grpc.aio.ServicerContext):
        """Execute, answered as it goes: one event per live event, then `done` with Execute's answer.

        A client that reads more slowly than the run writes loses live events, not memory:
        see reply_queue.py. Cancelling the stream interrupts the run; the glyph keeps its kernel.
        """
        glyph_id, run = await self._run_request(request, context)
        replies: ReplyQueue[python_pb2.PythonExecuteEvent | None] = ReplyQueue(_dropped_event)

        def on_event(event: dict[str, Any]) -> None:
            for live in live_events(event):
                message = _stream_event(live)
                replies.put_live(glyph_id, message, message.ByteSize())

        run.on_event = on_event
        task = asyncio.ensure_future(self.provider.sessions.execute(glyph_id, run))
        # Queued after every event, since the run only ends once the kernel is idle.
        task.add_done_callback(lambda _: replies.put(None, 0, key=glyph_id))
        try:
            while (event := await replies.get()) is not None:
                yield event
            try:
                result = task.result()
            except ProviderClosing as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again once it is back.")
            yield python_pb2.PythonExecuteEvent(done=to_response(result))
        finally:
            if not task.done():
                task.cancel()  # the client went away: interrupt the run


def _stream_event(live: LiveEvent) -> python_pb2.PythonExecuteEvent:
    if live.kind == "clear_output":
        return python_pb2.PythonExecuteEvent(clear_output=python_pb2.PythonClearOutput(wait=live.wait))
    event = python_pb2.PythonExecuteEvent(display_id=live.display_id or "")
    if live.kind == "update_display_data":
        event.update_display_data = live.output
    else:
        event.output = live.output
    return event


def _dropped_event(_run: object, events: int, nbytes: int) -> tuple[python_pb2.PythonExecuteEvent, int]:
    event = python_pb2.PythonExecuteEvent(dropped=python_pb2.PythonDroppedEvents(events=events, bytes=nbytes))
    return event, event.ByteSize()
