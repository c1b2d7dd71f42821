"""Run one piece of code on a Jupyter kernel and gather what it says.

This is the only module that speaks the Jupyter messaging protocol. It sends one
execute_request, keeps the iopub messages whose parent is that request (so code
another client runs on the same kernel never leaks in), and turns them into
nbformat v4 outputs the way nbclient does, honouring clear_output and
update_display_data.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient

# How often a quiet kernel is checked for death while we wait on it. Only a run
# that is silent for this long pays the check, so it costs normal runs nothing.
LIVENESS_POLL_SECONDS = 0.25

# How long an interrupted kernel has to come back to idle before we give up on it.
INTERRUPT_GRACE_SECONDS = 3.0

# How long a reply may trail the kernel's idle status before we take it as never coming.
REPLY_AFTER_IDLE_SECONDS = 5.0

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
    """

    limit: int
    on_output: Callable[[dict[str, Any]], None] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    used_bytes: int = 0
    dropped_bytes: int = 0
    _clear_before_next: bool = False
    _display_index: dict[str, list[int]] = field(default_factory=dict)

    def handle(self, msg: dict[str, Any]) -> None:
        msg_type = msg["msg_type"]
        content = msg["content"]
        if msg_type == "clear_output":
            if content.get("wait"):
                self._clear_before_next = True
            else:
                self._clear()
            return
        if msg_type == "update_display_data":
            self._update_display(content)
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
            kept = self._add_rich(output, content.get("transient", {}).get("display_id"))
            live = output if kept else None
        # Live listeners get what the run keeps, so they too stay within the output limit.
        if self.on_output is not None and live is not None:
            self.on_output(live)

    def _clear(self) -> None:
        self.outputs.clear()
        self._display_index.clear()
        self._clear_before_next = False

    def _add_stream(self, output: dict[str, Any]) -> str:
        """Add a stream chunk; returns the part of its text that was kept."""
        text = self._take_text(output["text"])
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
            self.dropped_bytes += size
            return False
        self.used_bytes += size
        if display_id:
            self._display_index.setdefault(display_id, []).append(len(self.outputs))
        self.outputs.append(output)
        return True

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = content.get("transient", {}).get("display_id")
        for index in self._display_index.get(display_id, []):
            self.outputs[index]["data"] = content.get("data", {})
            self.outputs[index]["metadata"] = content.get("metadata", {})

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
            self.outputs.append({"output_type": "stream", "name": "stdout", "text": marker})
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


async def run_code(
    client: AsyncKernelClient,
    code: str,
    *,
    timeout: float,
    output_limit: int,
    is_alive: Callable[[], Awaitable[bool]],
    interrupt: Callable[[], Awaitable[None]],
    request_metadata: dict[str, Any] | None = None,
    on_output: Callable[[dict[str, Any]], None] | None = None,
    on_started: Callable[[], None] | None = None,
    silent: bool = False,
    user_expressions: dict[str, str] | None = None,
) -> RunOutcome:
    """Execute ``code`` and wait for its outputs, at most ``timeout`` seconds.

    On timeout the kernel is interrupted and the outputs up to then are kept
    (``timed_out`` is set). ``on_started`` is called once the kernel has begun the code
    (its execute_input): from then on an interrupt reaches the code. A ``silent`` run
    leaves no trace in the kernel's history or execution count. Raises KernelDied when
    the kernel process goes away, and InterruptFailed when an interrupt does not return
    it to idle in time.
    """
    content = {
        "code": code,
        "silent": silent,
        "store_history": not silent,
        "user_expressions": user_expressions or {},
        # input() must fail at once instead of waiting for a person who is not there.
        "allow_stdin": False,
        # An error of ours must not abort what another attached client has queued.
        "stop_on_error": False,
    }
    metadata = {REQUEST_METADATA_KEY: request_metadata or {}}
    msg = client.session.msg("execute_request", content, metadata=metadata)
    msg_id = msg["header"]["msg_id"]
    client.shell_channel.send(msg)

    collector = OutputCollector(limit=output_limit, on_output=on_output)
    execution_count: int | None = None
    timed_out = False
    deadline = time.monotonic() + timeout

    async def next_message(receive: Callable[..., Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
        """One message of ours, or None when the wait should be re-checked."""
        nonlocal deadline, timed_out
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if timed_out:
                raise InterruptFailed(collector.finish())
            timed_out = True
            await interrupt()
            deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
            return None
        try:
            reply = await receive(timeout=min(remaining, LIVENESS_POLL_SECONDS))
        except queue.Empty:
            if not await is_alive():
                raise KernelDied(collector.finish()) from None
            return None
        if reply.get("parent_header", {}).get("msg_id") != msg_id:
            return None
        return reply

    while True:
        iopub = await next_message(client.get_iopub_msg)
        if iopub is None:
            continue
        msg_type = iopub["msg_type"]
        if msg_type == "status":
            if iopub["content"].get("execution_state") == "idle":
                break
        elif msg_type == "execute_input":
            execution_count = iopub["content"].get("execution_count")
            if on_started is not None:
                on_started()
        else:
            collector.handle(iopub)

    # ipykernel sends the reply before it reports idle, so this does not wait in practice;
    # it keeps the shell channel free of stale replies. But an interrupt that lands in
    # ipykernel's own request handling, just before or after the code, ends the request
    # with idle and no reply: the kernel is fine, and waiting out the deadline would only
    # end in a needless restart.
    reply: dict[str, Any] = {"content": {}}
    reply_deadline = time.monotonic() + REPLY_AFTER_IDLE_SECONDS
    while (remaining := reply_deadline - time.monotonic()) > 0:
        try:
            answer = await client.get_shell_msg(timeout=remaining)
        except queue.Empty:
            break
        if answer.get("parent_header", {}).get("msg_id") == msg_id:
            reply = answer
            if not silent:
                execution_count = reply["content"].get("execution_count", execution_count)
            break
    if not reply["content"]:
        reply["content"] = {
            "status": "error",
            "ename": "KeyboardInterrupt",
            "evalue": "the kernel was interrupted in its own handling of this code and sent no reply",
        }
    # The reply is the kernel's verdict. It can say error without an error output on iopub
    # (IPython failing to format an interrupt's traceback), and the run failed all the same.
    content = reply["content"]
    if content.get("status") == "error" and not any(o["output_type"] == "error" for o in collector.outputs):
        collector.outputs.append(
            {
                "output_type": "error",
                "ename": content.get("ename", "Error"),
                "evalue": content.get("evalue", ""),
                "traceback": content.get("traceback", []),
            }
        )

    return RunOutcome(
        outputs=collector.finish(),
        execution_count=execution_count,
        timed_out=timed_out,
        dropped_bytes=collector.dropped_bytes,
        user_expressions=reply["content"].get("user_expressions") or {},
    )


async def run_silently(client: AsyncKernelClient, code: str, *, timeout: float) -> None:
    """Run set-up code that must not show up in history or outputs; raise if it fails."""
    msg_id = client.execute(code, silent=True, store_history=False, allow_stdin=False)
    async with asyncio.timeout(timeout):
        while True:
            reply = await client.get_shell_msg()
            if reply["parent_header"].get("msg_id") == msg_id:
                break
    if reply["content"].get("status") != "ok":
        content = reply["content"]
        raise RuntimeError(f"kernel set-up failed: {content.get('ename')}: {content.get('evalue')}")
