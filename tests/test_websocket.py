"""Live runs through a bridge that behaves as QNTX's (tests/qntx_bridge.py), over real gRPC.

The browser side of the bridge sees only what QNTX would let through: DATA. An ERROR from
the plugin would close the browser's socket, so every answer, a refusal included, must
come as DATA and leave the socket open. "Live" is proven without clocks, as in
test_stream.py: the code waits for a file the test creates only after it has seen the
event before.
"""

from __future__ import annotations

import json

import pytest
from qntx_bridge import QntxBridge, Type
from test_stream import (
    FLOOD_FLAGS,
    GRPC_LIMIT,
    HELD_ALLOWANCE,
    UPDATE_BYTES,
    UPDATES,
    WAIT_SECONDS,
    flood_code,
    glyph,
    wait_for_file_code,
    wait_until_exists,
)

from kernel_provider.live import MAX_REQUESTS_IN_PROGRESS


def is_sentence(text: str) -> bool:
    return text.endswith(".") and len(text) > 20


@pytest.fixture
def bridge(provider):
    bridge = QntxBridge(provider.channel)
    yield bridge
    bridge.close()


def test_malformed_requests_get_data_answers_and_the_socket_goes_on(bridge):
    bad = [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid UTF-8"),
        (b"[1, 2]", "JSON list"),
        (json.dumps({"glyph_id": "g"}).encode(), 'no "code"'),
        (json.dumps({"code": "   "}).encode(), "code is empty"),
        (json.dumps({"code": "1", "glyph_id": 5}).encode(), '"glyph_id" must be a string'),
        (json.dumps({"code": "1", "upstream": [1]}).encode(), "must be a JSON object"),
        (json.dumps({"code": "1", "id": [1]}).encode(), '"id" must be a string or a number'),
        (json.dumps({"code": "1", "id": "i" * 300}).encode(), '"id" is too long'),
    ]
    for data, words in bad:
        bridge.send_raw(data)
        answer = bridge.receive()
        assert answer["type"] == "error" and words in answer["error"], (data, answer)
        assert is_sentence(answer["error"]) and "id" not in answer
    # A refusal of a request with a good id says which request it answers.
    bridge.send({"id": 3, "action": "bake"})
    assert bridge.receive() == {
        "type": "error",
        "id": 3,
        "error": 'unknown action "bake"; known actions: run.',
    }
    bridge.send({"id": "r1", "code": "1", "glyph_id": "bad\nid"})
    refused = bridge.receive()
    assert refused["id"] == "r1" and "control characters" in refused["error"]

    # The same socket still runs code, keepalive included.
    bridge.ping()
    g = glyph()
    bridge.send({"id": "good", "glyph_id": g, "code": "x = upstream['n']\nx * 2", "upstream": {"n": 21}})
    bodies = bridge.receive_until("result")
    assert bodies[0]["output"]["data"] == {"text/plain": "42"}
    assert bodies[-1]["id"] == "good" and bodies[-1]["result"]["result"] == "42"
    assert not bridge.is_closed
    assert Type.ERROR not in bridge.received_types


LIVE_DISPLAY_CODE = """
import os, time
from IPython.display import HTML, clear_output, display

def wait_for(name):
    path = os.path.join({folder!r}, name)
    deadline = time.monotonic() + {seconds}
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not os.path.exists(path):
        print('gave up waiting for', name)

handle = display(HTML('<b>first</b>'), display_id=True)
wait_for('shown')
handle.update(HTML('<b>second</b>'))
wait_for('updated')
clear_output(wait=True)
wait_for('cleared')
print('after clear')
"""


def test_display_updates_and_clear_output_arrive_live_in_order(bridge, tmp_path):
    g = glyph()
    code = LIVE_DISPLAY_CODE.format(folder=str(tmp_path), seconds=WAIT_SECONDS)
    bridge.send({"id": "live", "glyph_id": g, "code": code})

    shown = bridge.receive()
    display_id = shown.get("display_id")
    assert isinstance(display_id, str) and display_id
    assert shown == {
        "type": "output",
        "glyph_id": g,
        "id": "live",
        "display_id": display_id,
        "output": {
            "output_type": "display_data",
            "data": {"text/html": "<b>first</b>", "text/plain": "<IPython.core.display.HTML object>"},
            "metadata": {},
        },
    }
    bridge.ping()  # the code is waiting for us, and keepalive goes on
    (tmp_path / "shown").touch()

    updated = bridge.receive()
    assert updated == {
        "type": "update_display_data",
        "glyph_id": g,
        "id": "live",
        "display_id": display_id,
        "output": {
            "output_type": "display_data",
            "data": {"text/html": "<b>second</b>", "text/plain": "<IPython.core.display.HTML object>"},
            "metadata": {},
        },
    }
    (tmp_path / "updated").touch()

    assert bridge.receive() == {"type": "clear_output", "glyph_id": g, "id": "live", "wait": True}
    (tmp_path / "cleared").touch()

    printed, done = bridge.receive_until("result")
    assert printed == {
        "type": "output",
        "glyph_id": g,
        "id": "live",
        "output": {"output_type": "stream", "name": "stdout", "text": "after clear\n"},
    }
    result = done["result"]
    assert result["success"], result["error"]
    # What a notebook shows at the end: the clear (wait=True) took effect at the print.
    assert result["outputs"] == [printed["output"]]
    assert Type.ERROR not in bridge.received_types


