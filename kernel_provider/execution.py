"""Run one piece of code on a Jupyter kernel and gather what it says.

This is the only module that speaks the Jupyter messaging protocol. It sends one
execute_request, keeps the iopub messages whose parent is that request (so code
another client runs on the same kernel never leaks in), and turns them into
nbformat v4 outputs the way nbclient does, honouring clear_output and
update_display_data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kernel_provider.kernels.connection import ConnectionClosed, KernelConnection

log = logging.getLogger(__name__)

# How often a quiet kernel is checked for death while we wait on it. Only a run
# that is silent for this long pays the check, so it costs normal runs nothing.
LIVENESS_POLL_SECONDS = 0.25

# How long an interrupted kernel has to come back to idle before we give up on it.
INTERRUPT_GRACE_SECONDS = 3.0

# How long a reply may trail the kernel's idle status before we take it as never coming.
REPLY_AFTER_IDLE_SECONDS = 5.0

# Bytes of a last value's text/plain kept when other output has used up the limit: the value
# is what a glyph shows as its result, so a flood on stdout or stderr must not take it away.
RESULT_TEXT_RESERVE = 4096

# Metadata key of our execute_requests; the prelude's pre_run_cell hook reads it.
REQUEST_METADATA_KEY = "kernel_provider"


class KernelDied(Exception):
    """The kernel process went away before the run finished."""

    def __init__(self, outputs: list[dict[str, Any]]):
        super().__init__("kernel died")
        self.outputs = outputs


class InterruptFailed(Exception):
    """The run outlived its deadline and an interrupt did not bring the kernel back."""

    def __init__(self, outputs: list[dict[str, Any]]):
        super().__init__("interrupt did not take")
        self.outputs = outputs


@dataclass
class RunOutcome:
    """What one execute_request produced."""

    outputs: list[dict[str, Any]]
    execution_count: int | None
    timed_out: bool
    dropped_bytes: int
    # What the kernel answered for each requested user expression (Jupyter's mime-bundle form).
    user_expressions: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputCollector:
    """Builds the output list of one run, as a notebook front end would.

    ``limit`` bounds the bytes of text and mime data kept; what is over it is
    counted in ``dropped_bytes`` instead, so a runaway print cannot grow a
    response past what gRPC will carry.

    ``on_event`` hears, in the order the kernel sent them, each output kept
    (``{"type": "output", "output": ..., "display_id"?: ...}``), each
    ``{"type": "clear_output", "wait": bool}`` and each
    ``{"type": "update_display_data", "display_id": ..., "output": ...}``, so a live
    front end can show what a notebook shows while the code runs. It must serialize
    an event before returning: a kept output may still change.
    """

    limit: int
    on_event: Callable[[dict[str, Any]], None] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    used_bytes: int = 0
    dropped_bytes: int = 0
    _clear_before_next: bool = False
    _display_index: dict[str, list[int]] = field(default_factory=dict)
    _first_cut_stream: str | None = None  # where the truncation marker goes

    def handle(self, msg: dict[str, Any]) -> None:
        msg_type = msg["msg_type"]
        content = msg["content"]
        display_id = content.get("transient", {}).get("display_id")
        if msg_type == "clear_output":
            wait = bool(content.get("wait"))
            if wait:
                self._clear_before_next = True
            else:
                self._clear()
            self._emit({"type": "clear_output", "wait": wait})
            return
        if msg_type == "update_display_data":
            # Without a display id an update has nothing to update (Jupyter always sends one).
            updated = self._update_display(display_id, content) if display_id else None
            if updated is not None:
                self._emit({"type": "update_display_data", "display_id": display_id, "output": updated})
            return
        if msg_type not in ("stream", "display_data", "execute_result", "error"):
            return
        if self._clear_before_next:
            self._clear()
        output = output_from_msg(msg_type, content)
        if msg_type == "stream":
            text = self._add_stream(output)
            # A chunk of its own: the kept output may be merged with later chunks.
            live = {"output_type": "stream", "name": output["name"], "text": text} if text else None
        else:
            kept = self._add_rich(output, display_id)
            live = output if kept else None
        # Live listeners get what the run keeps, so they too stay within the output limit.
        if live is not None:
            event = {"type": "output", "output": live}
            if display_id and msg_type == "display_data":
                event["display_id"] = display_id
            self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _clear(self) -> None:
        self.outputs.clear()
        self._display_index.clear()
        self._clear_before_next = False

    def _add_stream(self, output: dict[str, Any]) -> str:
        """Add a stream chunk; returns the part of its text that was kept."""
        text = self._take_text(output["text"])
        if len(text) < len(output["text"]) and self._first_cut_stream is None:
            self._first_cut_stream = output["name"]
        if not text:
            return text
        last = self.outputs[-1] if self.outputs else None
        # Consecutive chunks of one stream become one output, as Jupyter front ends show them.
        if last is not None and last["output_type"] == "stream" and last["name"] == output["name"]:
            last["text"] += text
        else:
            output["text"] = text
            self.outputs.append(output)
        return text

    def _add_rich(self, output: dict[str, Any], display_id: str | None) -> bool:
        size = _bundle_size(output.get("data", {})) + sum(len(line.encode()) for line in output.get("traceback", []))
        # An error is always kept: losing why a run failed is worse than a few bytes over.
        if output["output_type"] != "error" and self.used_bytes + size > self.limit:
            if output["output_type"] != "execute_result":
                self.dropped_bytes += size
                return False
            # The last value keeps its text, up to a small reserve past the limit.
            text = str(output.get("data", {}).get("text/plain", ""))
            kept = text.encode("utf-8", "surrogatepass")[:RESULT_TEXT_RESERVE].decode("utf-8", "ignore")
            output["data"] = {"text/plain": kept}
            kept_size = len(kept.encode("utf-8", "surrogatepass"))
            self.dropped_bytes += size - kept_size
            size = kept_size
        self.used_bytes += size
        if display_id:
            self._display_index.setdefault(display_id, []).append(len(self.outputs))
        self.outputs.append(output)
        return True

    def _update_display(self, display_id: str | None, content: dict[str, Any]) -> dict[str, Any] | None:
        """Apply an update to the outputs showing ``display_id``; the display_data it amounts to.

        None when the update is dropped: its data would take the run past its output
        limit. An update of a display another run showed is passed on, not kept.
        """
        data, metadata = content.get("data", {}), content.get("metadata", {})
        size = _bundle_size(data)
        indexes = self._display_index.get(display_id, [])
        growth = sum(size - _bundle_size(self.outputs[index]["data"]) for index in indexes)
        if size > self.limit or self.used_bytes + growth > self.limit:
            self.dropped_bytes += size
            return None
        self.used_bytes += growth
        for index in indexes:
            self.outputs[index]["data"] = data
            self.outputs[index]["metadata"] = metadata
        return {"output_type": "display_data", "data": data, "metadata": metadata}

    def _take_text(self, text: str) -> str:
        encoded = text.encode("utf-8", "surrogatepass")
        room = self.limit - self.used_bytes
        if len(encoded) <= room:
            self.used_bytes += len(encoded)
            return text
        kept = encoded[: max(room, 0)].decode("utf-8", "ignore")
        kept_size = len(kept.encode("utf-8", "surrogatepass"))
        self.used_bytes += kept_size
        self.dropped_bytes += len(encoded) - kept_size
        return kept

    def finish(self) -> list[dict[str, Any]]:
        if self.dropped_bytes:
            marker = (
                f"\n[kernel_provider: output truncated, {self.dropped_bytes} bytes dropped "
                f"(limit {self.limit} bytes)]\n"
            )
            # In the stream that was cut, so a reader of that stream sees where it stops.
            self.outputs.append({"output_type": "stream", "name": self._first_cut_stream or "stdout", "text": marker})
        return self.outputs


def output_from_msg(msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """The nbformat v4 output for an iopub output message.

    The same shapes as ``nbformat.v4.output_from_msg``, which also validates each
    output against the notebook schema: that check cost about a third of the
    provider's own time per trivial run (see benchmarks/execute_latency.py), and the
    test suite validates our outputs against the schema instead.
    """
    if msg_type == "stream":
        return {"output_type": "stream", "name": content["name"], "text": content["text"]}
    if msg_type == "error":
        return {
            "output_type": "error",
            "ename": content["ename"],
            "evalue": content["evalue"],
            "traceback": content["traceback"],
        }
    output = {
        "output_type": msg_type,
        "metadata": content.get("metadata", {}),
        "data": content.get("data", {}),
    }
    if msg_type == "execute_result":
        output["execution_count"] = content.get("execution_count")
    return output


def _bundle_size(data: dict[str, Any]) -> int:
    size = 0
    for value in data.values():
        size += len(value.encode()) if isinstance(value, str) else len(repr(value).encode())
    return size


# An input_request whose prompt starts with this is a call of the prelude's attest() or last(),
# not a person's input(): the provider answers it (see prelude.py and attestations.py).
SERVICE_PROMPT = "\x00kernel_provider:"
# The answer to any other input_request: EOF. The prelude makes input() fail before it asks,
# so this only answers a kernel that was not set up by us (or code that went around it).
EOF_ANSWER = "\x04"

# attest() checks its requests against this too, so that it can say what is wrong before sending.
MAX_SERVICE_REQUEST_CHARS = 1_000_000
# A handler for service calls a kernel makes mid-run: gets the decoded request, answers JSON.
ServiceHandler = Callable[[Any], Awaitable[Any]]


async def run_code(
    connection: KernelConnection,
    code: str,
    *,
    timeout: float,
    output_limit: int,
    is_alive: Callable[[], Awaitable[bool]],
    interrupt: Callable[[], Awaitable[None]],
    request_metadata: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_started: Callable[[], None] | None = None,
    on_service_call: ServiceHandler | None = None,
    silent: bool = False,
    user_expressions: dict[str, str] | None = None,
) -> RunOutcome:
    """Execute ``code`` and wait for its outputs, at most ``timeout`` seconds.

    On timeout the kernel is interrupted and the outputs up to then are kept
    (``timed_out`` is set). ``on_started`` is called once the kernel has begun the code
    (its execute_input): from then on an interrupt reaches the code. ``on_service_call``
    answers the prelude's attest()/last(), which travel on the kernel's stdin channel. A
    ``silent`` run leaves no trace in the kernel's history or execution count. Raises
    KernelDied when the kernel process goes away, and InterruptFailed when an interrupt
    does not return it to idle in time.
    """
    content = {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": user_expressions or {},
        # The prelude's attest() and last() ask over stdin; input() itself still fails at once.
        "allow_stdin": True,
        # An error of ours must not abort what another attached client has queued.
        "stop_on_error": False,
    }
    metadata = {REQUEST_METADATA_KEY: request_metadata or {}}
    try:
        inbox = connection.request("shell", "execute_request", content, metadata)
    except ConnectionClosed:  # the far end (a gateway) dropped the kernel's channels between runs
        raise KernelDied([]) from None
    collector = OutputCollector(limit=output_limit, on_event=on_event)
    execution_count: int | None = None
    timed_out = False
    deadline = time.monotonic() + timeout
    reply: dict[str, Any] | None = None
    idle, idle_at = False, 0.0
    services: set[asyncio.Task] = set()
    try:
        while reply is None or not idle:
            now = time.monotonic()
            if idle:  # the reply may trail idle, or never come (see below)
                if now >= idle_at + REPLY_AFTER_IDLE_SECONDS:
                    break
                wait = idle_at + REPLY_AFTER_IDLE_SECONDS - now
            elif now >= deadline:
                if timed_out:
                    raise InterruptFailed(collector.finish())
                timed_out = True
                await interrupt()
                deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                continue
            else:
                wait = deadline - now
            try:
                channel, msg = await inbox.get(min(wait, LIVENESS_POLL_SECONDS))
            except TimeoutError:
                if not await is_alive():
                    raise KernelDied(collector.finish()) from None
                continue
            except ConnectionClosed:
                raise KernelDied(collector.finish()) from None
            msg_type = msg["msg_type"]
            if channel == "shell":
                if msg_type == "execute_reply":
                    reply = msg
            elif channel == "stdin":
                if msg_type == "input_request":
                    task = asyncio.ensure_future(_answer_input(connection, msg, on_service_call))
                    services.add(task)
                    task.add_done_callback(services.discard)
            elif msg_type == "status":
                if msg["content"].get("execution_state") == "idle":
                    idle, idle_at = True, time.monotonic()
            elif msg_type == "execute_input":
                execution_count = msg["content"].get("execution_count")
                if on_started is not None:
                    on_started()
            else:
                collector.handle(msg)
    finally:
        connection.forget(inbox)
        for task in services:
            task.cancel()

    # ipykernel sends the reply before it reports idle. But an interrupt that lands in
    # ipykernel's own request handling, just before or after the code, ends the request
    # with idle and no reply: the kernel is fine, and waiting out the deadline would only
    # end in a needless restart.
    answer = reply["content"] if reply is not None else {}
    if reply is not None and not silent:
        execution_count = answer.get("execution_count", execution_count)
    if not answer:
        answer = {
            "status": "error",
            "ename": "KeyboardInterrupt",
            "evalue": "the kernel was interrupted in its own handling of this code and sent no reply",
        }
    # The reply is the kernel's verdict. It can say error without an error output on iopub
    # (IPython failing to format an interrupt's traceback), and the run failed all the same.
    if answer.get("status") == "error" and not any(o["output_type"] == "error" for o in collector.outputs):
        collector.outputs.append(
            {
                "output_type": "error",
                "ename": answer.get("ename", "Error"),
                "evalue": answer.get("evalue", ""),
                "traceback": answer.get("traceback", []),
            }
        )

    return RunOutcome(
        outputs=collector.finish(),
        execution_count=execution_count,
        timed_out=timed_out,
        dropped_bytes=collector.dropped_bytes,
        user_expressions=answer.get("user_expressions") or {},
    )


async def _answer_input(connection: KernelConnection, request: dict[str, Any], handler: ServiceHandler | None) -> None:
    """Answer an input_request: a service call of the prelude's, or EOF for anything else."""
    prompt = request["content"].get("prompt", "")
    if not (isinstance(prompt, str) and prompt.startswith(SERVICE_PROMPT)):
        connection.reply("stdin", "input_reply", {"value": EOF_ANSWER}, request)
        return
    try:
        if handler is None:
            raise ServiceError("this run has no connection to the attestation service.")
        if len(prompt) > MAX_SERVICE_REQUEST_CHARS:
            raise ServiceError(f"the request is larger than {MAX_SERVICE_REQUEST_CHARS} characters.")
        answer = {"ok": True, "result": await handler(json.loads(prompt[len(SERVICE_PROMPT) :]))}
    except ServiceError as exc:
        error = str(exc)
        answer = {"ok": False, "error": error if error.endswith(".") else f"{error}."}
    except ValueError:
        answer = {"ok": False, "error": "the request is not JSON."}
    except Exception as exc:  # a bug of ours must reach the glyph as an error
        log.exception("a kernel's service call failed")
        answer = {"ok": False, "error": f"internal error of the kernel provider: {type(exc).__name__}: {exc}"}
    connection.reply("stdin", "input_reply", {"value": json.dumps(answer)}, request)


