"""The inbox: messages sorted by where they belong, so collectives in flight never mix.

One reader task receives everything a peer is sent and files each message under its key
(kind, seq, step, chunk, sender). A collective waits on exactly the keys it expects; a
message that arrives before anybody waits for it is kept until somebody does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NamedTuple

from .frames import Header

log = logging.getLogger(__name__)


class Message(NamedTuple):
    header: Header
    payload: Any  # a zmq.Frame (a read-only buffer) or None for control messages


class Inbox:
    def __init__(self) -> None:
        self._waiting: dict[tuple, asyncio.Future] = {}
        self._kept: dict[tuple, Message] = {}
        self._failure: BaseException | None = None
        self._abandoned: set[int] = set()

    def deliver(self, message: Message) -> None:
        """File a message: hand it to its waiter, or keep it for one."""
        key = message.header.key
        if message.header.seq in self._abandoned:
            return
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif key in self._kept:
            log.warning("dropped a duplicate message %s", message.header)
        else:
            self._kept[key] = message

    def take(self, key: tuple) -> Message | None:
        """The message kept under `key`, if one is, without waiting."""
        return self._kept.pop(key, None)

    async def get(self, key: tuple) -> Message:
        """The message filed under `key`, waiting for it if needed.

        Cancelling the wait loses nothing: a message that arrived meanwhile is kept.
        """
        if key in self._kept:
            return self._kept.pop(key)
        if self._failure is not None:
            raise self._failure
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._kept[key] = waiter.result()
            raise
        finally:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]

    def abandon(self, seq: int) -> None:
        """Drop what is kept for collective `seq`, which failed here, and what still comes."""
        self._abandoned.add(seq)
        for key in [k for k in self._kept if k[1] == seq]:
            del self._kept[key]

    def fail(self, exc: BaseException) -> None:
        """Make every current and later wait raise `exc` (the endpoint closed or broke)."""
        self._failure = exc
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self._waiting.clear()

    def __len__(self) -> int:
        return len(self._kept)
