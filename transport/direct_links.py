"""An endpoint's direct links (direct.py): the listener for its peers' links, and the
writers of its own to theirs, opened when a peer offers one (a LINK message)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Collection

from ringlib.errors import RendezvousError

from . import addresses, direct
from .inbox import Message
from .roster import Roster

log = logging.getLogger(__name__)


class DirectLinks:
    """Direct links to and from one rank's peers. Frames read from them go to
    `deliver(header, payload)`; offers that cannot be taken go to `drop(why)`. The links
    are plain sockets: what may travel on them is the endpoint's to say."""

    def __init__(self, roster: Roster, deliver: Callable[[bytes, Any], None],
                 drop: Callable[[str], None],
                 resend: Callable[[int, bytes, bytes | None], None]) -> None:
        self._roster, self._deliver, self._drop = roster, deliver, drop
        self._resend = resend
        self._listener: direct.Listener | None = None
        self._writers: dict[int, direct.Writer] = {}
        self._closed = False
        # poll(): deliver what every link holds now, without waiting. The listener's own,
        # once there is one: receives that spin call it in a loop.
        self.poll: Callable[[], None] = _no_links

    def listen(self) -> None:
        """Listen beside this rank's ZeroMQ address, where that is possible."""
        where = direct.listen_address(self._roster.address)
        if where is None:
            return
        try:
            self._listener = direct.Listener(where, self._deliver, self._drop)
            self.poll = self._listener.poll
        except OSError as exc:
            log.info("rank %d takes no direct links at %s (%s); ZeroMQ carries everything",
                     self._roster.rank, where, exc)

    @property
    def offer(self) -> bytes | None:
        """What to tell peers so that they open links to this rank; None if it takes none."""
        return None if self._listener is None else self._listener.address.encode()

    def take(self, offer: Message) -> None:
        """Open a link to the peer that sent `offer`, if it points where that peer listens."""
        rank = offer.header.sender
        try:
            address = addresses.check(offer.payload.bytes.decode())
        except (AttributeError, UnicodeDecodeError, RendezvousError) as exc:
            return self._drop(f"bad direct-link offer from rank {rank}: {exc}")
        if rank not in self._roster.peers or \
                not direct.offered_by(address, self._roster.peers[rank]):
            return self._drop(f"direct-link offer {address!r} is not where "
                              f"{self._roster.name(rank)} listens")
        if rank == self._roster.rank or rank in self._writers or self._closed:
            return
        try:
            self._writers[rank] = direct.Writer(address, functools.partial(self._resend, rank))
        except OSError as exc:
            log.info("rank %d: no direct link to rank %d at %s (%s)", self._roster.rank, rank,
                     address, exc)

    def send(self, to: int, header: bytes, payload: Any) -> bool:
        """Write one frame to `to` if a link to it is up; False: send it another way."""
        link = self._writers.get(to)
        return link is not None and link.ready and link.send(header, payload)

    @property
    def listener(self) -> direct.Listener | None:
        """Where this rank takes its peers' links (None: it takes none)."""
        return self._listener

    def linked_peers(self) -> list[int]:
        """The ranks this rank sends small messages to over a direct link, now."""
        return sorted(rank for rank, link in self._writers.items() if link.ready)

    def close(self, linger: float, gone: Collection[int] = ()) -> None:
        """Close every link; what writers still keep is written first, waiting up to
        `linger` seconds, except to the ranks `gone`, which read nothing more."""
        self._closed = True
        for rank, link in self._writers.items():
            link.close(0.0 if rank in gone else linger)
        if self._listener is not None:
            self._listener.close()


def _no_links() -> None:
    """poll() where this rank takes no direct links."""
