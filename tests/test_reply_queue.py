"""ReplyQueue on its own: what a slow reader loses, and in which order it learns of it."""

from __future__ import annotations

import asyncio

from kernel_provider.reply_queue import ReplyQueue


def marker(key, events, nbytes):
    return f"{key}: dropped {events} ({nbytes} bytes)", 1


async def drain(queue: ReplyQueue, count: int) -> list:
    return [await queue.get() for _ in range(count)]


def test_live_events_past_the_bound_are_dropped_and_marked_before_the_result():
    async def scenario():
        queue = ReplyQueue(marker, limit=10)
        for n in range(5):
            queue.put_live("run", f"event {n}", 4)  # the third would take it past 10 bytes
        queue.put("result", 100, key="run")  # must arrive, however large
        assert queue.queued_bytes == 4 + 4 + 1 + 100
        return await drain(queue, 4)

    assert asyncio.run(scenario()) == ["event 0", "event 1", "run: dropped 3 (12 bytes)", "result"]


def test_a_quiet_run_learns_of_its_loss_once_the_reader_catches_up():
    async def scenario():
        queue = ReplyQueue(marker, limit=10)
        queue.put_live("a", "a0", 8)
        queue.put_live("a", "a1", 8)  # dropped
        queue.put_live("b", "b0", 8)  # dropped: another run, its own count
        first = await queue.get()  # room again: both markers follow, in no run's way
        return [first, *await drain(queue, 2)]

    assert asyncio.run(scenario()) == ["a0", "a: dropped 1 (8 bytes)", "b: dropped 1 (8 bytes)"]


def test_an_event_always_fits_an_empty_queue_and_room_waits_for_the_reader():
    async def scenario():
        queue = ReplyQueue(marker, limit=10)
        queue.put_live("run", "huge", 50)
        waiting = asyncio.ensure_future(queue.room())
        await asyncio.sleep(0)
        blocked = not waiting.done()
        item = await queue.get()
        await asyncio.wait_for(waiting, timeout=30)
        return blocked, item

    assert asyncio.run(scenario()) == (True, "huge")


def test_once_it_drops_the_queue_stays_full_until_the_reader_took_it_down_to_half():
    async def has_room(queue: ReplyQueue) -> bool:
        waiting = asyncio.ensure_future(queue.room())
        await asyncio.sleep(0)
        waiting.cancel()
        return waiting.done() and not waiting.cancelled()

    async def scenario():
        queue = ReplyQueue(marker, limit=20)
        for n in range(3):
            queue.put_live("run", f"e{n}", 6)
        states = [await has_room(queue)]  # 18 of 20 bytes: not full
        queue.put_live("run", "e3", 6)  # dropped: full from now on
        for _ in range(3):
            states.append(await has_room(queue))
            await queue.get()
        return states

    # Full at 18 bytes and at 12 (over half the bound); room again at 6.
    assert asyncio.run(scenario()) == [True, False, False, True]
