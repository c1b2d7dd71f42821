"""A stand-in for QNTX's websocket bridge, between a "browser" and the plugin's HandleWebSocket.

It behaves as QNTX's plugin/grpc/client.go and websocket_keepalive.go do, over real gRPC:
it opens the stream with the browser URL's query parameters as metadata and sends CONNECT
first; it sends PINGs on a timer and records the PONGs; it answers a PING from the plugin
with PONG; it forwards only DATA messages to the browser, as JSON text frames
``{"type", "data": base64, "headers", "timestamp"}``; an ERROR or a CLOSE from the plugin, or
the stream ending, closes the browser's socket; frames from the browser become
WebSocketMessages, and the browser closing its socket sends CLOSE.

The browser side is a queue of frames. ``stop_reading()`` models a browser that stops
reading: like QNTX's goroutine blocked writing to that browser, the bridge then stops
reading the gRPC stream, so the plugin's replies back up in the plugin.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from typing import Any

import grpc

from kernel_provider.proto import domain_pb2, domain_pb2_grpc

Message = domain_pb2.WebSocketMessage
Type = Message.Type
CLOSED = object()  # what the browser reads once its socket is closed


def browser_frame(message: Message) -> str:
    """A plugin's DATA message as QNTX's bridge writes it to the browser: a JSON text frame."""
    frame = {
        "type": message.type,
        "data": base64.b64encode(message.data).decode(),
        "headers": dict(message.headers),
        "timestamp": message.timestamp,
    }
    return json.dumps(frame)


class BrowserClosed(Exception):
    """The bridge closed the browser's socket."""


class QntxBridge:
    def __init__(
        self,
        channel: grpc.Channel,
        query: dict[str, str] | None = None,
        ping_interval: float = 0.5,
        timeout: float = 300,
    ):
        self.to_plugin: queue.Queue[Message | None] = queue.Queue()
        self.to_browser: queue.Queue[Any] = queue.Queue()
        # Every message type the plugin sent, in order (the browser sees only DATA).
        self.received_types: list[int] = []
        self.plugin_errors: list[str] = []
        self.largest_message = 0  # bytes of the largest message the plugin sent
        self.closed_because: str | None = None
        self._pongs: dict[int, threading.Event] = {}
        self._ping_lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        self._done = threading.Event()
        stub = domain_pb2_grpc.DomainPluginServiceStub(channel)
        self.to_plugin.put(Message(type=Type.CONNECT, timestamp=time.time_ns()))
        self._stream = stub.HandleWebSocket(
            iter(self.to_plugin.get, None), metadata=list((query or {}).items()), timeout=timeout
        )
        threading.Thread(target=self._forward_to_browser, daemon=True).start()
        threading.Thread(target=self._keepalive, args=(ping_interval,), daemon=True).start()

    # ---------------------------------------------------------------- the browser's side

    def send(self, body: Any) -> None:
        """The page sends a JSON request (a DATA frame, as pluginWebSocket's pages do)."""
        self.send_frame({"type": Type.DATA, "data": base64.b64encode(json.dumps(body).encode()).decode()})

    def send_raw(self, data: bytes) -> None:
        """The page sends bytes that need not be JSON at all."""
        self.send_frame({"type": Type.DATA, "data": base64.b64encode(data).decode()})

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self._done.is_set():
            raise BrowserClosed(self.closed_because)
        raw = base64.b64decode(frame.get("data", ""))
        self.to_plugin.put(
            Message(type=frame["type"], data=raw, headers=frame.get("headers", {}), timestamp=time.time_ns())
        )

    def receive(self, timeout: float = 120) -> dict[str, Any]:
        """The next DATA the browser gets, decoded from its frame; BrowserClosed once it is closed."""
        frame = self.to_browser.get(timeout=timeout)
        if frame is CLOSED:
            self.to_browser.put(CLOSED)  # every later receive sees the close too
            raise BrowserClosed(self.closed_because)
        message = json.loads(frame)
        assert message["type"] == Type.DATA
        return json.loads(base64.b64decode(message["data"]))

    def receive_until(self, kind: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Bodies received up to and including the first of type ``kind``."""
        bodies = [self.receive(timeout)]
        while bodies[-1]["type"] != kind:
            bodies.append(self.receive(timeout))
        return bodies

    def close(self) -> None:
        """The browser closes its socket: QNTX sends CLOSE and ends the stream."""
        if not self._done.is_set():
            self.to_plugin.put(Message(type=Type.CLOSE, timestamp=time.time_ns()))
            self.to_plugin.put(None)
        self._reading.set()

    @property
    def is_closed(self) -> bool:
        return self._done.is_set()

    def stop_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    # ---------------------------------------------------------------- keepalive

    def ping(self, timeout: float = 120) -> None:
        """Send a PING and wait for its PONG; AssertionError when it, or a PING sent before, is unanswered."""
        sent = self._send_ping()
        assert self._pongs[sent].wait(timeout), "the plugin did not answer PING with PONG"
        # The stream keeps order both ways: every earlier PING must have had its PONG by now.
        unanswered = [t for t, answered in list(self._pongs.items()) if t < sent and not answered.is_set()]
        assert not unanswered, f"{len(unanswered)} keepalive PINGs got no PONG"

    def _send_ping(self) -> int:
        # One at a time, so that PINGs go out in the order of their timestamps.
        with self._ping_lock:
            timestamp = max(time.time_ns(), max(self._pongs, default=0) + 1)
            self._pongs[timestamp] = threading.Event()
            self.to_plugin.put(Message(type=Type.PING, timestamp=timestamp))
        return timestamp

    def _keepalive(self, interval: float) -> None:
        while not self._done.wait(interval):
            self._send_ping()

    # ---------------------------------------------------------------- the plugin's side

    def _forward_to_browser(self) -> None:
        reason = "the plugin ended the stream"
        try:
            for message in self._stream:
                self._reading.wait()
                self.received_types.append(message.type)
                self.largest_message = max(self.largest_message, message.ByteSize())
                if message.type == Type.PING:
                    self.to_plugin.put(Message(type=Type.PONG, timestamp=message.timestamp))
                elif message.type == Type.PONG:
                    if message.timestamp in self._pongs:
                        self._pongs[message.timestamp].set()
                elif message.type == Type.ERROR:
                    # QNTX's keepalive handler treats ERROR as fatal: it logs it and drops the socket.
                    self.plugin_errors.append(message.data.decode(errors="replace"))
                    reason = f"the plugin sent ERROR: {self.plugin_errors[-1]}"
                    break
                elif message.type == Type.CLOSE:
                    reason = "the plugin sent CLOSE"
                    break
                elif message.type == Type.DATA:
                    self.to_browser.put(browser_frame(message))
        except grpc.RpcError as exc:
            reason = f"the stream failed: {exc.code().name}"
        finally:
            self.closed_because = reason
            self._done.set()
            self.to_plugin.put(None)
            self._stream.cancel()  # as QNTX cancels the stream's context when the bridge ends
            self.to_browser.put(CLOSED)
