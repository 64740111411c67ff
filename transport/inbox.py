"""The inbox: messages sorted by where they belong, so collectives in flight never mix.

One reader task receives everything a peer is sent and files each message under its key
(kind, seq, step, chunk, sender). A collective waits on exactly the keys it expects; a
message that arrives before anybody waits for it is kept until somebody does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, NamedTuple, TypeVar

from .frames import Header, Kind
from .shared import discard

log = logging.getLogger(__name__)
T = TypeVar("T")


class Message(NamedTuple):
    header: Header
    payload: Any  # a zmq.Frame (a read-only buffer) or None for control messages


class Inbox:
    def __init__(self) -> None:
        self._waiting: dict[tuple, asyncio.Future] = {}
        self._kept: dict[tuple, Message] = {}
        self._failure: BaseException | None = None
        self._closed: BaseException | None = None
        self._resilient: set[tuple] = set()  # keys waited on despite_failure
        self._watchers: list[asyncio.Future] = []  # unless_failed() calls waiting
        self._abandoned: dict[int, BaseException | None] = {}  # collective seq -> its error
        # collective seq -> (its signature here, what to raise for a message of another)
        self._expected: dict[int, tuple[str, Callable[[Header], BaseException]]] = {}

    def deliver(self, message: Message) -> None:
        """File a message: hand it to its waiter, or keep it for one."""
        key = message.header.key
        if key[0] == Kind.DATA:
            if key[1] in self._abandoned:
                return discard(message.payload)
            expected = self._expected.get(key[1])
            if expected is not None and message.header.sig != expected[0]:
                discard(message.payload)
                return self.abandon(key[1], expected[1](message.header))
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif key in self._kept:
            discard(message.payload)
            log.warning("dropped a duplicate message %s", message.header)
        else:
            self._kept[key] = message

    @property
    def failure(self) -> BaseException | None:
        """What fail() or close() reported, if either was called."""
        return self._closed or self._failure

    async def unless_failed(self, operation: Awaitable[T]) -> T:
        """Await `operation` (a send waiting for room), unless fail() or close() comes
        first: then cancel it and raise what they reported."""
        done = asyncio.ensure_future(operation)
        failed = asyncio.ensure_future(self._until_failed())
        try:
            await asyncio.wait([done, failed], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            done.cancel()
            raise
        finally:
            failed.cancel()
        if done.done():
            return done.result()
        done.cancel()
        raise self.failure

    async def _until_failed(self) -> None:
        if self.failure is None:
            watcher = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            try:
                await watcher
            finally:
                self._watchers.remove(watcher)

    def take(self, key: tuple) -> Message | None:
        """The message kept under `key`, if one is, without waiting."""
        return self._kept.pop(key, None)

    async def get(self, key: tuple, despite_failure: bool = False) -> Message:
        """The message filed under `key`, waiting for it if needed. `despite_failure` waits
        even after fail() (the messages that rebuild a ring after a peer was lost).

        Cancelling the wait loses nothing: a message that arrived meanwhile is kept.
        """
        if key in self._kept:
            return self._kept.pop(key)
        if key[0] == Kind.DATA and self._abandoned.get(key[1]) is not None:
            raise self._abandoned[key[1]]
        if self._closed is not None:
            raise self._closed
        if self._failure is not None and not despite_failure:
            raise self._failure
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[key] = waiter
        if despite_failure:
            self._resilient.add(key)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._kept[key] = waiter.result()
            raise
        finally:
            if self._waiting.get(key) is waiter:
                del self._waiting[key]
            self._resilient.discard(key)

    def expect(self, seq: int, sig: str, mismatch: Callable[[Header], BaseException]) -> None:
        """Collective `seq` runs here as `sig`: a message of it that carries another sig,
        kept already or still to come, fails it with mismatch(that message's header)."""
        self._expected[seq] = (sig, mismatch)
        for key, message in list(self._kept.items()):
            if key[0] == Kind.DATA and key[1] == seq and message.header.sig != sig:
                return self.abandon(seq, mismatch(message.header))

    def settle(self, seq: int) -> None:
        """Collective `seq` is over here: stop checking its messages."""
        self._expected.pop(seq, None)

    def abandoned(self, seq: int) -> bool:
        return seq in self._abandoned

    def abandon(self, seq: int, exc: BaseException | None = None) -> None:
        """Drop what is kept for collective `seq`, which failed, and what still comes for it.
        With `exc`, its current and later waits raise exc (another rank found it failed)."""
        if self._abandoned.get(seq) is None:
            self._abandoned[seq] = exc
        for key in [k for k in self._kept if k[0] == Kind.DATA and k[1] == seq]:
            discard(self._kept.pop(key).payload)
        if exc is not None:
            self._fail_waiters(exc, lambda key: key[0] == Kind.DATA and key[1] == seq)

    def fail(self, exc: BaseException) -> None:
        """Make every current and later wait raise `exc`, except those despite_failure (a
        peer was lost); the first failure is the one reported."""
        if self._failure is None:
            self._failure = exc
        self._fail_waiters(self._failure, lambda key: key not in self._resilient)
        self._wake_watchers()

    def close(self, exc: BaseException) -> None:
        """Make every current and later wait raise `exc` (the endpoint closed or broke)."""
        self._closed = exc
        self._fail_waiters(exc, lambda key: True)
        self._wake_watchers()

    def _wake_watchers(self) -> None:
        for watcher in self._watchers:
            if not watcher.done():
                watcher.set_result(None)

    def _fail_waiters(self, exc: BaseException, which: Callable[[tuple], bool]) -> None:
        for key in [k for k, w in self._waiting.items() if which(k) and not w.done()]:
            self._waiting.pop(key).set_exception(exc)

    def __len__(self) -> int:
        return len(self._kept)