class ServiceError(Exception):
    """A service call the kernel should hear about; the message is one sentence for a person."""


async def request_reply(
    connection: KernelConnection,
    msg_type: str,
    content: dict[str, Any],
    *,
    timeout: float,
    channel: str = "shell",
) -> dict[str, Any]:
    """Send a request and return its reply's content; TimeoutError when none comes in time."""
    inbox = connection.request(channel, msg_type, content)
    try:
        async with asyncio.timeout(timeout):
            while True:
                got, msg = await inbox.get(timeout)
                if got == channel and msg["msg_type"].endswith("_reply"):
                    return msg["content"]
    finally:
        connection.forget(inbox)


def _silent_content(code: str) -> dict[str, Any]:
    """An execute_request's content that leaves no trace: no history, no outputs, no input."""
    return {"code": code, "silent": True, "store_history": False, "allow_stdin": False, "user_expressions": {}}


def send_silently(connection: KernelConnection, code: str) -> None:
    """Queue set-up code ahead of the next request without waiting for it.

    The kernel runs shell requests in arrival order, so the next run sees what this did;
    for code that cannot fail (an assignment), this saves the first run a round trip.
    """
    content = _silent_content(code)
    connection.forget(connection.request("shell", "execute_request", content))


async def run_silently(connection: KernelConnection, code: str, *, timeout: float) -> None:
    """Run set-up code that must not show up in history or outputs; raise if it fails."""
    content = _silent_content(code)
    answer = await request_reply(connection, "execute_request", content, timeout=timeout)
    if answer.get("status") != "ok":
        raise RuntimeError(f"kernel set-up failed: {answer.get('ename')}: {answer.get('evalue')}")


