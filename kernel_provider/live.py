"""Live runs over DomainPluginService.HandleWebSocket; the protocol is in the README ("Live output").

QNTX bridges a browser's socket to this stream and passes only DATA messages on to the
browser; an ERROR message from us makes QNTX close the browser's socket. So every answer
is a DATA message holding a JSON object, a refused request included, and we never send
ERROR. A request is a DATA message holding a JSON object: a run
``{"id"?, "glyph_id", "code", "upstream"?}``, or ``{"id"?, "action": NAME, ...}`` for the
request kinds in ACTIONS. A run is answered with its live events (output, clear_output,
update_display_data) in the order the kernel sent them, then its result; every answer
carries the request's ``id`` when it had one. PING is answered with PONG at any time, also
during a run. CLOSE, or the stream being cancelled, ends the socket and interrupts its
runs; a client that only stops sending (a half-close) still gets the answers of its runs.

A client that reads more slowly than its runs write loses live events, never results:
see reply_queue.py. While its reply queue is full we stop reading its requests, so gRPC's
flow control holds them back, and at most MAX_REQUESTS_IN_PROGRESS of its requests are
under way at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import grpc

from kernel_provider.live_events import EVENT_OUTPUT_LIMIT, LiveEvent, live_events
from kernel_provider.packages import answer_install_action, install_action
from kernel_provider.proto import domain_pb2
from kernel_provider.provider import Provider
from kernel_provider.python_service import BadRequest, load_json, parse_request, run_timeout, to_response
from kernel_provider.reply_queue import ReplyQueue
from kernel_provider.sessions import ProviderClosing

log = logging.getLogger(__name__)

Message = domain_pb2.WebSocketMessage
Type = Message.Type

# Requests of one socket under way at once; one more is refused with an error answer.
MAX_REQUESTS_IN_PROGRESS = 16
# The longest request id we echo, as JSON.
MAX_ID_LENGTH = 256

# Request kinds besides runs, by their "action": each gets the provider and the request
# object, and returns the answer object (with its own "type"); BadRequest refuses it.
Action = Callable[[Provider, dict[str, Any]], Awaitable[dict[str, Any]]]
ACTIONS: dict[str, Action] = {}

_SHAPE = 'a DATA message must be a JSON object such as {"glyph_id": "g1", "code": "1 + 1"}.'


def parse_object(data: bytes) -> dict[str, Any]:
    """The JSON object of a DATA message; raises BadRequest with a sentence."""
    try:
        body = load_json(data, "DATA")
    except BadRequest as exc:
        raise BadRequest(f"{exc} {_SHAPE[0].upper()}{_SHAPE[1:]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"DATA is a JSON {type(body).__name__}: {_SHAPE}")
    return body


def request_id(body: dict[str, Any]) -> Any:
    """The request's "id" (None when it has none); an id we could not echo is refused."""
    value = body.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f'"id" must be a string or a number, got a JSON {type(value).__name__}.')
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest('"id" must be a finite number.')
    if len(json.dumps(value)) > MAX_ID_LENGTH:
        raise BadRequest(f'"id" is too long: at most {MAX_ID_LENGTH} characters of JSON are echoed.')
    return value


def parse_run(body: dict[str, Any]) -> tuple[str, str, Any]:
    """(glyph_id, code, upstream) of a run request; raises BadRequest with a sentence."""
    code, glyph_id = body.get("code"), body.get("glyph_id", "")
    if not isinstance(code, str):
        raise BadRequest(f'DATA has no "code" string to run: {_SHAPE}')
    if not isinstance(glyph_id, str):
        raise BadRequest(f'"glyph_id" must be a string: {_SHAPE}')
    upstream = body.get("upstream")
    raw_upstream = b"" if upstream is None else json.dumps(upstream).encode()
    return parse_request(glyph_id, code, raw_upstream)


def answer(fields: dict[str, Any], request: Any = None, **raw_json: bytes) -> Message:
    """A DATA message of ``fields``, the request's id, and ``raw_json`` values spliced in as they are.

    The spliced values (outputs, results) are JSON already: re-encoding them would cost
    as much as the run's own work.
    """
    if request is not None:
        fields = {**fields, "id": request}
    data = json.dumps(fields, ensure_ascii=False).encode("utf-8", "replace")
    if raw_json:
        data = data[:-1] + b"".join(b', "%s": %s' % (key.encode(), value) for key, value in raw_json.items()) + b"}"
    return Message(type=Type.DATA, data=data)


def error_answer(sentence: str, request: Any = None) -> Message:
    return answer({"type": "error", "error": sentence}, request)


