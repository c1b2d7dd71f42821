"""Live output: PythonService.ExecuteStream and runs over DomainPluginService.HandleWebSocket.

Real provider, real kernels. "While the code runs" is proven without clocks: the code
prints, then waits for a file the test creates only after it has received that print;
if events were held back until the end, the code would give up waiting and say so.
"""

from __future__ import annotations

import json
import os
import queue
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kernel_provider.proto import domain_pb2, python_pb2
from kernel_provider.reply_queue import REPLY_QUEUE_BYTES

Message = domain_pb2.WebSocketMessage
Type = Message.Type
RESULT_KEYS = {"success", "stdout", "stderr", "result", "error", "duration_ms", "execution_count", "outputs"}
# How long code waits for the test's go-ahead before it gives up and says so.
WAIT_SECONDS = 30
# A run after an interrupted one must come back well before the interrupted code would have ended.
AFTER_CANCEL_TIMEOUT = 20
GRPC_LIMIT = 4 * 1024 * 1024


def glyph() -> str:
    return f"stream-{uuid.uuid4().hex[:8]}"


def stream(plugin, code: str, glyph_id: str = "", upstream: bytes = b"", timeout: float = 120):
    request = python_pb2.PythonExecuteRequest(code=code, glyph_id=glyph_id, upstream_attestation=upstream)
    return plugin.python.ExecuteStream(request, timeout=timeout)


def wait_for_file_code(path: Path) -> str:
    """Code that prints 'a', waits for ``path`` to exist, then prints 'b' (or 'gave up')."""
    return (
        "import os, time\n"
        "print('a', flush=True)\n"
        f"deadline = time.monotonic() + {WAIT_SECONDS}\n"
        f"while not os.path.exists({str(path)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        f"print('b' if os.path.exists({str(path)!r}) else 'gave up', flush=True)\n"
    )


LOOP_CODE = (
    "import time\n"
    "during = 'set'\n"
    "print('looping', flush=True)\n"
    "for _ in range(600):\n"
    "    time.sleep(0.1)\n"
    "after = 'set'\n"
)


def merge_streams(outputs: list[dict]) -> list[dict]:
    """What a notebook shows for live outputs: consecutive chunks of one stream joined."""
    merged: list[dict] = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (
            output["output_type"] == "stream"
            and last is not None
            and last["output_type"] == "stream"
            and last["name"] == output["name"]
        ):
            last["text"] += output["text"]
        else:
            merged.append(dict(output))
    return merged


def read_stdout_until(events, text: str) -> list[dict]:
    """Outputs from ``events`` until the stdout seen so far ends with ``text``."""
    outputs, seen = [], ""
    while not seen.endswith(text):
        event = next(events)
        assert event.WhichOneof("event") == "output", f"run ended before printing {text!r}: {event}"
        output = json.loads(event.output)
        outputs.append(output)
        if output["output_type"] == "stream" and output["name"] == "stdout":
            seen += output["text"]
    return outputs


# ---------------------------------------------------------------- ExecuteStream


def test_outputs_arrive_while_the_code_runs(provider, tmp_path):
    go = tmp_path / "go"
    events = stream(provider, wait_for_file_code(go), glyph())
    first = read_stdout_until(events, "a\n")
    assert "".join(o["text"] for o in first) == "a\n"
    go.touch()  # only now may the code go on
    rest = list(events)
    kinds = [e.WhichOneof("event") for e in rest]
    assert kinds == ["output"] * (len(rest) - 1) + ["done"]
    later = [json.loads(e.output) for e in rest[:-1]]
    assert "".join(o["text"] for o in later) == "b\n"
    done = rest[-1].done
    result = json.loads(done.result)
    assert result["stdout"] == "a\nb\n" and done.output == "a\nb\n"
    assert done.success and result["success"]


