"""Waiting for ZeroMQ to let go of buffers it shares with the sender (zero-copy sends).

pyzmq returns a MessageTracker for a frame sent with copy=False and track=True; until it
is done, ZeroMQ may still read the buffer, which must not change or be freed meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

import zmq

from .inbox import Inbox


async def wait_sent(trackers: Iterable[zmq.MessageTracker], inbox: Inbox | None = None) -> None:
    """Wait until ZeroMQ has let go of every tracked buffer, so it may be changed or freed;
    with `inbox`, raise its failure (a lost peer, which will never take them) instead.

    Trackers are set from ZeroMQ's own thread; polling them costs nothing when they are done
    already, which is the usual case for all but the last messages of a collective. The
    caller's deadline (a collective's timeout) bounds the wait.
    """
    pending = [t for t in trackers if not t.done]
    delay = 0.0
    while pending:
        if inbox is not None and inbox.failure is not None:
            raise inbox.failure
        await asyncio.sleep(delay)
        delay = min(2 * delay or 20e-6, 2e-4)
        pending = [t for t in pending if not t.done]