def event_answer(glyph_id: str, live: LiveEvent, request: Any) -> Message:
    fields: dict[str, Any] = {"type": live.kind, "glyph_id": glyph_id}
    if live.kind == "clear_output":
        return answer({**fields, "wait": live.wait}, request)
    if live.display_id:
        fields["display_id"] = live.display_id
    return answer(fields, request, output=live.output)


async def serve_websocket(
    provider: Provider, messages: AsyncIterator[Message], context: grpc.aio.ServicerContext
) -> AsyncIterator[Message]:
    in_progress: set[asyncio.Task] = set()

    def dropped(key: Hashable, events: int, nbytes: int) -> tuple[Message, int]:
        glyph_id, request, _run = key
        message = answer({"type": "dropped", "glyph_id": glyph_id, "events": events, "bytes": nbytes}, request)
        return message, len(message.data)

    replies: ReplyQueue[Message | None] = ReplyQueue(dropped)

    def send(message: Message) -> None:
        replies.put(message, len(message.data))

    async def run(glyph_id: str, code: str, upstream: Any, request: Any) -> None:
        # Each run is its own key: its live events are dropped, and marked, apart from others'.
        key = (glyph_id, request, object())

        def on_event(event: dict[str, Any]) -> None:
            for live in live_events(event):
                message = event_answer(glyph_id, live, request)
                replies.put_live(key, message, len(message.data))

        request_run = provider.run_request(code, upstream, run_timeout(provider, context), on_event=on_event)
        try:
            result = await provider.sessions.execute(glyph_id, request_run)
        except ProviderClosing as exc:
            message = error_answer(f"{exc}; try again once it is back.", request)
            replies.put(message, len(message.data), key=key)
            return
        message = answer({"type": "result", "glyph_id": glyph_id}, request, result=to_response(result).result)
        replies.put(message, len(message.data), key=key)

    async def act(name: str, body: dict[str, Any], request: Any) -> None:
        try:
            message = answer(await ACTIONS[name](provider, body), request)
        except BadRequest as exc:
            message = error_answer(str(exc), request)
        if len(message.data) > EVENT_OUTPUT_LIMIT:
            too_big = f"the answer to {name!r} is {len(message.data)} bytes, over the 4 MB limit."
            message = error_answer(too_big, request)
        send(message)

    async def guarded(work: Awaitable[None], request: Any) -> None:
        # One request's failure is answered, and harms neither the socket nor the provider.
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("websocket request failed")
            send(error_answer(f"the request failed inside the provider ({type(exc).__name__}); see its log.", request))

    def start(data: bytes) -> None:
        try:
            body = parse_object(data)
            request = request_id(body)
        except BadRequest as exc:
            send(error_answer(str(exc)))
            return
        try:
            if len(in_progress) >= MAX_REQUESTS_IN_PROGRESS:
                raise BadRequest(
                    f"this socket already has {MAX_REQUESTS_IN_PROGRESS} requests under way; "
                    "send more once their answers arrive."
                )
            action = body.get("action", "run")
            if action == "run":
                work = run(*parse_run(body), request)
            elif isinstance(action, str) and action in ACTIONS:
                work = act(action, body, request)
            else:
                known = ", ".join(["run", *sorted(ACTIONS)])
                raise BadRequest(f"unknown action {json.dumps(action)[:80]}; known actions: {known}.")
        except BadRequest as exc:
            send(error_answer(str(exc), request))
            return
        task = asyncio.ensure_future(guarded(work, request))
        in_progress.add(task)
        task.add_done_callback(in_progress.discard)

    def send_json(body: dict[str, Any]) -> None:
        send(Message(type=Type.DATA, data=json.dumps(body, ensure_ascii=False).encode()))

    async def read() -> None:
        try:
            async for message in messages:
                if message.type == Type.PING:
                    send(Message(type=Type.PONG, timestamp=message.timestamp))
                elif message.type == Type.CLOSE:
                    return
                elif message.type == Type.DATA and (install := install_action(message.data)) is not None:
                    # {"action": "install", "packages": [...]}: see packages.answer_install_action.
                    task = asyncio.ensure_future(answer_install_action(provider, install, send_json))
                    in_progress.add(task)
                    task.add_done_callback(in_progress.discard)
                elif message.type == Type.DATA:
                    start(message.data)
                # CONNECT, PONG and anything else need no answer.
                # A client that does not read its replies gets no new work done for it: what
                # it sends waits in gRPC's flow control, not in our memory.
                await replies.room()
            # The client stopped sending without CLOSE: its requests still get answered.
            await asyncio.gather(*in_progress, return_exceptions=True)
        except Exception:
            log.debug("websocket stream ended abnormally", exc_info=True)
        finally:
            replies.put(None, 0)

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
    finally:
        reader.cancel()
        for task in list(in_progress):
            task.cancel()  # interrupts the run: the socket that asked for it is gone
