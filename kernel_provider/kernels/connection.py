"""A kernel's message channels, read by one task and routed to the request each message answers.

jupyter_client's AsyncKernelClient keeps a queue per channel that grows with every message
nobody reads (a glyph's background thread printing between runs), parses dates the provider
never looks at, and runs a heartbeat thread per kernel. A glyph run needs less: send a
request, and get back the messages whose parent is that request, from shell, iopub and stdin
alike, in arrival order. So a connection hands each request an Inbox, and drops (unparsed)
every message that answers no open request.

KernelConnection is the part every backend shares; ZMQConnection speaks Jupyter's wire
protocol (signed multipart frames) to a kernel on this machine. Building and reading the
messages themselves is execution.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "5.3"
DELIM = b"<IDS|MSG>"
# Messages waiting for one request's reader. Past this the connection stops reading the
# kernel until the reader catches up, so a flood waits in zmq's own bounded buffers.
INBOX_LIMIT = 1000
# Requests open at once on one connection (a glyph runs one at a time; the rest are
# kernel_info and interrupt drains). A leak of inboxes must not grow without bound.
MAX_OPEN_REQUESTS = 64


class ConnectionClosed(Exception):
    """The connection to the kernel was closed while a request waited on it."""


Message = dict[str, Any]


class Inbox:
    """The messages that answer one request, as (channel, message), in arrival order."""

    def __init__(self, msg_id: str):
        self.msg_id = msg_id
        self._queue: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue(INBOX_LIMIT)
        self.closed = False

    async def put(self, channel: str, msg: Message) -> None:
        """Add a message, waiting while the inbox is full."""
        if not self.closed:
            await self._queue.put((channel, msg))

    def offer(self, channel: str, msg: Message) -> bool:
        """Add a message if there is room (a closed inbox takes and drops it); False when full."""
        if self.closed:
            return True
        try:
            self._queue.put_nowait((channel, msg))
        except asyncio.QueueFull:
            return False
        return True

    async def get(self, timeout: float) -> tuple[str, Message]:
        """The next message; TimeoutError when none came within ``timeout`` seconds."""
        async with asyncio.timeout(max(timeout, 0)):
            item = await self._queue.get()
        if item is None:
            raise ConnectionClosed("the connection to the kernel was closed")
        return item

    def close(self) -> None:
        self.closed = True
        while not self._queue.empty():  # frees a reader blocked on a full queue
            self._queue.get_nowait()

    def abort(self) -> None:
        """Wake the request's reader: the connection is gone."""
        self.closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class KernelConnection:
    """Send requests to one kernel and route the messages that answer them.

    Subclasses move frames: ``_send`` puts one message on a channel, and their reading
    loop hands each message that arrives to the inbox of the request it answers
    (``_deliver`` for a reader that can wait, ``_route`` for one that cannot).
    """

    def __init__(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.username = "kernel_provider"
        self._inboxes: dict[str, Inbox] = {}
        self.dropped = 0  # messages that answered no open request
        self.closed = False

    def message(
        self, msg_type: str, content: dict[str, Any], metadata: dict | None = None, parent: dict | None = None
    ) -> Message:
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": self.username,
            "session": self.session_id,
            "date": datetime.now(UTC).isoformat(),
            "version": PROTOCOL_VERSION,
        }
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": msg_type,
            "parent_header": parent or {},
            "metadata": metadata or {},
            "content": content,
        }

    def request(self, channel: str, msg_type: str, content: dict[str, Any], metadata: dict | None = None) -> Inbox:
        """Send a request and return the inbox of its answers; close the inbox when done with it."""
        if self.closed:
            raise ConnectionClosed("the connection to the kernel is closed")
        if len(self._inboxes) >= MAX_OPEN_REQUESTS:
            raise RuntimeError(f"more than {MAX_OPEN_REQUESTS} requests open on one kernel")
        msg = self.message(msg_type, content, metadata)
        inbox = Inbox(msg["msg_id"])
        self._inboxes[inbox.msg_id] = inbox
        try:
            self._send(channel, msg)
        except BaseException:
            self.forget(inbox)
            raise
        return inbox

    def reply(self, channel: str, msg_type: str, content: dict[str, Any], parent: Message) -> None:
        """Answer a request the kernel made (an input_request on stdin)."""
        if not self.closed:
            self._send(channel, self.message(msg_type, content, parent=parent["header"]))

    def forget(self, inbox: Inbox) -> None:
        inbox.close()
        if self._inboxes.get(inbox.msg_id) is inbox:
            del self._inboxes[inbox.msg_id]

    def wants(self, parent_msg_id: Any) -> bool:
        return isinstance(parent_msg_id, str) and parent_msg_id in self._inboxes

    def _route(self, channel: str, msg: Message) -> Inbox | None:
        """Hand a message to the inbox of the request it answers; that inbox, if it is full."""
        inbox = self._inboxes.get(msg["parent_header"].get("msg_id"))
        if inbox is None:
            self.dropped += 1
            return None
        return None if inbox.offer(channel, msg) else inbox

    async def _deliver(self, channel: str, msg: Message) -> None:
        """Route a message, waiting while its inbox is full (transports whose reader can wait)."""
        full = self._route(channel, msg)
        if full is not None:
            await full.put(channel, msg)

    async def ready(self, timeout: float) -> None:
        """Wait until every channel can carry messages both ways (transports that need it)."""

    def _send(self, channel: str, msg: Message) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True
        for inbox in list(self._inboxes.values()):
            inbox.abort()
        self._inboxes.clear()


