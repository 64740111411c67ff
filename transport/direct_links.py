"""Direct links as an endpoint runs them (direct.py): listening, offering, taking offers.

Mixed into Endpoint, whose state it reads: rank, keys, peer_addresses, send(), _deliver(),
_drop() and _closed, and whose _listener and _links it keeps.
"""

from __future__ import annotations

import logging
from typing import Iterable

from ringlib.errors import RendezvousError

from . import addresses, direct
from .frames import Header, Kind
from .inbox import Message

log = logging.getLogger(__name__)


class DirectLinking:
    """An endpoint's direct links: the listener for its peers' and the writers to theirs."""

    def _listen_directly(self, address: str) -> None:
        where = direct.listen_address(address)
        if where is None:
            return
        try:
            self._listener = direct.Listener(where, self._deliver)
        except OSError as exc:
            log.info("rank %d takes no direct links at %s (%s); ZeroMQ carries everything",
                     self.rank, where, exc)

    def linked_peers(self) -> list[int]:
        """The ranks this rank sends small messages to over a direct link, now."""
        return sorted(rank for rank, link in self._links.items() if link.ready)

    async def offer_links(self, ranks: Iterable[int]) -> None:
        """Tell `ranks` where to open direct links to this rank (a LINK message over
        ZeroMQ); each connects in the background and sends small messages over it once
        connected. Nothing is offered where this rank takes no direct links."""
        if self._listener is None:
            return
        offer = self._listener.address.encode()
        for rank in ranks:
            await self.send(rank, Header(Kind.LINK, 0, 0, 0, "", 0, self.rank), offer)

    def _open_link(self, offer: Message) -> None:
        rank = offer.header.sender
        try:
            address = addresses.check(offer.payload.bytes.decode())
        except (AttributeError, UnicodeDecodeError, RendezvousError) as exc:
            return self._drop(f"bad direct-link offer from rank {rank}: {exc}")
        if rank not in self.peer_addresses or \
                not direct.offered_by(address, self.peer_addresses[rank]):
            return self._drop(f"direct-link offer {address!r} is not where rank {rank} "
                              f"({self.peer_addresses.get(rank)}) listens")
        if rank == self.rank or rank in self._links or self._closed or self.keys is not None:
            return  # with keys, bytes travel only on authenticated, encrypted links
        try:
            self._links[rank] = direct.Writer(address)
        except OSError as exc:
            log.info("rank %d: no direct link to rank %d at %s (%s)", self.rank, rank,
                     address, exc)
