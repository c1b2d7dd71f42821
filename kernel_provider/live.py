"""Live runs over DomainPluginService.HandleWebSocket.

A DATA message whose data is JSON ``{"glyph_id": ..., "code": ..., "upstream": {...}}``
(``upstream`` and an ``id`` echoed in every answer are optional) runs the code and is
answered, while it runs, with one DATA message per output,
``{"type": "output", "glyph_id": ..., "output": {nbformat output}}``, and finally
``{"type": "result", "glyph_id": ..., "result": {ExecutionResult}}``. PING is answered
with PONG at any time, also during a run, since the incoming messages are read while
code runs. A DATA message we cannot run is answered with an ERROR message whose data is
one sentence, and the socket goes on. CLOSE, or the stream being cancelled, ends the
socket and interrupts its runs in progress; a client that only stops sending (a
half-close) still gets the answers of its runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from kernel_provider.packages import answer_install_action, install_action
from kernel_provider.proto import domain_pb2
from kernel_provider.provider import Provider
from kernel_provider.python_service import (
    BadRequest,
    load_json,
    parse_request,
    run_timeout,
    stream_run,
    to_response,
)
from kernel_provider.results import ExecutionResult
from kernel_provider.sessions import ProviderClosing, RunRequest

log = logging.getLogger(__name__)

Message = domain_pb2.WebSocketMessage
Type = Message.Type

_SHAPE = 'a DATA message must be a JSON object such as {"glyph_id": "g1", "code": "1 + 1"}.'


def parse_data(data: bytes) -> tuple[str, str, Any, Any]:
    """(glyph_id, code, upstream, id) of a DATA message; raises BadRequest with a sentence."""
    try:
        body = load_json(data, "DATA")
    except BadRequest as exc:
        raise BadRequest(f"{exc} {_SHAPE[0].upper()}{_SHAPE[1:]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"DATA is a JSON {type(body).__name__}: {_SHAPE}")
    code, glyph_id = body.get("code"), body.get("glyph_id", "")
    if not isinstance(code, str):
        raise BadRequest(f'DATA has no "code" string to run: {_SHAPE}')
    if not isinstance(glyph_id, str):
        raise BadRequest(f'"glyph_id" must be a string: {_SHAPE}')
    upstream = body.get("upstream")
    raw_upstream = b"" if upstream is None else json.dumps(upstream).encode()
    return (*parse_request(glyph_id, code, raw_upstream), body.get("id"))


async def serve_websocket(
    provider: Provider, messages: AsyncIterator[Message], context: grpc.aio.ServicerContext
) -> AsyncIterator[Message]:
    replies: asyncio.Queue[Message | None] = asyncio.Queue()
    runs: set[asyncio.Task] = set()

    async def answer(glyph_id: str, run: RunRequest, request_id: Any) -> None:
        extra = {} if request_id is None else {"id": request_id}

        def data(kind: str, body: bytes) -> None:
            # body is JSON already: splice it in as the value of `kind` rather than re-encode it.
            head = json.dumps({"type": kind, "glyph_id": glyph_id, **extra}).encode()
            replies.put_nowait(Message(type=Type.DATA, data=head[:-1] + b', "%s": %s}' % (kind.encode(), body)))

        try:
            async with aclosing(stream_run(provider.sessions, glyph_id, run)) as events:
                async for event in events:
                    if isinstance(event, ExecutionResult):
                        data("result", to_response(event).result)
                    else:
                        data("output", event)
        except ProviderClosing as exc:
            replies.put_nowait(Message(type=Type.ERROR, data=f"{exc}; try again once it is back.".encode()))

    def send_json(body: dict[str, Any]) -> None:
        replies.put_nowait(Message(type=Type.DATA, data=json.dumps(body, ensure_ascii=False).encode()))

    async def read() -> None:
        try:
            async for message in messages:
                if message.type == Type.PING:
                    replies.put_nowait(Message(type=Type.PONG, timestamp=message.timestamp))
                elif message.type == Type.CLOSE:
                    return
                elif message.type == Type.DATA and (install := install_action(message.data)) is not None:
                    # {"action": "install", "packages": [...]}: see packages.answer_install_action.
                    task = asyncio.ensure_future(answer_install_action(provider, install, send_json))
                    runs.add(task)
                    task.add_done_callback(runs.discard)
                elif message.type == Type.DATA:
                    try:
                        glyph_id, code, upstream, request_id = parse_data(message.data)
                    except BadRequest as exc:
                        replies.put_nowait(Message(type=Type.ERROR, data=str(exc).encode()))
                        continue
                    run = RunRequest(
                        code=code,
                        upstream=upstream,
                        timeout=run_timeout(provider, context),
                        output_limit=provider.settings.max_output_bytes,
                    )
                    task = asyncio.ensure_future(answer(glyph_id, run, request_id))
                    runs.add(task)
                    task.add_done_callback(runs.discard)
            # The client stopped sending without CLOSE: its runs still get answered.
            await asyncio.gather(*runs, return_exceptions=True)
        except Exception:
            log.debug("websocket stream ended abnormally", exc_info=True)
        finally:
            replies.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
    finally:
        reader.cancel()
        for task in list(runs):
            task.cancel()  # interrupts the run: the socket that asked for it is gone
