"""The inbox: a mailbox of messages filed by key, so that flows in flight never mix.

One reader task receives everything a peer is sent and files each message under its key
(frames.Key: kind, seq, step, chunk, sender). A receiver waits on exactly the key it
expects; a message that arrives before anybody waits for it is kept until somebody does.
The inbox knows nothing of what messages mean: whoever owns the messages it holds may
install a Filter, which sees each message first and may drop it, and may refuse waits on
some keys (the collectives check every piece against its collective's signature there,
and refuse waits on pieces of a collective that failed: collectives/session.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, NamedTuple, Protocol, TypeVar

from .frames import Header, Key
from .shared import discard

log = logging.getLogger(__name__)
T = TypeVar("T")


class Message(NamedTuple):
    header: Header
    payload: Any  # a zmq.Frame or a held payload (shared.py), or None without one

    def text(self) -> str:
        """A control message's payload as text (why a peer was lost, what mismatched)."""
        return bytes(self.payload.buffer).decode(errors="replace") if self.payload else ""


class Filter(Protocol):
    """What an inbox asks its owner about the messages it holds."""

    def admit(self, message: Message) -> bool:
        """Whether to file `message`; a message not admitted is the filter's to discard."""

    def refusal(self, key: Key) -> BaseException | None:
        """What a wait on `key` raises instead of waiting, if anything."""


class Inbox:
    """`warn(message, *args)` says that a message was dropped (as log.warning does)."""

    def __init__(self, warn: Callable[..., None] = log.warning) -> None:
        self._warn = warn
        self._waiting: dict[Key, asyncio.Future] = {}
        self._kept: dict[Key, Message] = {}
        self._failure: BaseException | None = None
        self._closed: BaseException | None = None
        self._resilient: set[Key] = set()  # keys waited on despite_failure
        self._watchers: list[asyncio.Future] = []  # unless_failed() calls waiting
        self.filter: Filter | None = None

    def deliver(self, message: Message) -> None:
        """File a message: hand it to its waiter, or keep it for one."""
        if self.filter is not None and not self.filter.admit(message):
            return
        key = message.header.key
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        elif key in self._kept:
            discard(message.payload)
            self._warn("dropped a duplicate message %s", message.header)
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

    def take(self, key: Key) -> Message | None:
        """The message kept under `key`, if one is, without waiting."""
        return self._kept.pop(key, None)

    async def get(self, key: Key, despite_failure: bool = False) -> Message:
        """The message filed under `key`, waiting for it if needed. `despite_failure` waits
        even after fail() (the messages that rebuild a ring after a peer was lost).

        Cancelling the wait loses nothing: a message that arrived meanwhile is kept.
        """
        if key in self._kept:
            return self._kept.pop(key)
        refused = None if self.filter is None else self.filter.refusal(key)
        if refused is not None:
            raise refused
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

    def waits_on(self, sender: int) -> bool:
        """Whether a receive waits now for a message from `sender`."""
        return any(key.sender == sender for key in self._waiting)

    def kept(self, which: Callable[[Key], bool]) -> list[Message]:
        """The messages kept now under keys for which `which` is true."""
        return [message for key, message in self._kept.items() if which(key)]

    def purge(self, which: Callable[[Key], bool], exc: BaseException | None = None) -> None:
        """Drop the messages kept under keys for which `which` is true; with `exc`, make the
        waits on such keys raise it."""
        for key in [k for k in self._kept if which(k)]:
            discard(self._kept.pop(key).payload)
        if exc is not None:
            self._fail_waiters(exc, which)

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

    def _fail_waiters(self, exc: BaseException, which: Callable[[Key], bool]) -> None:
        for key in [k for k, w in self._waiting.items() if which(k) and not w.done()]:
            self._waiting.pop(key).set_exception(exc)

    def __len__(self) -> int:
        return len(self._kept)
