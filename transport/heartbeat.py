"""Heartbeats: each rank tells its ring neighbours that it is alive, and notices when one
falls silent.

A Pulse sends a HEARTBEAT to each neighbour every `interval` seconds from its own thread
and its own PUSH sockets, so that a rank whose event loop is busy (a long forward pass
in the loop's thread) still looks alive; the thread needs the GIL only for a moment per
beat. A Watch keeps when each neighbour was last heard from (any message counts) and
says which have been silent for longer than the timeout. The receiving side files what
its socket holds before it judges, so that its own stalls never look like a peer's.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import zmq

from .frames import Header, Kind, encode


class Pulse:
    """A thread that sends this rank's heartbeat to `addresses` until stopped."""

    def __init__(self, context: zmq.Context, rank: int, addresses: list[str], interval: float,
                 secure: Callable[[zmq.Socket], None]) -> None:
        self._beat = encode(Header(Kind.HEARTBEAT, 0, 0, 0, "", 0, rank))
        self._stop = threading.Event()
        self._sockets = []
        for address in addresses:  # made here, used and closed only by the thread
            push = zmq.Context.shadow(context.underlying).socket(zmq.PUSH)
            push.linger, push.sndhwm = 0, 4
            secure(push)
            push.connect(address)
            self._sockets.append(push)
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                        name=f"ringlib-heartbeat-rank{rank}")
        self._thread.start()

    def _run(self, interval: float) -> None:
        try:
            while True:
                for push in self._sockets:
                    try:
                        push.send(self._beat, zmq.NOBLOCK)
                    except zmq.Again:  # the peer takes nothing: its silence is the news
                        pass
                if self._stop.wait(interval):
                    return
        finally:
            for push in self._sockets:
                push.close(0)

    def stop(self) -> None:
        """Stop beating and close the sockets (before the context terminates)."""
        self._stop.set()
        self._thread.join()


class Watch:
    """When each watched rank was last heard from, and which have been silent too long."""

    def __init__(self, ranks: list[int], timeout: float) -> None:
        now = time.monotonic()
        self.timeout = timeout
        self._last = dict.fromkeys(ranks, now)

    def heard(self, rank: int) -> None:
        if rank in self._last:
            self._last[rank] = time.monotonic()

    def forget(self, rank: int) -> None:
        self._last.pop(rank, None)

    def silent(self) -> list[tuple[int, float]]:
        """(rank, seconds of silence) of every watched rank silent past the timeout."""
        now = time.monotonic()
        return [(rank, now - last) for rank, last in self._last.items()
                if now - last > self.timeout]
