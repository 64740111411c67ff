"""Start-up without a server: learn every rank's address, then meet every rank.

When only rank 0's seed address is known, every other rank binds a free port on the
interface that routes towards rank 0 (or on RINGLIB_HOST, where set), tells rank 0
(JOIN), and gets the whole table back (TABLE). Rank 0 does this in its own runtime, as
the peer it is; nothing passes through it afterwards. Then each rank greets every other
(HELLO) and waits, up to the start-up timeout, to be greeted back. Words that another
rank waits for are repeated until they are answered (greeting.py).

Where the ranks share a key-value store already (torch.distributed's), an AddressBook
trades the addresses through it instead, and no seed port is needed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

import msgpack

from ringlib.collectives.ring_schedule import neighbours
from ringlib.errors import RendezvousTimeout
from ringlib.transport import Endpoint, Kind, addresses, frames

from .environment import Placement
from .greeting import until_heard
from .settings import SIDE_SHM_BYTES, Settings


class AddressBook(Protocol):
    """Where the ranks trade their addresses, for rings that have such a place."""

    host: str  # the interface this rank binds, which the other ranks reach

    def trade(self, address: str, timeout: float) -> list[str]:
        """Publish this rank's `address`; return every rank's, in rank order, once all are
        there (blocking), or raise RendezvousTimeout naming the ranks still missing."""


async def bind_and_exchange(endpoint: Endpoint, where: Placement, timeout: float,
                            book: AddressBook | None = None) -> list[str]:
    """Bind this rank's socket and return every rank's address, in rank order."""
    if book is not None:
        endpoint.bind(_any_port(book.host))
        return await asyncio.get_running_loop().run_in_executor(
            None, book.trade, endpoint.address, timeout)
    if where.peers is not None:
        endpoint.bind(where.peers[where.rank])
        return where.peers
    if where.rank == 0:
        endpoint.bind(where.seed)
        return await _collect_joins(endpoint, where, timeout)
    host, _ = addresses.split_host_port(where.seed)
    own_host = os.environ.get("RINGLIB_HOST") or addresses.route_to(host)
    endpoint.bind(_any_port(own_host))
    endpoint.connect(0, where.seed)
    join_word = frames.control(Kind.JOIN, where.rank)
    got, missing = await until_heard(
        endpoint, Kind.TABLE, [0], lambda rank: endpoint.notify(rank, join_word,
                                                                endpoint.address.encode()),
        timeout)
    if missing:
        raise RendezvousTimeout(
            f"rank {where.rank} ({endpoint.address}) got no address table from rank 0 at "
            f"{where.seed} within {timeout:g} s; is rank 0 running and reachable?")
    return [addresses.check(a) for a in msgpack.unpackb(got[0].payload.bytes)]


def _any_port(host: str) -> str:
    return f"tcp://[{host}]:0" if ":" in host else f"tcp://{host}:0"


async def _collect_joins(endpoint: Endpoint, where: Placement, timeout: float) -> list[str]:
    joins, missing = await until_heard(endpoint, Kind.JOIN, list(range(1, where.world_size)),
                                       None, timeout)
    if missing:
        raise RendezvousTimeout(
            f"rank 0 waited {timeout:g} s at {where.seed} for ranks {missing} to join; "
            "they never reached it")
    table = [endpoint.address] + [addresses.check(joins[r].payload.bytes.decode())
                                  for r in range(1, where.world_size)]
    packed = msgpack.packb(table)
    for rank in range(1, where.world_size):
        endpoint.connect(rank, table[rank])
        await endpoint.send(rank, frames.control(Kind.TABLE, 0), packed)
    return table


async def join(endpoint: Endpoint, peers: list[str], settings: Settings,
               timeout: float) -> None:
    """Start watching the neighbours, greet every rank, and offer every rank a direct link
    and a shared-memory link (taken by those on this host)."""
    rank, world_size = endpoint.rank, len(peers)
    endpoint.set_peers(peers)
    left, right = neighbours(rank, world_size)
    # Beating starts first: a neighbour that waits for its other, late, neighbour must
    # hear from this rank meanwhile.
    endpoint.watch(sorted({left, right}), settings.heartbeat_s, settings.peer_timeout)
    others = [r for r in range(world_size) if r != rank]
    await greet(endpoint, others, timeout)
    endpoint.direct_bytes = settings.direct_bytes
    await endpoint.offer_links(others)
    endpoint.offer_shared({r: settings.shm_bytes if r == right else
                           min(settings.shm_bytes, SIDE_SHM_BYTES) for r in others})
    await endpoint.settle_shared(others, timeout)


async def greet(endpoint: Endpoint, ranks: list[int], timeout: float) -> None:
    """Say HELLO to every one of `ranks` until each has said it back (greeting.py), and
    learn each one's token from it; name whoever stays silent. Every rank, not only the
    neighbours: what this rank offers a rank later must not reach an older ring there."""
    hello = frames.control(Kind.HELLO, endpoint.rank)
    tokens = endpoint.roster.tokens
    _, missing = await until_heard(
        endpoint, Kind.HELLO, ranks, lambda rank: endpoint.notify(rank, hello), timeout,
        answer=True, learn=lambda message: tokens.__setitem__(message.header.sender,
                                                              message.header.sig))
    if missing:
        silent = ", ".join(f"rank {r} at {endpoint.peer_addresses[r]}" for r in missing)
        keys = "; with CurveZMQ keys, do all ranks hold the same key?" if endpoint.keys else ""
        raise RendezvousTimeout(f"rank {endpoint.rank} ({endpoint.address}) could not reach "
                                f"{silent} within {timeout:g} s{keys}")
