"""The provider's own kernel connection (kernels/connection.py) against a real ipykernel.

A zmq socket's descriptor signals a change of state, not "messages are waiting", and a send
on the socket can take the signal that announced replies already there. ZMQConnection looks
at the socket after every send; these tests hold it to that where it is easiest to break:
requests sent from the very callbacks that read replies, many in flight, round after round.
"""

from __future__ import annotations

import asyncio

from jupyter_client.manager import AsyncKernelManager

from kernel_provider import execution
from kernel_provider.kernels.connection import ZMQConnection

IN_FLIGHT = 16
REQUESTS = 3000
WAIT = 20.0
LINES = 1500


async def _with_kernel(work):
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    connection = ZMQConnection(manager.get_connection_info())
    try:
        await execution.wait_for_ready(connection, manager.is_alive, 60)
        return await work(connection)
    finally:
        await connection.close()
        await manager.shutdown_kernel(now=True)


async def _shell_reply(connection: ZMQConnection, inbox) -> dict:
    try:
        while True:
            channel, msg = await inbox.get(WAIT)
            if channel == "shell":
                return msg
    finally:
        connection.forget(inbox)


def test_replies_are_read_while_requests_are_sent_from_the_reading_side():
    """Each reply triggers the next request: sends and arriving replies cross thousands of times."""

    async def work(connection: ZMQConnection) -> int:
        answered = 0

        async def chain() -> None:
            nonlocal answered
            while answered < REQUESTS:
                reply = await _shell_reply(connection, connection.request("shell", "kernel_info_request", {}))
                assert reply["msg_type"] == "kernel_info_reply"
                answered += 1

        await asyncio.gather(*(chain() for _ in range(IN_FLIGHT)))
        return answered

    assert asyncio.run(_with_kernel(work)) >= REQUESTS


def test_output_and_replies_of_concurrent_runs_all_arrive_in_order():
    """iopub output and stdin input_requests answered mid-run, on all channels at once."""

    async def work(connection: ZMQConnection) -> list[str]:
        code = "for i in range(200):\n    print(i)\ninput('name?')\n"
        seen: list[str] = []
        for _ in range(30):
            inbox = connection.request(
                "shell",
                "execute_request",
                {"code": code, "silent": False, "store_history": False, "allow_stdin": True},
            )
            text, idle, replied = "", False, False
            try:
                while not (idle and replied):
                    channel, msg = await inbox.get(WAIT)
                    kind = msg["msg_type"]
                    if kind == "input_request":
                        connection.reply("stdin", "input_reply", {"value": "x"}, msg)
                    elif kind == "stream":
                        text += msg["content"]["text"]
                    elif kind == "status" and msg["content"]["execution_state"] == "idle":
                        idle = True
                    elif channel == "shell":
                        assert msg["content"]["status"] == "ok", msg["content"]
                        replied = True
            finally:
                connection.forget(inbox)
            seen.append(text)
        return seen

    texts = asyncio.run(_with_kernel(work))
    expected = "".join(f"{i}\n" for i in range(200))
    assert texts == [expected] * 30


def test_a_reader_that_falls_behind_pauses_its_channel_and_loses_nothing():
    """Past INBOX_LIMIT waiting messages the connection stops reading iopub until the reader
    catches up; the output then arrives whole and in order."""

    async def work(connection: ZMQConnection) -> tuple[bool, str]:
        code = f"for i in range({LINES}):\n    print(i, flush=True)\n"
        inbox = connection.request("shell", "execute_request", {"code": code, "silent": False, "store_history": False})
        try:
            deadline = asyncio.get_running_loop().time() + WAIT
            while not inbox._queue.full() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)  # the reader is away
            filled = inbox._queue.full()
            text, idle, replied = "", False, False
            while not (idle and replied):
                channel, msg = await inbox.get(WAIT)
                if msg["msg_type"] == "stream":
                    text += msg["content"]["text"]
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif channel == "shell":
                    replied = True
        finally:
            connection.forget(inbox)
        return filled, text

    filled, text = asyncio.run(_with_kernel(work))
    assert filled, "the inbox never filled: the test did not reach the pause"
    assert text == "".join(f"{i}\n" for i in range(LINES))
