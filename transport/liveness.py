"""Liveness: an endpoint's verdicts on its peers, and the notices that spread them.

The Watchdog (heartbeat.py) reports a neighbour silent past the peer timeout; the rank
is then lost: every receive fails with PeerLost, and every other rank is told (LOST), the
lost one included, which may be alive and must learn that it is out. A rank that closes
says BYE, a promise to send nothing more. Collectives that need nothing from it finish;
once what it sent before has arrived (BYE_GRACE of a heartbeat interval, for what still
travels on another link), a wait on it is a wait that nothing will end, and the rank is
lost at the next look (one a heartbeat interval), as one that closed its ring, not one
that died. A neighbour that said BYE is still watched: silent past the peer timeout, it
is lost even if nothing was seen to wait on it (a wait on a send's tracker is not seen).
Its files are its own to remove.
"""

from __future__ import annotations

import asyncio
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

# A rank that said BYE is lost after this many heartbeat intervals: whatever it sent
# before its BYE over another link (a direct link to another host) has come by then.
BYE_GRACE = 1.0


class Liveness:
    """What one rank knows and says about whether its peers are still there.

    notify(to, header, payload): send a control message at once.
    fail(exc): fail every receive (a peer was lost, or this rank is out).
    forget(rank, died): drop what this rank keeps for a lost peer (its links, and where
        it `died` rather than closed, the files it left).
    drain(): file what every link holds now.
    waited_on(rank): whether a receive from `rank`, or a send to it, waits now.
    """

    def __init__(self, roster: Roster, notify: Callable[[int, Header, bytes | None], None],
                 fail: Callable[[BaseException], None], forget: Callable[[int, bool], None],
                 drain: Callable[[], None], waited_on: Callable[[int], bool]) -> None:
        self._roster = roster
        self._notify, self._fail, self._forget, self._drain = notify, fail, forget, drain
        self._waited_on = waited_on
        self._interval = 0.5  # the heartbeat interval, once watching
        self.lost: dict[int, str] = {}  # rank -> why it was lost
        self.excluded_by: int | None = None  # a rank that declared this one lost
        self._departed: dict[int, str] = {}  # rank that said BYE -> why it closed
        self._farewells: dict[int, asyncio.TimerHandle] = {}  # its next check
        self._stopped = False
        self._watchdog: Watchdog | None = None
        # heard(rank): a message came from `rank`, which is alive. The watchdog's own, once
        # there is one: this runs for every message.
        self.heard: Callable[[int], None] = _nobody_watched

    def watch(self, ranks: list[int], interval: float, timeout: float,
              secure: Callable[[zmq.Socket], None]) -> None:
        """Send `ranks` a heartbeat every `interval` seconds, and declare any of them lost
        after `timeout` seconds without a message from it (timeout 0: never); what the
        links hold is filed before each verdict."""
        self._interval = interval or self._interval  # 0 beats never; BYE still needs a pace
        if timeout <= 0 or not ranks:
            return
        targets = {r: addresses.bind_address(self._roster.peers[r]) for r in ranks}
        self._watchdog = Watchdog(self._roster.rank, targets, interval, timeout, secure,
                                  self._drain, self._silent)
        self.heard = self._watchdog.heard

    def _silent(self, rank: int, seconds: float) -> None:
        self.lose(rank, self._departed.get(rank) or
                  f"sent nothing for {seconds:.1f} s: it died or hangs, or the network to it "
                  "is cut")

    def lose(self, rank: int, why: str, reporter: int | None = None,
             closed: bool = False) -> None:
        """Fail every pending and later receive with PeerLost and stop beating to `rank`;
        if this rank found it, tell every other rank, `rank` included: it may be alive
        (stalled, or cut off for a while) and must learn that it is out. A rank that
        `closed` its ring (said BYE, here or to the reporter) keeps its files."""
        me, peers = self._roster.rank, self._roster.peers
        if rank in self.lost or rank == me or rank not in peers:
            return
        self.lost[rank] = why
        if self._watchdog is not None:
            self._watchdog.forget(rank)
        closed = closed or rank in self._departed
        self._forget(rank, not closed)
        found = "" if reporter is None else f" (found by rank {reporter})"
        message = f"{self._roster.me}: {self._roster.name(rank)} {why}{found}"
        self._fail(PeerLost(message, rank, peers[rank]))
        if reporter is not None:
            return
        log.log(logging.INFO if rank in self._departed else logging.WARNING, "%s", message)
        for other in peers:
            if other != me and (other not in self.lost or other == rank):
                self._notify(other, frames.lost(rank, me, closed), why.encode())

    def reported_lost(self, message: Message) -> None:
        """Act on LOST: another rank found a rank lost, perhaps this one."""
        why = message.text()
        (rank, closed), reporter = frames.lost_rank(message.header), message.header.sender
        if rank != self._roster.rank:
            return self.lose(rank, why, reporter=reporter, closed=closed)
        if self.excluded_by is None:
            self.excluded_by = reporter
            self._fail(PeerLost(f"{self._roster.me} is out of the ring: "
                                f"{self._roster.name(reporter)} found that it {why}",
                                self._roster.rank, self._roster.address))

    def said_bye(self, message: Message) -> None:
        """Act on BYE: the sender closes on purpose and sends nothing more. From when what
        it sent before has come, lose it as soon as anything waits on it."""
        rank = message.header.sender
        if self._stopped or rank in self._departed:
            return
        self._departed[rank] = "closed its ring" + (f" ({message.text()})"
                                                    if message.payload else "")
        self._check_later(rank)

    def _check_later(self, rank: int) -> None:
        self._farewells[rank] = asyncio.get_running_loop().call_later(
            BYE_GRACE * self._interval, self._check, rank)

    def _check(self, rank: int) -> None:
        """Lose `rank`, which said BYE, if a receive, a send or a start-up wait waits on
        it; else look again."""
        if self._stopped or rank in self.lost:
            return
        self._drain()
        if self._waited_on(rank):
            self.lose(rank, self._departed[rank])
        else:
            self._check_later(rank)

    def gone(self) -> set[int]:
        """The ranks that nothing sent now would reach: those lost, and those that said
        BYE (they stopped reading), lost yet or not."""
        return set(self.lost) | set(self._departed)

    async def stop(self) -> None:
        self._stopped = True
        for farewell in self._farewells.values():
            farewell.cancel()
        if self._watchdog is not None:
            await self._watchdog.stop()


def _nobody_watched(rank: int) -> None:
    """heard() while no peer is watched."""