def test_a_socket_refuses_requests_past_its_limit_and_answers_the_rest(bridge, tmp_path):
    g, go = glyph(), tmp_path / "go"
    # The first run holds the glyph until the test says go; the others queue behind it.
    bridge.send({"id": 0, "glyph_id": g, "code": wait_for_file_code(go)})
    for n in range(1, MAX_REQUESTS_IN_PROGRESS):
        bridge.send({"id": n, "glyph_id": g, "code": f"{n}"})
    bridge.send({"id": "one too many", "glyph_id": g, "code": "1"})
    first = bridge.receive_until("error")
    refused = first[-1]
    assert refused["id"] == "one too many"
    assert f"already has {MAX_REQUESTS_IN_PROGRESS} requests under way" in refused["error"]

    go.touch()
    bodies = first[:-1]
    while sum(b["type"] == "result" for b in bodies) < MAX_REQUESTS_IN_PROGRESS:
        bodies.append(bridge.receive())
    results = {b["id"]: b["result"] for b in bodies if b["type"] == "result"}
    assert results[0]["stdout"] == "a\nb\n"
    assert {n: results[n]["result"] for n in range(1, MAX_REQUESTS_IN_PROGRESS)} == {
        n: str(n) for n in range(1, MAX_REQUESTS_IN_PROGRESS)
    }
    # Once they are answered, the socket takes requests again.
    bridge.send({"id": "later", "glyph_id": g, "code": "'again'"})
    assert bridge.receive_until("result")[-1]["result"]["result"] == "'again'"


def test_a_browser_that_stops_reading_loses_live_events_never_the_result(fresh_provider, tmp_path):
    plugin = fresh_provider(*FLOOD_FLAGS)
    bridge = QntxBridge(plugin.channel)
    g, started = glyph(), tmp_path / "started"
    bridge.send({"id": "warm", "glyph_id": g, "code": "import IPython.display"})
    bridge.receive_until("result")

    bridge.stop_reading()
    bridge.send({"id": "flood", "glyph_id": g, "code": flood_code(started)})
    wait_until_exists(started)
    # Once a run queued behind the flood on the same glyph is answered, the flood has ended.
    assert plugin.run("'behind'", g)["result"] == "'behind'"
    # Its reply queue is full now: the plugin finishes the message it is reading (a keepalive
    # PING, or the next request) and reads no more; the rest waits in gRPC's flow control.
    taken, held = tmp_path / "taken", tmp_path / "held"
    bridge.send({"id": "taken", "glyph_id": g, "code": f"open({str(taken)!r}, 'w').close()"})
    bridge.send({"id": "held", "glyph_id": g, "code": f"open({str(held)!r}, 'w').close()"})
    assert plugin.run("'behind again'", g)["result"] == "'behind again'"
    assert not held.exists(), "the plugin took on more work for a browser that reads nothing"

    bridge.resume_reading()
    bodies = bridge.receive_until("result")
    assert all(b["id"] == "flood" for b in bodies)
    kinds = [b["type"] for b in bodies]
    assert kinds[0] == "output" and kinds[-1] == "result"
    dropped = [b for b in bodies if b["type"] == "dropped"]
    assert dropped, "events were left out without saying so"
    delivered = kinds.count("update_display_data")
    assert delivered + sum(d["events"] for d in dropped) == UPDATES
    assert delivered * UPDATE_BYTES < HELD_ALLOWANCE, f"{delivered} updates were held for a browser reading nothing"
    assert all(d["bytes"] > d["events"] * UPDATE_BYTES and d["glyph_id"] == g for d in dropped)
    # The result is whole: the display shows its last update.
    result = bodies[-1]["result"]
    assert result["success"], result["error"]
    assert result["outputs"][0]["data"]["text/html"] == "9" + "x" * UPDATE_BYTES
    assert bridge.largest_message < GRPC_LIMIT
    # Once the browser reads, the requests it sent are taken on too.
    later = [bridge.receive_until("result")[-1]["id"] for _ in range(2)]
    assert later == ["taken", "held"] and taken.exists() and held.exists()
    # And the socket goes on as before.
    bridge.ping()
    bridge.send({"id": "after", "glyph_id": g, "code": "'ok'"})
    assert bridge.receive_until("result")[-1]["result"]["result"] == "'ok'"
    bridge.close()


def test_every_message_stays_under_4_mb_whatever_the_output(bridge):
    g = glyph()
    # JSON escapes each of these as \u0001: 5.4 MB of JSON for 0.9 MB of text.
    bridge.send({"glyph_id": g, "code": "print('\\x01' * 900_000)"})
    bodies = bridge.receive_until("result")
    assert "".join(b["output"]["text"] for b in bodies[:-1]) == "\x01" * 900_000 + "\n"
    assert bodies[-1]["result"]["success"]

    # A display cannot be split: it is left out of the live events, saying so.
    bridge.send({"glyph_id": g, "code": "display({'text/plain': '\\x02' * 999_000}, raw=True)"})
    bodies = bridge.receive_until("result")
    live = [b["output"] for b in bodies[:-1]]
    assert len(live) == 1 and live[0]["name"] == "stderr"
    assert "display_data output" in live[0]["text"] and "left out of the live events" in live[0]["text"]
    assert bodies[-1]["result"]["success"]

    # An error is kept whatever its size, but not its whole text.
    bridge.send({"glyph_id": g, "code": "raise ValueError('E' * 5_000_000)"})
    result = bridge.receive_until("result")[-1]["result"]
    assert not result["success"] and result["error"].startswith("ValueError: EEE")
    assert "cut to fit the 4 MB answer limit" in result["error"]
    assert bridge.largest_message < GRPC_LIMIT
    assert Type.ERROR not in bridge.received_types and not bridge.is_closed