async def wait_for_ready(
    connection: KernelConnection, is_alive: Callable[[], Awaitable[bool]], timeout: float
) -> dict[str, Any]:
    """Wait until the kernel answers kernel_info on shell *and* its iopub reaches us.

    A SUB socket misses what is published before its subscription lands, so a kernel is
    ready only once the status messages of one of our requests arrive on iopub too.
    Returns the kernel_info reply's content.
    """
    deadline = time.monotonic() + timeout
    while True:
        inbox = connection.request("shell", "kernel_info_request", {})
        info = None
        try:
            # A request's iopub status may arrive before or after its reply; wait for both.
            end = time.monotonic() + 1.0
            seen_iopub = False
            while (remaining := end - time.monotonic()) > 0 and not (info is not None and seen_iopub):
                try:
                    channel, msg = await inbox.get(remaining)
                except TimeoutError:
                    break
                if channel == "shell" and msg["msg_type"] == "kernel_info_reply":
                    info = msg["content"]
                    end = min(end, time.monotonic() + 0.2)
                elif channel == "iopub":
                    seen_iopub = True
            if info is not None and seen_iopub:
                await connection.ready(max(deadline - time.monotonic(), 1.0))
                return info
        finally:
            connection.forget(inbox)
        if not await is_alive():
            raise RuntimeError("the kernel died before it answered kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel did not answer within {timeout:g} seconds")


async def interrupt_until_idle(
    connection: KernelConnection,
    interrupt: Callable[[], Awaitable[None]],
    is_alive: Callable[[], Awaitable[bool]],
    grace: float,
) -> bool:
    """Interrupt whatever the kernel runs and wait until it takes requests again; False if it does not.

    An empty silent request queued behind the running one is answered only once the
    kernel is done with it; an interrupt that lands before the code started is ignored
    by the kernel, hence one more each second.
    """
    await interrupt()
    content = _silent_content("")
    inbox = connection.request("shell", "execute_request", content)
    deadline = time.monotonic() + grace
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                channel, msg = await inbox.get(min(remaining, 1.0))
            except TimeoutError:
                if not await is_alive():
                    return False
                await interrupt()
                continue
            if channel == "shell":
                return True
    except ConnectionClosed:
        return False
    finally:
        connection.forget(inbox)
    return False
