"""Liveness: an endpoint's verdicts on its peers, and the notices that spread them.

The Watchdog (heartbeat.py) reports a neighbour silent past the peer timeout; the rank
is then lost: every receive fails with PeerLost, and every other rank is told (LOST), the
lost one included, which may be alive and must learn that it is out. A rank that closes
says BYE first, so that its silence is no alarm.
"""

from __future__ import annotations

import logging
from typing import Callable

import zmq

from ringlib.errors import PeerLost

from . import addresses, frames
from .frames import Header
from .heartbeat import Watchdog
from .inbox import Message
from .roster import Roster

log = logging.getLogger(__name__)


class Liveness:
    """What one rank knows and says about whether its peers are still there.

    notify(to, header, payload): send a control message at once.
    fail(exc): fail every receive (a peer was lost, or this rank is out).
    forget(rank): drop what this rank keeps for a lost peer (its links, its files).
    """

    def __init__(self, roster: Roster, notify: Callable[[int, Header, bytes | None], None],
                 fail: Callable[[BaseException], None], forget: Callable[[int], None]) -> None:
        self._roster = roster
        self._notify, self._fail, self._forget = notify, fail, forget
        self.lost: dict[int, str] = {}  # rank -> why it was lost
        self.excluded_by: int | None = None  # a rank that declared this one lost
        self._departed: set[int] = set()  # ranks that said BYE
        self._watchdog: Watchdog | None = None
        # heard(rank): a message came from `rank`, which is alive. The watchdog's own, once
        # there is one: this runs for every message.
        self.heard: Callable[[int], None] = _nobody_watched

    def watch(self, ranks: list[int], interval: float, timeout: float,
              secure: Callable[[zmq.Socket], None], drain: Callable[[], None]) -> None:
        """Send `ranks` a heartbeat every `interval` seconds, and declare any of them lost
        after `timeout` seconds without a message from it (timeout 0: never). `drain`
        files what the sockets hold before each verdict."""
        if timeout <= 0 or not ranks:
            return
        targets = {r: addresses.bind_address(self._roster.peers[r]) for r in ranks}
        self._watchdog = Watchdog(self._roster.rank, targets, interval, timeout, secure,
                                  drain, self._silent)
        self.heard = self._watchdog.heard

    def _silent(self, rank: int, seconds: float) -> None:
        self.lose(rank, "closed its ring" if rank in self._departed else
                  f"sent nothing for {seconds:.1f} s: it died or hangs, or the network to it "
                  "is cut")

    def lose(self, rank: int, why: str, reporter: int | None = None) -> None:
        """Fail every pending and later receive with PeerLost and stop beating to `rank`;
        if this rank found it, tell every other rank, `rank` included: it may be alive
        (stalled, or cut off for a while) and must learn that it is out."""
        me, peers = self._roster.rank, self._roster.peers
        if rank in self.lost or rank == me or rank not in peers:
            return
        self.lost[rank] = why
        if self._watchdog is not None:
            self._watchdog.forget(rank)
        self._forget(rank)
        found = "" if reporter is None else f" (found by rank {reporter})"
        message = f"{self._roster.me}: {self._roster.name(rank)} {why}{found}"
        self._fail(PeerLost(message, rank, peers[rank]))
        if reporter is not None:
            return
        log.log(logging.INFO if rank in self._departed else logging.WARNING, "%s", message)
        for other in peers:
            if other != me and (other not in self.lost or other == rank):
                self._notify(other, frames.lost(rank, me), why.encode())

    def reported_lost(self, message: Message) -> None:
        """Act on LOST: another rank found a rank lost, perhaps this one."""
        why = message.text()
        rank, reporter = frames.lost_rank(message.header), message.header.sender
        if rank != self._roster.rank:
            return self.lose(rank, why, reporter=reporter)
        if self.excluded_by is None:
            self.excluded_by = reporter
            self._fail(PeerLost(f"{self._roster.me} is out of the ring: "
                                f"{self._roster.name(reporter)} found that it {why}",
                                self._roster.rank, self._roster.address))

    def said_bye(self, message: Message) -> None:
        """Act on BYE: the sender closes on purpose."""
        self._departed.add(message.header.sender)

    async def stop(self) -> None:
        if self._watchdog is not None:
            await self._watchdog.stop()


def _nobody_watched(rank: int) -> None:
    """heard() while no peer is watched."""

