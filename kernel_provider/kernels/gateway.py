"""Kernels on a Jupyter Kernel Gateway or Enterprise Gateway: REST to start and stop, a websocket to talk.

The gateway runs the kernels (as Kubernetes pods, YARN applications, Docker containers,
or processes on its own host); the provider only holds a websocket per glyph kernel and
remembers, in a small state file, which gateway kernel belongs to which glyph. So stopping
the provider lets go of the kernels without stopping them, and a provider started again with
the same state folder re-attaches each glyph to its kernel, variables intact.

Why not jupyter_server's GatewayKernelClient: it opens the websocket without the auth token
(Enterprise Gateway answers 401), sends messages without a ``channel`` field (the gateway logs
each one, code included), and busy-polls its channel queues. This client is a few REST calls
and one websocket read by one task, through tornado (installed with jupyter_server).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from kernel_provider import execution
from kernel_provider.config import ConfigError, ensure_private_dir
from kernel_provider.kernels.connection import ConnectionClosed, KernelConnection, Message
from kernel_provider.kernels.local import KERNEL_START_TIMEOUT, Capacity

log = logging.getLogger(__name__)

# Seconds a REST call to the gateway may take (a kernel start has its own, longer timeout).
REST_TIMEOUT = 30.0
# The largest websocket message we accept. The run's own output limit keeps what it keeps;
# this only stops one huge message from taking the provider's memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
STATE_FILE_PREFIX = "gateway-kernels-"
# Output of the previous provider's runs that the gateway replays on re-attach: at most this
# much text is kept, to be told at the glyph's next run.
MISSED_OUTPUT_CHARS = 64 * 1024
MISSED_OUTPUT_TYPES = {"stream", "display_data", "execute_result", "error"}


class GatewayUnavailable(Exception):
    """The gateway cannot be reached or refused a request; the message names its URL."""


class GatewayClient:
    """The gateway's REST API (/api/kernels), with the token in the Authorization header."""

    def __init__(self, url: str, token: str = ""):
        self.url = url.rstrip("/")
        self.token = token
        self._http = AsyncHTTPClient()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    async def call(self, method: str, path: str, body: Any = None, timeout: float = REST_TIMEOUT) -> Any:
        """One REST call; the decoded JSON answer (None when empty, or on a 404)."""
        request = HTTPRequest(
            self.url + path,
            method=method,
            headers={**self.headers, "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
            request_timeout=timeout,
            connect_timeout=min(timeout, REST_TIMEOUT),
        )
        try:
            response = await self._http.fetch(request)
        except HTTPClientError as exc:
            if exc.code == 404:
                return None
            detail = _error_detail(exc)
            raise GatewayUnavailable(
                f"the Jupyter gateway at {self.url} refused {method} {path}: {exc.code} {detail}".rstrip()
            ) from None
        except (TimeoutError, OSError) as exc:
            raise GatewayUnavailable(
                f"the Jupyter gateway at {self.url} cannot be reached ({exc or type(exc).__name__})"
            ) from None
        return json.loads(response.body) if response.body else None

    async def start_kernel(self, kernel_name: str, env: dict[str, str], timeout: float) -> str:
        answer = await self.call("POST", "/api/kernels", {"name": kernel_name, "env": env}, timeout=timeout)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
            raise GatewayUnavailable(f"the Jupyter gateway at {self.url} started no kernel (answer: {answer!r})")
        return answer["id"]

    async def kernel(self, kernel_id: str) -> dict[str, Any] | None:
        """The gateway's model of a kernel; None once it is gone (deleted, culled, evicted)."""
        return await self.call("GET", f"/api/kernels/{quote(kernel_id)}")

    async def interrupt(self, kernel_id: str) -> None:
        await self.call("POST", f"/api/kernels/{quote(kernel_id)}/interrupt")

    async def delete(self, kernel_id: str) -> None:
        await self.call("DELETE", f"/api/kernels/{quote(kernel_id)}")

    def channels_url(self, kernel_id: str, session_id: str) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/api/kernels/{quote(kernel_id)}/channels?session_id={session_id}"


def _error_detail(exc: HTTPClientError) -> str:
    try:
        body = json.loads(exc.response.body) if exc.response is not None and exc.response.body else {}
        return str(body.get("message") or body.get("reason") or exc.message or "")[:300]
    except (ValueError, AttributeError):
        return exc.message or ""


class GatewayConnection(KernelConnection):
    """The kernel's channels over the gateway's websocket: one JSON text message per Jupyter message.

    The websocket's session (``websocket_session``, kept for the kernel's life) lets the gateway
    buffer what the kernel says while nobody is connected, and replay it on reconnect. Our
    requests carry a session of this connection's own, so the replayed output of a previous
    provider's runs (parent session ``previous_session``) is told apart and kept as ``missed``.
    """

    def __init__(
        self, websocket: WebSocketClientConnection, websocket_session: str, previous_session: str | None = None
    ):
        super().__init__()
        self.websocket_session = websocket_session
        self._previous_session = previous_session
        self.missed: list[str] = []
        self._missed_chars = 0
        self._websocket = websocket
        self._socket = _tcp_socket(websocket)
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(
        cls,
        client: GatewayClient,
        kernel_id: str,
        websocket_session: str,
        timeout: float,
        previous_session: str | None = None,
    ) -> GatewayConnection:
        request = HTTPRequest(
            client.channels_url(kernel_id, websocket_session),
            headers=client.headers,
            connect_timeout=timeout,
            request_timeout=timeout,
        )
        try:
            websocket = await websocket_connect(request, max_message_size=MAX_MESSAGE_BYTES)
        except HTTPClientError as exc:
            raise GatewayUnavailable(
                f"the Jupyter gateway at {client.url} refused the websocket of kernel {kernel_id}: {exc.code}"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise GatewayUnavailable(f"the Jupyter gateway at {client.url} cannot be reached ({exc})") from None
        return cls(websocket, websocket_session, previous_session)

    def _send(self, channel: str, msg: Message) -> None:
        try:
            self._websocket.write_message(json.dumps({**msg, "channel": channel}, ensure_ascii=False, allow_nan=False))
        except WebSocketClosedError:
            raise ConnectionClosed("the gateway closed the kernel's websocket") from None

    async def _read(self) -> None:
        try:
            while True:
                raw = await self._websocket.read_message()
                if raw is None:  # the gateway closed the websocket
                    break
                self._quick_ack()
                if isinstance(raw, bytes):
                    self.dropped += 1  # messages with binary buffers (widgets); no glyph run needs them
                    continue
                try:
                    msg = json.loads(raw)
                    channel = msg.pop("channel")
                    parent = msg.get("parent_header") or {}
                except (ValueError, KeyError, AttributeError):
                    log.warning("dropping a malformed message from the gateway")
                    continue
                if not self.wants(parent.get("msg_id")):
                    self.dropped += 1
                    if channel == "iopub" and parent.get("session") == self._previous_session:
                        self._keep_missed(msg)
                    continue
                msg.setdefault("msg_type", msg.get("header", {}).get("msg_type"))
                await self._deliver(channel, msg)
        except asyncio.CancelledError:
            return
        finally:
            # Whoever waits on this kernel learns that the connection is gone.
            if not self.closed:
                await super().close()

    def _keep_missed(self, msg: Message) -> None:
        msg_type = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
        if msg_type not in MISSED_OUTPUT_TYPES or self._missed_chars >= MISSED_OUTPUT_CHARS:
            return
        content = msg.get("content") or {}
        if msg_type == "stream":
            text = str(content.get("text", ""))
        elif msg_type == "error":
            text = f"{content.get('ename')}: {content.get('evalue')}\n"
        else:
            text = str((content.get("data") or {}).get("text/plain", f"<{msg_type}>")) + "\n"
        text = text[: MISSED_OUTPUT_CHARS - self._missed_chars]
        self._missed_chars += len(text)
        self.missed.append(text)

    def take_missed(self) -> str:
        """The replayed output of the previous provider's runs, once."""
        text, self.missed, self._missed_chars = "".join(self.missed), [], 0
        return text

    def _quick_ack(self) -> None:
        # Gateways leave Nagle's algorithm on: their next small message waits for our ACK,
        # which Linux delays up to 40 ms. Asking for an immediate ACK after each message
        # read takes that wait away from our side (the option resets itself, hence each time).
        if self._socket is not None and hasattr(socket, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    async def close(self) -> None:
        if self.closed:
            return
        await super().close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._websocket.close()


def _tcp_socket(websocket: WebSocketClientConnection) -> socket.socket | None:
    """Our end of the websocket, with Nagle's algorithm off: each message leaves at once."""
    stream = getattr(getattr(websocket, "protocol", None), "stream", None)
    if stream is None:
        return None
    stream.set_nodelay(True)
    sock = getattr(stream, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


@dataclass
class GatewayKernel:
    """A ready kernel on the gateway: the REST API interrupts it and tells whether it still exists."""

    client: GatewayClient
    kernel_id: str
    kernel_name: str
    connection: GatewayConnection
    glyph_id: str | None
    # True when this kernel was running before the provider (re)started, its state intact.
    resumed: bool = False

    @property
    def connection_file(self) -> None:
        return None  # no connection file: the gateway holds the kernel's ports

    def missed_output(self) -> str:
        """What the glyph's code printed while no provider was attached (replayed by the gateway)."""
        return self.connection.take_missed()

    async def interrupt(self) -> None:
        await self.client.interrupt(self.kernel_id)

    async def is_alive(self) -> bool:
        """False once the gateway no longer has the kernel (its websocket stays open regardless)."""
        if self.connection.closed:
            return False
        try:
            return await self.client.kernel(self.kernel_id) is not None
        except GatewayUnavailable as exc:
            # Cannot tell: say alive, so that a gateway hiccup does not throw away the glyph's state.
            log.warning("%s", exc)
            return True


class KernelState:
    """glyph_id -> the gateway kernel that holds its state, in a private file written atomically."""

    def __init__(self, state_dir: Path, gateway_url: str):
        self.state_dir = state_dir
        digest = hashlib.sha256(gateway_url.encode()).hexdigest()[:12]
        self.path = state_dir / f"{STATE_FILE_PREFIX}{digest}.json"
        self.gateway_url = gateway_url
        self.glyphs: dict[str, dict[str, str]] = {}

    def load(self) -> None:
        # Whoever can write this folder chooses which kernels our glyphs run on: it must be ours alone.
        try:
            if self.state_dir.exists() and self.state_dir.stat().st_uid != os.getuid():
                raise ConfigError(f"the state folder {self.state_dir} belongs to another user.")
            ensure_private_dir(self.state_dir)
        except OSError as exc:
            raise ConfigError(f"cannot use the state folder {self.state_dir}: {exc.strerror or exc}.") from None
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable state file %s: %s", self.path, exc)
            return
        glyphs = data.get("glyphs") if isinstance(data, dict) else None
        if isinstance(glyphs, dict):
            self.glyphs = {
                g: entry
                for g, entry in glyphs.items()
                if isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("kernel_id", "kernel_name"))
            }

    def remember(self, glyph_id: str, kernel_id: str, kernel_name: str, connection: GatewayConnection) -> None:
        """The glyph's kernel, its websocket session, and the session its requests carry now."""
        self.glyphs[glyph_id] = {
            "kernel_id": kernel_id,
            "kernel_name": kernel_name,
            "websocket_session": connection.websocket_session,
            "request_session": connection.session_id,
        }
        self._save()

    def forget(self, glyph_id: str, kernel_id: str) -> None:
        if self.glyphs.get(glyph_id, {}).get("kernel_id") == kernel_id:
            del self.glyphs[glyph_id]
            self._save()

    def _save(self) -> None:
        temporary = self.path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"gateway": self.gateway_url, "glyphs": self.glyphs}, handle, indent=1)
        os.replace(temporary, self.path)


class GatewaySupply:
    """Starts, lends and stops glyph kernels on a gateway; the same interface as the local KernelSupply.

    No warm pool: a pooled kernel on a remote gateway would outlive a provider that is
    killed, with no glyph to name it.
    """

    def __init__(
        self,
        gateway_url: str,
        token: str,
        state_dir: Path,
        max_kernels: int,
        make_room: Callable[[], Awaitable[bool]],
        setup_code: Callable[[], str] | None = None,
    ):
        self.client = GatewayClient(gateway_url, token)
        self.state = KernelState(state_dir, self.client.url)
        self.state.load()
        self.capacity = Capacity(max_kernels, make_room)
        self._setup_code = setup_code
        self.started = 0
        self.pooled = 0

    # No local folders of pooled or runner kernels' connection files to clean: the gateway has them.
    pool_dir: Path | None = None
    runner_dir: Path | None = None
    # Set by sessions for local sandboxes; a gateway's kernels are isolated by the gateway (pods, images).
    sandboxed_specs = None

    def remembered(self) -> dict[str, str]:
        """glyph_id -> kernelspec of the kernels a previous run of the provider left on the gateway."""
        return {glyph: entry["kernel_name"] for glyph, entry in self.state.glyphs.items()}

    async def obtain(self, kernel_name: str, glyph_id: str | None, timeout: float) -> GatewayKernel:
        """The glyph's kernel still on the gateway (re-attached), or a new ready one."""
        await self.capacity.acquire(timeout)
        try:
            kernel = await self._reattach(kernel_name, glyph_id, timeout) if glyph_id else None
            return kernel or await self._start(kernel_name, glyph_id, timeout)
        except BaseException:
            self.capacity.release()
            raise

    async def _reattach(self, kernel_name: str, glyph_id: str, timeout: float) -> GatewayKernel | None:
        entry = self.state.glyphs.get(glyph_id)
        if entry is None:
            return None
        kernel_id = entry["kernel_id"]
        if entry["kernel_name"] != kernel_name or await self.client.kernel(kernel_id) is None:
            log.info("the gateway kernel %s of glyph %r is gone or of another kernelspec", kernel_id, glyph_id)
            self.state.forget(glyph_id, kernel_id)
            if entry["kernel_name"] != kernel_name:
                with contextlib.suppress(GatewayUnavailable):
                    await self.client.delete(kernel_id)
            return None
        websocket_session = entry.get("websocket_session") or uuid.uuid4().hex
        connection = await GatewayConnection.open(
            self.client, kernel_id, websocket_session, timeout, previous_session=entry.get("request_session")
        )
        kernel = GatewayKernel(self.client, kernel_id, kernel_name, connection, glyph_id, resumed=True)
        try:
            await execution.wait_for_ready(connection, kernel.is_alive, min(timeout, KERNEL_START_TIMEOUT))
        except BaseException:
            await connection.close()
            raise
        self.state.remember(glyph_id, kernel_id, kernel_name, connection)
        log.info("re-attached glyph %r to its gateway kernel %s", glyph_id, kernel_id)
        return kernel

    async def _start(self, kernel_name: str, glyph_id: str | None, timeout: float) -> GatewayKernel:
        timeout = max(timeout, KERNEL_START_TIMEOUT)
        kernel_id = await self.client.start_kernel(kernel_name, self._kernel_environment(glyph_id), timeout)
        self.started += 1
        try:
            connection = await GatewayConnection.open(self.client, kernel_id, uuid.uuid4().hex, timeout)
        except BaseException:
            await self._delete_quietly(kernel_id)
            raise
        kernel = GatewayKernel(self.client, kernel_id, kernel_name, connection, glyph_id)
        try:
            await execution.wait_for_ready(connection, kernel.is_alive, timeout)
            if self._setup_code is not None:
                await execution.run_silently(connection, self._setup_code(), timeout=timeout)
        except BaseException:
            await connection.close()
            await self._delete_quietly(kernel_id)
            raise
        if glyph_id:
            self.state.remember(glyph_id, kernel_id, kernel_name, connection)
        log.info("started gateway kernel %s (%s) for glyph %r", kernel_id, kernel_name, glyph_id)
        return kernel

    def _kernel_environment(self, glyph_id: str | None) -> dict[str, str]:
        # As jupyter_server's gateway client does: the provider's KERNEL_* variables (KERNEL_CPUS,
        # KERNEL_MEMORY, KERNEL_NAMESPACE, ...) go with each start; Enterprise Gateway reads them.
        env = {key: value for key, value in os.environ.items() if key.startswith("KERNEL_")}
        # The user the kernel runs for; Enterprise Gateway refuses "root" (its unauthorized_users).
        user = getpass.getuser()
        env.setdefault("KERNEL_USERNAME", user if user != "root" else "kernel-provider")
        if glyph_id:
            env["KERNEL_GLYPH_ID"] = glyph_id
        return env

    async def _delete_quietly(self, kernel_id: str) -> None:
        try:
            await self.client.delete(kernel_id)
        except GatewayUnavailable as exc:
            log.warning("could not stop gateway kernel %s: %s", kernel_id, exc)

    async def give_back(self, kernel: GatewayKernel) -> None:
        """Stop the kernel on the gateway and free its slot."""
        try:
            await kernel.connection.close()
            if kernel.glyph_id:
                self.state.forget(kernel.glyph_id, kernel.kernel_id)
            await self._delete_quietly(kernel.kernel_id)
        finally:
            self.capacity.release()

    async def detach(self, kernel: GatewayKernel) -> None:
        """Let go of the kernel but leave it running, for the next provider to re-attach."""
        try:
            await kernel.connection.close()
            if not kernel.glyph_id:  # nobody could re-attach to a run without a glyph
                await self._delete_quietly(kernel.kernel_id)
        finally:
            self.capacity.release()

    def configure_pool(self, kernel_name: str, size: int) -> None:
        """Gateway kernels are not pooled (see the class)."""

    async def close(self) -> None:
        """Nothing of the supply's own to stop: kernels are detached or given back by their sessions."""
