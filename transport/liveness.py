"""Liveness: an endpoint's verdicts on its peers, and the notices that spread them.

The Watchdog (heartbeat.py) reports a neighbour silent past the peer timeout; the
endpoint then fails every receive with PeerLost and tells every other rank (LOST), the
lost one included, which may be alive and must learn that it is out. A rank that closes
says BYE first, so that its silence is no alarm; a rank that finds a collective called
differently elsewhere says MISMATCH. Mixed into Endpoint, whose state it reads: rank,
address, peer_addresses, inbox, notify(), shared, _watchdog, _secure() and _file_all().
"""

from __future__ import annotations

import logging

from ringlib.errors import MismatchError, PeerLost

from . import addresses, direct
from .frames import Kind
from .heartbeat import Watchdog
from .inbox import Message

log = logging.getLogger(__name__)


class Liveness:
    """What Endpoint knows and says about whether its peers are still there."""

    def _init_liveness(self) -> None:
        self.lost: dict[int, str] = {}  # rank -> why it was lost
        self.excluded_by: int | None = None  # a rank that declared this one lost
        self.mismatches: dict[int, MismatchError] = {}  # seq -> what another rank found
        self._departed: set[int] = set()  # ranks that said BYE
        self._watchdog: Watchdog | None = None

    def watch(self, ranks: list[int], interval: float, timeout: float) -> None:
        """Send `ranks` a heartbeat every `interval` seconds, and declare any of them lost
        after `timeout` seconds without a message from it (timeout 0: never)."""
        if timeout <= 0 or not ranks:
            return
        targets = {r: addresses.bind_address(self.peer_addresses[r]) for r in ranks}
        self._watchdog = Watchdog(self.rank, targets, interval, timeout, self._secure,
                                  self._file_all, self._silent)

    def _silent(self, rank: int, seconds: float) -> None:
        self._lose(rank, "closed its ring" if rank in self._departed else
                   f"sent nothing for {seconds:.1f} s: it died or hangs, or the network to it "
                   "is cut")

    def _lose(self, rank: int, why: str, reporter: int | None = None) -> None:
        """Fail every pending and later receive with PeerLost and stop beating to `rank`;
        if this rank found it, tell every other rank, `rank` included: it may be alive
        (stalled, or cut off for a while) and must learn that it is out."""
        if rank in self.lost or rank == self.rank or rank not in self.peer_addresses:
            return
        self.lost[rank] = why
        address = self.peer_addresses[rank]
        if self._watchdog is not None:
            self._watchdog.forget(rank)
        direct.remove_socket_files(address)
        self.shared.lose(rank)
        found = "" if reporter is None else f" (found by rank {reporter})"
        message = f"rank {self.rank} ({self.address}): rank {rank} ({address}) {why}{found}"
        self.inbox.fail(PeerLost(message, rank, address))
        if reporter is not None:
            return
        log.log(logging.INFO if rank in self._departed else logging.WARNING, "%s", message)
        for other in self.peer_addresses:
            if other != self.rank and (other not in self.lost or other == rank):
                self.notify(other, Kind.LOST, rank, why.encode())

    def _reported_lost(self, message: Message) -> None:
        why = _text(message)
        rank, reporter = message.header.seq, message.header.sender
        if rank != self.rank:
            return self._lose(rank, why, reporter=reporter)
        if self.excluded_by is None:
            self.excluded_by = reporter
            self.inbox.fail(PeerLost(
                f"rank {self.rank} ({self.address}) is out of the ring: rank {reporter} "
                f"({self.peer_addresses.get(reporter)}) found that it {why}", self.rank,
                self.address))

    def _said_bye(self, message: Message) -> None:
        self._departed.add(message.header.sender)

    def _reported_mismatch(self, message: Message) -> None:
        why = _text(message)
        seq = message.header.seq
        if self.inbox.abandoned(seq):
            return  # it failed here already
        self.mismatches[seq] = MismatchError(
            f"rank {self.rank} ({self.address}): {why} (found by rank {message.header.sender})")
        self.inbox.abandon(seq, self.mismatches[seq])


def _text(message: Message) -> str:
    """A control message's payload as text (why a peer was lost, what mismatched)."""
    return bytes(message.payload.buffer).decode(errors="replace") if message.payload else ""
