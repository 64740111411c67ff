"""Heartbeats: each rank tells its ring neighbours that it is alive, and notices when one
falls silent.

A Pulse sends a HEARTBEAT to each neighbour every `interval` seconds from its own thread
and its own PUSH sockets, so that a rank whose event loop is busy (a long forward pass
in the loop's thread) still looks alive; the thread needs the GIL only for a moment per
beat. Beating starts as soon as the peers are known, before the greeting, so that a rank
still waiting for a late neighbour looks alive to its other one. A Watch keeps when each
neighbour was last heard from (any message counts; a neighbour's clock starts with its
first message, or with the connection to it, whichever comes first: a neighbour that
bound its address and died before its first word is lost too) and says which have been
silent for longer than the timeout. The receiving side files what its socket holds
before it judges, so that its own stalls never look like a peer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from .context import context
from .frames import Kind, control, encode


class Pulse:
    """A thread that sends this rank's heartbeat to `targets` (rank -> address) until
    stopped; silence(rank) stops the beats to one of them. connected(rank) is called, from
    the thread, once the first connection to a target has passed ZeroMQ's handshake
    (CurveZMQ's too: a peer that holds another key is never connected)."""

    def __init__(self, rank: int, targets: dict[int, str], interval: float,
                 secure: Callable[[zmq.Socket], None],
                 connected: Callable[[int], None] = lambda rank: None) -> None:
        self._beat = encode(control(Kind.HEARTBEAT, rank))
        self._stop = threading.Event()
        self._sockets: dict[int, zmq.Socket] = {}
        self._monitors: dict[int, zmq.Socket] = {}  # until the first connection
        self._connected = connected
        self._silenced: set[int] = set()
        plain = zmq.Context.shadow(context().underlying)
        for target, address in targets.items():  # made here, used and closed by the thread
            push = plain.socket(zmq.PUSH)
            push.linger, push.sndhwm = 0, 4
            secure(push)
            self._monitors[target] = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            push.connect(address)
            self._sockets[target] = push
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                        name=f"ringlib-heartbeat-rank{rank}")
        self._thread.start()

    def _run(self, interval: float) -> None:
        try:
            while True:
                for target, push in self._sockets.items():
                    if target in self._silenced:
                        continue
                    try:
                        push.send(self._beat, zmq.NOBLOCK)
                    except zmq.Again:  # the peer takes nothing: its silence is the news
                        pass
                self._note_connections()
                if self._stop.wait(interval):
                    return
        finally:
            for target in list(self._monitors):
                self._unmonitor(target)
            for push in self._sockets.values():
                push.close(0)

    def _note_connections(self) -> None:
        for target, monitor in list(self._monitors.items()):
            if monitor.poll(0):
                recv_monitor_message(monitor)  # EVENT_HANDSHAKE_SUCCEEDED, the only one asked for
                self._unmonitor(target)
                self._connected(target)

    def _unmonitor(self, target: int) -> None:
        self._sockets[target].disable_monitor()
        self._monitors.pop(target).close(0)

    def silence(self, rank: int) -> None:
        self._silenced.add(rank)

    def stop(self) -> None:
        """Stop beating and close the sockets (before the context terminates)."""
        self._stop.set()
        self._thread.join()


class Watch:
    """When each watched rank was last heard from, and which have been silent too long."""

    def __init__(self, ranks: list[int], timeout: float) -> None:
        self.timeout = timeout
        self._last: dict[int, float | None] = dict.fromkeys(ranks)  # None: not heard yet

    def heard(self, rank: int) -> None:
        if rank in self._last:
            self._last[rank] = time.monotonic()

    def connected(self, rank: int) -> None:
        """This rank's link to `rank` is up: its clock starts now, if no word did."""
        if self._last.get(rank, 0) is None:
            self._last[rank] = time.monotonic()

    def forget(self, rank: int) -> None:
        self._last.pop(rank, None)

    def restart(self) -> None:
        """Every clock that runs starts again now: this process could not listen."""
        now = time.monotonic()
        for rank, last in self._last.items():
            if last is not None:
                self._last[rank] = now

    def silent(self) -> list[tuple[int, float]]:
        """(rank, seconds of silence) of every watched rank silent past the timeout."""
        now = time.monotonic()
        return [(rank, now - last) for rank, last in self._last.items()
                if last is not None and now - last > self.timeout]


class Watchdog:
    """A Pulse to `targets` (rank -> address) and a task that calls on_silent(rank,
    seconds) once for each of them silent past `timeout`. It calls `drain` (file what
    the sockets hold) before it judges."""

    def __init__(self, rank: int, targets: dict[int, str], interval: float, timeout: float,
                 secure: Callable[[zmq.Socket], None], drain: Callable[[], None],
                 on_silent: Callable[[int, float], None]) -> None:
        self._watch = Watch(list(targets), timeout)
        self._loop = asyncio.get_running_loop()
        self._pulse = Pulse(rank, targets, interval, secure, self._connected)
        self.heard = self._watch.heard
        self._task = self._loop.create_task(
            self._check_every(min(interval, timeout / 4), drain, on_silent))

    def _connected(self, rank: int) -> None:
        """From the Pulse thread: the watch is the loop's, so the news goes there."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody watches
            self._loop.call_soon_threadsafe(self._watch.connected, rank)

    async def _check_every(self, period: float, drain: Callable[[], None],
                           on_silent: Callable[[int, float], None]) -> None:
        looked = time.monotonic()
        while True:
            await asyncio.sleep(period)
            drain()  # what arrived while this loop was busy counts: a stall here is no peer's
            now = time.monotonic()
            if now - looked > period + self._watch.timeout:
                # This process was stopped (SIGSTOP, a starved host) past the timeout:
                # its peers may have stopped beating to it, having lost it, and what they
                # said of that may still be on its way. Their silence is not theirs.
                self._watch.restart()
            looked = now
            for rank, quiet in self._watch.silent():
                self.forget(rank)
                on_silent(rank, quiet)

    def forget(self, rank: int) -> None:
        """Neither watch `rank` nor beat to it any more (it was lost)."""
        self._watch.forget(rank)
        self._pulse.silence(rank)

    async def stop(self) -> None:
        self._pulse.stop()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