def test_every_kind_of_output_is_an_event_and_the_last_is_executes_answer(provider):
    code = (
        "import sys\n"
        "from IPython.display import HTML, display\n"
        "print('out', flush=True)\n"
        "print('err', file=sys.stderr, flush=True)\n"
        "display(HTML('<b>hi</b>'), metadata={'k': 1})\n"
        "40 + 2\n"
    )
    events = list(stream(provider, code, glyph()))
    assert [e.WhichOneof("event") for e in events[-1:]] == ["done"]
    outputs = [json.loads(e.output) for e in events[:-1]]
    displays = [o for o in outputs if o["output_type"] == "display_data"]
    assert len(displays) == 1
    assert displays[0]["data"]["text/html"] == "<b>hi</b>"
    assert "text/plain" in displays[0]["data"] and displays[0]["metadata"] == {"k": 1}
    assert outputs[-1] == {
        "output_type": "execute_result",
        "execution_count": outputs[-1]["execution_count"],
        "metadata": {},
        "data": {"text/plain": "42"},
    }

    done = events[-1].done
    result = json.loads(done.result)
    assert set(result) == RESULT_KEYS
    assert result["outputs"] == merge_streams(outputs)
    assert (result["stdout"], result["stderr"], result["result"]) == ("out\n", "err\n", "42")
    assert done.success and done.output == "out\n" and done.error == ""

    # The same code through Execute gives the same answer, but for timing and history.
    answer = provider.run(code, glyph())
    for key in ("duration_ms", "execution_count"):
        result.pop(key), answer.pop(key)
    for output in [*result["outputs"], *answer["outputs"]]:
        output.pop("execution_count", None)
    assert result == answer


def test_an_error_is_an_event_and_fails_the_run(provider):
    events = list(stream(provider, "print('before')\n1 / 0", glyph()))
    outputs = [json.loads(e.output) for e in events[:-1]]
    assert outputs[0] == {"output_type": "stream", "name": "stdout", "text": "before\n"}
    assert outputs[-1]["output_type"] == "error" and outputs[-1]["ename"] == "ZeroDivisionError"
    done = events[-1].done
    assert not done.success
    assert done.error.startswith("ZeroDivisionError: division by zero")
    assert json.loads(done.result)["error"] == done.error


def test_cancelling_the_stream_interrupts_the_run_and_keeps_the_state(provider):
    g = glyph()
    assert provider.run("before = 'set'", g)["success"]
    events = stream(provider, LOOP_CODE, g)
    read_stdout_until(events, "looping\n")
    events.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:
        list(events)
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED

    # Had the loop gone on, this run would wait behind it and time out.
    result = provider.run("(before, during, 'after' in globals())", g, timeout=AFTER_CANCEL_TIMEOUT)
    assert result["success"], result["error"]
    assert result["result"] == "('set', 'set', False)"
    # And the glyph goes on as usual.
    assert provider.run("before", g)["result"] == "'set'"


def test_cancelling_at_once_still_stops_the_code(provider):
    """The interrupt may land before the kernel starts on the code; the code must stop anyway."""
    g = glyph()
    assert provider.run("before = 'set'", g)["success"]
    for _ in range(3):
        stream(provider, LOOP_CODE, g).cancel()
        result = provider.run("(before, 'after' in globals())", g, timeout=AFTER_CANCEL_TIMEOUT)
        assert result["success"], result["error"]
        assert result["result"] == "('set', False)"


def test_cancelling_while_the_kernel_starts_starts_no_second_kernel(fresh_provider):
    plugin = fresh_provider()
    g = glyph()
    events = stream(plugin, "started_code = True", g)

    # Cancel once the provider has begun starting the glyph's kernel, before it is up.
    def kernel_starting() -> bool:
        folder = plugin.connection_dir
        return folder.is_dir() and any(g in name for name in os.listdir(folder))

    while not kernel_starting():
        time.sleep(0.005)
    events.cancel()
    result = plugin.run("'started_code' in globals()", g)
    assert result["success"], result["error"]
    assert result["result"] == "False"
    log = "".join(plugin.stderr_lines)
    assert log.count(f"started kernel python3 for glyph {g!r}") == 1
    assert "Address already in use" not in log
    assert len(plugin.kernel_pids()) == 1


def test_live_output_stays_within_the_output_limit(fresh_provider):
    plugin = fresh_provider("--max-output-bytes", "1024")
    events = list(stream(plugin, "for _ in range(50): print('x' * 99, flush=True)", glyph()))
    live = [json.loads(e.output) for e in events[:-1]]
    assert sum(len(o["text"]) for o in live) == 1024
    result = json.loads(events[-1].done.result)
    assert result["stdout"].startswith("".join(o["text"] for o in live))
    assert "output truncated" in result["stdout"]


