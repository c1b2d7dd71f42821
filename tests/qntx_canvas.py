"""A stand-in for QNTX's server and canvas page, for browser tests of the Jupyter glyph.

It does the part QNTX's server does, over real gRPC to a launched provider:
- ``GET /api/plugins/glyphs`` calls RegisterGlyphs and answers each GlyphDef with the
  ``module_url`` and ``css_url`` QNTX builds (``/api/{name}`` + the def's path);
- ``/api/{name}/...`` is forwarded to HandleHTTP (method, path with its query, headers, body);
- the browser websocket at ``/ws/{name}`` is bridged to HandleWebSocket: a CONNECT first, the
  browser's query parameters as metadata, browser frames ``{"type", "data": base64, ...}``
  turned into WebSocketMessages and back; only DATA reaches the browser, and an ERROR or
  CLOSE from the plugin closes the browser's socket, as QNTX's bridge does;
- ``/api/glyph-config`` keeps each glyph's saved config (loadConfig/saveConfig).

``/`` serves canvas_page.html, which implements the GlyphUI contract on top of these
routes and renders one glyph of the module (``?glyph=ID``). The server runs on its own
thread and event loop, so a synchronous test (Playwright's sync API) can drive a browser.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from pathlib import Path

import grpc
import tornado.web
import tornado.websocket
from qntx_bridge import browser_frame

from kernel_provider.proto import domain_pb2, domain_pb2_grpc

Message = domain_pb2.WebSocketMessage
PAGE = Path(__file__).with_name("canvas_page.html")
RPC_TIMEOUT = 120
# Playwright waits up to this long for what the page should come to show; only a slow machine
# comes near it, and the assertion is about what is shown, never how fast.
SHOWN_WITHIN_MS = 120_000
# Frames the browser may have in flight towards the plugin; a test never comes close.
MAX_QUEUED_FRAMES = 1000


class Canvas:
    """Start with ``with Canvas(plugin_port, name) as canvas:``; ``canvas.url`` is the page's origin."""

    def __init__(self, plugin_port: int, name: str = "python"):
        self.plugin_port = plugin_port
        self.name = name
        self.configs: dict[tuple[str, str], bytes] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Canvas:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=RPC_TIMEOUT)
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=RPC_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _start(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.plugin_port}")
        self.stub = domain_pb2_grpc.DomainPluginServiceStub(self.channel)
        shared = {"canvas": self}
        app = tornado.web.Application(
            [
                (r"/", PageHandler),
                (r"/api/plugins/glyphs", GlyphsHandler, shared),
                (r"/api/glyph-config", ConfigHandler, shared),
                (rf"/api/{self.name}(/.*)", PluginHTTPHandler, shared),
                (rf"/ws/{self.name}", PluginSocket, shared),
            ]
        )
        self.server = app.listen(0, address="127.0.0.1")
        port = next(iter(self.server._sockets.values())).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()
        await self.channel.close()


class PageHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE.read_bytes())


class GlyphsHandler(tornado.web.RequestHandler):
    def initialize(self, canvas: Canvas) -> None:
        self.canvas = canvas

    async def get(self) -> None:
        answer = await self.canvas.stub.RegisterGlyphs(domain_pb2.Empty(), timeout=RPC_TIMEOUT)
        base = f"/api/{self.canvas.name}"
        glyphs = [
            {
                "symbol": g.symbol,
                "title": g.title,
                "label": g.label,
                "content_url": base + g.content_path,
                "css_url": base + g.css_path,
                "module_url": base + g.module_path if g.module_path else None,
                "default_width": g.default_width,
                "default_height": g.default_height,
            }
            for g in answer.glyphs
        ]
        self.write({"glyphs": glyphs})


class ConfigHandler(tornado.web.RequestHandler):
    def initialize(self, canvas: Canvas) -> None:
        self.canvas = canvas

    def _key(self) -> tuple[str, str]:
        return self.get_query_argument("plugin"), self.get_query_argument("glyph_id")

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.canvas.configs.get(self._key(), b"null"))

    def post(self) -> None:
        json.loads(self.request.body)  # only JSON is kept
        self.canvas.configs[self._key()] = self.request.body
        self.set_status(204)


class PluginHTTPHandler(tornado.web.RequestHandler):
    def initialize(self, canvas: Canvas) -> None:
        self.canvas = canvas

    async def _forward(self, path: str) -> None:
        if self.request.query:
            path += "?" + self.request.query
        request = domain_pb2.HTTPRequest(
            method=self.request.method,
            path=path,
            headers=[domain_pb2.HTTPHeader(name=k, values=[v]) for k, v in self.request.headers.get_all()],
            body=self.request.body,
        )
        answer = await self.canvas.stub.HandleHTTP(request, timeout=RPC_TIMEOUT)
        self.set_status(answer.status_code)
        for header in answer.headers:
            for value in header.values:
                self.add_header(header.name, value)
        if answer.status_code != 304:
            self.write(answer.body)

    get = post = put = delete = patch = _forward


class PluginSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, canvas: Canvas) -> None:
        self.canvas = canvas
        self.to_plugin: asyncio.Queue[Message | None] = asyncio.Queue(MAX_QUEUED_FRAMES)
        self.pump: asyncio.Task | None = None

    async def open(self) -> None:
        metadata = [(key.lower(), values[-1].decode()) for key, values in self.request.query_arguments.items()]
        self.to_plugin.put_nowait(Message(type=Message.CONNECT, timestamp=0))
        call = self.canvas.stub.HandleWebSocket(self._requests(), metadata=metadata)
        self.pump = asyncio.ensure_future(self._pump(call))

    async def _requests(self):
        while (message := await self.to_plugin.get()) is not None:
            yield message

    async def _pump(self, call) -> None:
        try:
            async for message in call:
                if message.type == Message.DATA:
                    await self.write_message(browser_frame(message))
                elif message.type in (Message.ERROR, Message.CLOSE):
                    break  # QNTX's keepalive treats a plugin's ERROR as fatal
        except (grpc.aio.AioRpcError, tornado.websocket.WebSocketClosedError):
            pass
        finally:
            self.close()

    def on_message(self, raw: str | bytes) -> None:
        frame = json.loads(raw)
        message = Message(
            type=frame["type"],
            data=base64.b64decode(frame.get("data") or ""),
            headers=frame.get("headers") or {},
            timestamp=int(frame.get("timestamp") or 0),
        )
        self.to_plugin.put_nowait(message)

    def on_close(self) -> None:
        for message in (Message(type=Message.CLOSE), None):
            try:
                self.to_plugin.put_nowait(message)
            except asyncio.QueueFull:
                pass


# ---------------------------------------------------------------------------- driving the page


def open_glyph(browser, canvas, glyph_id: str):
    from playwright.sync_api import expect

    expect.set_options(timeout=SHOWN_WITHIN_MS)
    page = browser.new_page(viewport={"width": 780, "height": 700})
    page.goto(f"{canvas.url}/?glyph={glyph_id}")
    page.wait_for_selector("body[data-ready=yes]", state="attached", timeout=SHOWN_WITHIN_MS)
    return page


def run_code(page, code: str) -> None:
    """Type the code into the cell and run it with Shift+Enter, as a person would."""
    editor = page.locator(".kp-code")
    editor.fill(code)
    editor.press("Shift+Enter")


def wait_until_idle(page, execution_count: int | None = None) -> None:
    from playwright.sync_api import expect

    expect(page.locator(".kp-state")).to_have_text("idle")
    if execution_count is not None:
        expect(page.locator(".kp-prompt")).to_have_text(f"[{execution_count}]:")
