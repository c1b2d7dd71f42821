"""The replies waiting for one live reader, bounded by bytes: what gives when it reads slowly.

Each ExecuteStream call and each websocket has one. A reader that stops reading must not
grow the provider's memory, so while more than ``limit`` bytes wait, live events are
dropped; each run that lost some gets one marker reply (counting them) before its next
reply, at the latest before its result. Replies that must arrive (results, error answers,
PONGs) are always queued: the websocket bounds how many can come by pausing its reading
of new requests while the queue is full (``room``) and by a cap on requests in progress.
The queue is full from the moment it drops an event or goes over its bound until the
reader has taken it down to half the bound: a reader that does not read keeps it full.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

# Bytes of replies one live stream or websocket may hold for its reader (one event always fits).
REPLY_QUEUE_BYTES = 8 * 1024 * 1024


class ReplyQueue(Generic[T]):
    """A FIFO of (reply, size) whose live events are dropped, and counted, past ``limit`` bytes.

    ``marker(key, events, nbytes)`` makes the reply (and its size) that tells the reader
    how many live events of ``key`` (a run) were dropped.
    """

    def __init__(self, marker: Callable[[Hashable, int, int], tuple[T, int]], limit: int = REPLY_QUEUE_BYTES):
        self.limit = limit
        self._marker = marker
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._dropped: dict[Hashable, tuple[int, int]] = {}
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()  # set while the queue is not full
        self._room.set()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, item: T, size: int, key: Hashable | None = None) -> None:
        """Queue a reply that must arrive, whatever the bound; after ``key``'s marker, if it is owed one."""
        if key is not None:
            self._flush_marker(key)
        self._append(item, size)

    def put_live(self, key: Hashable, item: T, size: int) -> None:
        """Queue a live event of ``key``, or drop it (counted for the marker) while the queue is full."""
        if self._items and self._bytes + size > self.limit:
            events, nbytes = self._dropped.get(key, (0, 0))
            self._dropped[key] = (events + 1, nbytes + size)
            self._room.clear()
            return
        self._flush_marker(key)
        self._append(item, size)

    async def get(self) -> T:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        if self._bytes <= self.limit // 2:
            self._room.set()
        if self._bytes <= self.limit:
            # A run that went quiet after losing events learns of it now, not at its end.
            for key in list(self._dropped):
                self._flush_marker(key)
        return item

    async def room(self) -> None:
        """Wait until the queue is not full."""
        await self._room.wait()

    def _flush_marker(self, key: Hashable) -> None:
        dropped = self._dropped.pop(key, None)
        if dropped is not None:
            self._append(*self._marker(key, *dropped))

    def _append(self, item: T, size: int) -> None:
        self._items.append((item, size))
        self._bytes += size
        self._nonempty.set()
        if self._bytes > self.limit:
            self._room.clear()