class ZMQConnection(KernelConnection):
    """Jupyter's wire protocol over zmq: shell and stdin DEALERs, an iopub SUB, HMAC-signed frames.

    The sockets are plain zmq sockets read from the event loop's own reader callbacks rather
    than zmq.asyncio sockets: a glyph run reads five or six messages, and zmq.asyncio spends a
    future, a task step and several enum conversions on each. A zmq socket's descriptor only
    signals a change of state, so every callback reads until the socket is empty, and every
    send is followed by a look at whether messages arrived meanwhile (the send may have taken
    the signal that announced them); without that, a message could wait unread forever.
    """

    CHANNELS = {"shell": zmq.DEALER, "stdin": zmq.DEALER, "iopub": zmq.SUB}

    def __init__(self, info: dict[str, Any]):
        super().__init__()
        key = info.get("key", "")
        key = key.encode() if isinstance(key, str) else key
        scheme = info.get("signature_scheme", "hmac-sha256")
        digest = getattr(hashlib, scheme.split("-", 1)[1])
        self._auth = hmac.new(key, digestmod=digest) if key else None
        self._loop = asyncio.get_running_loop()
        context = zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}
        self._stdin_monitor: zmq.asyncio.Socket | None = None
        self._stalled: set[str] = set()  # channels not read until a full inbox has room
        for channel, kind in self.CHANNELS.items():
            sock = zmq.Socket(context, kind)  # a plain socket, though the context is the asyncio one
            sock.linger = 0
            if kind == zmq.DEALER:
                # The kernel sends input_request to the identity of the shell request's
                # sender: shell and stdin must share it, as jupyter_client's channels do.
                sock.setsockopt(zmq.IDENTITY, self.session_id.encode())
            else:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            if channel == "stdin":
                # The kernel's stdin ROUTER silently drops what it sends to a peer whose
                # handshake has not finished: the first attest() of a fresh kernel would
                # wait forever. ready() waits for that handshake. (The monitor is made by
                # the asyncio context, so it is an asyncio socket.)
                self._stdin_monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sock.connect(_url(info, f"{channel}_port"))
            self._sockets[channel] = sock
        self._fds = {channel: sock.FD for channel, sock in self._sockets.items()}
        for channel, fd in self._fds.items():
            self._loop.add_reader(fd, self._read, channel)

    async def ready(self, timeout: float) -> None:
        """Wait until the kernel's stdin socket knows us (see __init__); TimeoutError otherwise."""
        monitor = self._stdin_monitor
        if monitor is None:
            return
        async with asyncio.timeout(timeout):
            await monitor.recv_multipart()  # the only event it reports: handshake succeeded
        self._stdin_monitor = None
        self._sockets["stdin"].disable_monitor()
        monitor.close(linger=0)

    def _sign(self, parts: list[bytes]) -> bytes:
        if self._auth is None:
            return b""
        mac = self._auth.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def _send(self, channel: str, msg: Message) -> None:
        parts = [_pack(msg["header"]), _pack(msg["parent_header"]), _pack(msg["metadata"]), _pack(msg["content"])]
        sock = self._sockets[channel]
        try:
            sock.send_multipart([DELIM, self._sign(parts), *parts], zmq.NOBLOCK)
        except zmq.Again:
            # Only a kernel that reads nothing lets a thousand messages pile up (the socket's
            # high-water mark); requests are bounded well below that.
            raise ConnectionClosed("the kernel is not reading its messages") from None
        self._read_soon_if_waiting(channel)

    def _read_soon_if_waiting(self, channel: str) -> None:
        # Sending (or asking for events) may consume the signal of messages that arrived.
        if channel not in self._stalled and self._sockets[channel].get(zmq.EVENTS) & _POLLIN:
            self._loop.call_soon(self._read, channel)

    def _read(self, channel: str) -> None:
        """Read every message waiting on a channel and hand each to the request it answers."""
        if self.closed or channel in self._stalled:
            return
        sock = self._sockets[channel]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us
                return
            msg = self._parse(channel, frames)
            full = None if msg is None else self._route(channel, msg)
            if full is not None:
                # The reader is behind: stop reading this channel until it catches up, so a
                # flood waits in zmq's own bounded buffers rather than in ours.
                self._stalled.add(channel)
                self._loop.remove_reader(self._fds[channel])
                asyncio.ensure_future(self._resume_when_room(channel, full, msg))
                return

    async def _resume_when_room(self, channel: str, inbox: Inbox, msg: Message) -> None:
        try:
            await inbox.put(channel, msg)
        finally:
            self._stalled.discard(channel)
        if not self.closed:
            self._loop.add_reader(self._fds[channel], self._read, channel)
            self._read(channel)

    def _parse(self, channel: str, frames: list[bytes]) -> Message | None:
        try:
            start = frames.index(DELIM) + 1
            signature, parts = frames[start], frames[start + 1 : start + 5]
            parent = json.loads(parts[1])
            # Decode only what someone waits for: output between runs costs one small parse.
            if not self.wants(parent.get("msg_id")):
                self.dropped += 1
                return None
            if not hmac.compare_digest(self._sign(parts), signature):
                log.warning("dropping a %s message with a bad signature", channel)
                return None
            header = json.loads(parts[0])
            return {
                "header": header,
                "msg_id": header.get("msg_id"),
                "msg_type": header.get("msg_type"),
                "parent_header": parent,
                "metadata": json.loads(parts[2]),
                "content": json.loads(parts[3]),
            }
        except (ValueError, IndexError, TypeError):
            log.warning("dropping a malformed %s message", channel)
            return None

    async def close(self) -> None:
        if self.closed:
            return
        await super().close()
        if self._stdin_monitor is not None:
            self._stdin_monitor.close(linger=0)
            self._stdin_monitor = None
        for channel, sock in self._sockets.items():
            with contextlib.suppress(ValueError, RuntimeError):  # a loop already closed
                self._loop.remove_reader(self._fds[channel])
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)


_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag arithmetic costs an enum call per message


def _url(info: dict[str, Any], port_key: str) -> str:
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{info[port_key]}"
    return f"tcp://{info['ip']}:{info[port_key]}"


def _pack(obj: Any) -> bytes:
    # As jupyter_client packs: UTF-8 JSON, no NaN (the kernel would refuse it).
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogateescape")