def test_clear_output_and_display_updates_are_events_in_order(provider):
    code = (
        "from IPython.display import HTML, clear_output, display\n"
        "handle = display(HTML('<b>first</b>'), display_id=True)\n"
        "handle.update(HTML('<b>second</b>'))\n"
        "clear_output(wait=True)\n"
        "print('after clear')\n"
    )
    events = list(stream(provider, code, glyph()))
    assert [e.WhichOneof("event") for e in events] == [
        "output",
        "update_display_data",
        "clear_output",
        "output",
        "done",
    ]
    shown, updated, cleared, printed, done = events
    assert shown.display_id and updated.display_id == shown.display_id
    assert json.loads(shown.output)["data"]["text/html"] == "<b>first</b>"
    assert json.loads(updated.update_display_data) == {
        "output_type": "display_data",
        "data": {"text/html": "<b>second</b>", "text/plain": "<IPython.core.display.HTML object>"},
        "metadata": {},
    }
    assert cleared.clear_output.wait
    assert printed.display_id == ""
    assert json.loads(printed.output) == {"output_type": "stream", "name": "stdout", "text": "after clear\n"}
    assert json.loads(done.done.result)["outputs"] == [json.loads(printed.output)]


def test_a_display_update_over_the_output_limit_is_dropped(fresh_provider):
    plugin = fresh_provider("--max-output-bytes", "1024")
    code = (
        "from IPython.display import HTML, display\n"
        "handle = display(HTML('small'), display_id=True)\n"
        "handle.update(HTML('x' * 2000))\n"
        "handle.update(HTML('fits'))\n"
    )
    events = list(stream(plugin, code, glyph()))
    updates = [json.loads(e.update_display_data) for e in events if e.WhichOneof("event") == "update_display_data"]
    assert [u["data"]["text/html"] for u in updates] == ["fits"]
    result = json.loads(events[-1].done.result)
    assert result["outputs"][0]["data"]["text/html"] == "fits"
    # 2000 bytes of HTML and 34 of its text/plain form.
    assert "output truncated, 2034 bytes dropped" in result["stdout"]


def test_every_event_stays_under_4_mb_whatever_the_output(provider):
    g = glyph()
    # JSON escapes each of these as \u0001: 5.4 MB of JSON for 0.9 MB of text.
    events = list(stream(provider, "print('\\x01' * 900_000)", g))
    assert all(e.ByteSize() < GRPC_LIMIT for e in events)
    assert len(events) > 2, "the chunk was not split"
    assert "".join(json.loads(e.output)["text"] for e in events[:-1]) == "\x01" * 900_000 + "\n"
    assert events[-1].done.success

    # A display cannot be split: it is left out of the live events, saying so.
    events = list(stream(provider, "display({'text/plain': '\\x02' * 999_000}, raw=True)", g))
    assert all(e.ByteSize() < GRPC_LIMIT for e in events)
    live = [json.loads(e.output) for e in events[:-1]]
    assert len(live) == 1 and live[0]["name"] == "stderr"
    assert "display_data output" in live[0]["text"] and "left out of the live events" in live[0]["text"]
    assert events[-1].done.success

    # An error is kept whatever its size, but not its whole text.
    events = list(stream(provider, "raise ValueError('E' * 5_000_000)", g))
    assert all(e.ByteSize() < GRPC_LIMIT for e in events)
    done = events[-1].done
    assert not done.success and done.error.startswith("ValueError: EEE")
    assert "cut to fit the 4 MB answer limit" in done.error


# A run that updates one display UPDATES times with UPDATE_BYTES of HTML: 60 MB of live
# events, each within the output limit, in fewer iopub messages than zmq will queue (1000).
# It creates ``started`` first, so a test knows it began.
UPDATES, UPDATE_BYTES = 600, 100_000


def flood_code(started: Path) -> str:
    return (
        "from IPython.display import HTML, display\n"
        f"open({str(started)!r}, 'w').close()\n"
        "handle = display(HTML('start'), display_id=True)\n"
        f"for i in range({UPDATES}):\n"
        f"    handle.update(HTML(str(i % 10) + 'x' * {UPDATE_BYTES}))\n"
    )


def wait_until_exists(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


# What can reach a reader that read nothing while the run went on: the provider's reply
# queue and what gRPC's flow control let through. A provider keeping every event for it
# would deliver all 60 MB once it reads.
HELD_ALLOWANCE = REPLY_QUEUE_BYTES + 16 * 1024 * 1024
# A busy machine must not make the flood time out.
FLOOD_FLAGS = ("--execute-timeout", "600")


def test_a_client_that_stops_reading_loses_live_events_never_the_result(fresh_provider, tmp_path):
    plugin = fresh_provider(*FLOOD_FLAGS)
    g, started = glyph(), tmp_path / "started"
    events = stream(plugin, flood_code(started), g)  # not read until the run is over
    wait_until_exists(started)
    # Once a run queued behind the flood on the same glyph is answered, the flood has ended.
    assert plugin.run("'behind'", g)["result"] == "'behind'"

    events = list(events)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "output" and kinds[-1] == "done"
    dropped = [e.dropped for e in events if e.WhichOneof("event") == "dropped"]
    assert dropped, "events were left out without saying so"
    delivered = kinds.count("update_display_data")
    assert delivered + sum(d.events for d in dropped) == UPDATES
    assert delivered * UPDATE_BYTES < HELD_ALLOWANCE, f"{delivered} updates were held for a client reading nothing"
    assert all(d.bytes > d.events * UPDATE_BYTES for d in dropped)
    result = json.loads(events[-1].done.result)
    assert result["success"], result["error"]
    assert result["outputs"][0]["data"]["text/html"] == "9" + "x" * UPDATE_BYTES


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"code": "   "}, "code is empty"),
        ({"code": "1", "glyph_id": "bad\nid"}, "control characters"),
        ({"code": "1", "glyph_id": "g" * 300}, "at most 256"),
        ({"code": "1", "upstream_attestation": b"{nope"}, "not valid JSON"),
        ({"code": "1", "upstream_attestation": b"[1]"}, "must be a JSON object"),
    ],
)
def test_a_bad_request_is_invalid_argument(provider, fields, words):
    events = provider.python.ExecuteStream(python_pb2.PythonExecuteRequest(**fields), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(events)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()


# ---------------------------------------------------------------- HandleWebSocket


class Outbox:
    """The client side of a websocket: messages go out when the test says so."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Message | None] = queue.Queue()

    def send(self, **fields) -> None:
        self._queue.put(Message(**fields))

    def run(self, **body) -> None:
        self.send(type=Type.DATA, data=json.dumps(body).encode())

    def half_close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (message := self._queue.get()) is not None:
            yield message


def data_body(reply: Message) -> dict:
    assert reply.type == Type.DATA, reply
    return json.loads(reply.data)


def test_websocket_runs_code_live_and_answers_ping_during_a_run(provider, tmp_path):
    go, g = tmp_path / "go", glyph()
    outbox = Outbox()
    replies = provider.domain.HandleWebSocket(iter(outbox), timeout=120)
    outbox.run(glyph_id=g, code=wait_for_file_code(go), id=7)
    first = data_body(next(replies))
    assert first == {
        "type": "output",
        "glyph_id": g,
        "id": 7,
        "output": {"output_type": "stream", "name": "stdout", "text": "a\n"},
    }

    outbox.send(type=Type.PING, timestamp=99)  # the code is still waiting for us
    pong = next(replies)
    assert (pong.type, pong.timestamp) == (Type.PONG, 99)

    go.touch()
    bodies = []
    while not bodies or bodies[-1]["type"] != "result":
        bodies.append(data_body(next(replies)))
    assert "".join(b["output"]["text"] for b in bodies[:-1]) == "b\n"
    result = bodies[-1]["result"]
    assert set(result) == RESULT_KEYS
    assert result["success"] and result["stdout"] == "a\nb\n"
    assert bodies[-1]["glyph_id"] == g and bodies[-1]["id"] == 7

    outbox.send(type=Type.CLOSE)
    assert list(replies) == []


def test_websocket_answers_runs_in_progress_after_a_half_close(provider):
    g = glyph()
    messages = [
        Message(type=Type.DATA, data=json.dumps({"glyph_id": g, "code": "import time; time.sleep(1); 5"}).encode())
    ]
    bodies = [data_body(r) for r in provider.domain.HandleWebSocket(iter(messages), timeout=60)]
    assert [b["type"] for b in bodies] == ["output", "result"]
    assert bodies[-1]["result"]["result"] == "5"


def test_closing_the_websocket_interrupts_its_run(provider):
    g = glyph()
    assert provider.run("before = 'set'", g)["success"]
    outbox = Outbox()
    replies = provider.domain.HandleWebSocket(iter(outbox), timeout=120)
    outbox.run(glyph_id=g, code=LOOP_CODE)
    assert data_body(next(replies))["output"]["text"] == "looping\n"
    outbox.send(type=Type.CLOSE)
    assert list(replies) == []

    result = provider.run("(before, during, 'after' in globals())", g, timeout=AFTER_CANCEL_TIMEOUT)
    assert result["success"], result["error"]
    assert result["result"] == "('set', 'set', False)"
