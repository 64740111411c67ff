"""Start-up without a server: learn every rank's address, then meet every rank.

When only rank 0's seed address is known, every other rank binds a free port on the
interface that routes towards rank 0 (or on RINGLIB_IFNAME's or RINGLIB_HOST's, where
set), tells rank 0 (JOIN), and gets the whole table back (TABLE). Rank 0 does this in its
own runtime, as the peer it is; nothing passes through it afterwards. Then each rank
greets every other (HELLO) and waits, up to the start-up timeout, to be greeted back.
Words that another rank waits for are repeated until they are answered (greeting.py).

Where the ranks share a key-value store already (torch.distributed's), an AddressBook
trades the addresses through it instead, and no seed port is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Mapping, Protocol

import msgpack

from ringlib.collectives.ring_schedule import neighbours
from ringlib.errors import InvalidArgument, RendezvousTimeout
from ringlib.transport import Endpoint, Kind, addresses, frames, interfaces

from . import mpi_book, store_book
from .environment import Placement
from .greeting import until_heard
from .settings import SIDE_SHM_BYTES, Settings


class AddressBook(Protocol):
    """Where the ranks trade their addresses, for rings that have such a place."""

    host: str  # the interface this rank binds, which the other ranks reach
    rank: int
    size: int

    def trade(self, address: str, timeout: float) -> list[str]:
        """Publish this rank's `address`; return every rank's, in rank order, once all are
        there (blocking), or raise RendezvousTimeout naming the ranks still missing."""

    def abandon(self) -> None:
        """Make a trade() waiting in another thread give up soon (a Ctrl-C, a cancel)."""


def engine_may_have_book(env: Mapping[str, str]) -> bool:
    """Whether the engine that started this process may have its own place to trade
    addresses (engine_book), told from `env` alone, without starting anything."""
    return mpi_book.may_apply(env) or store_book.may_apply(env)


def engine_book(env: Mapping[str, str], timeout: float) -> AddressBook | None:
    """That place, where there is one: MPI itself under mpirun (mpi_book.py), or a store
    torch has (store_book.py). Blocking: it may start MPI or connect to a store."""
    return mpi_book.for_mpirun(env, timeout) or store_book.for_torch(env, timeout)


async def bind_and_exchange(endpoint: Endpoint, where: Placement, timeout: float,
                            book: AddressBook | None = None,
                            ifname: str | None = None) -> list[str]:
    """Bind this rank's socket and return every rank's address, in rank order. With
    `ifname`, this rank binds and advertises that interface's address (interfaces.py)."""
    own = interfaces.address_of(ifname) if ifname else None
    if book is not None:
        endpoint.bind(_any_port(own or book.host))
        return await asyncio.get_running_loop().run_in_executor(
            None, book.trade, endpoint.address, timeout)
    if where.peers is not None:
        if own is not None:
            _check_on(where.peers[where.rank], own, ifname, where.rank)
        endpoint.bind(where.peers[where.rank])
        return where.peers
    if where.rank == 0:
        _bind_seed(endpoint, where.seed, own)
        return await _collect_joins(endpoint, where, timeout)
    bind_towards(endpoint, where.seed, own)
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
    table = [addresses.check(a) for a in msgpack.unpackb(got[0].payload.bytes)]
    endpoint.connect(0, table[0])  # rank 0 may advertise another interface than its seed's
    return table


def bind_towards(endpoint: Endpoint, peer: str, own: str | None = None) -> str:
    """Bind `endpoint` where `peer` can reach it: a free port on `own` (an interface's
    address), else on RINGLIB_HOST, else on the interface that routes towards `peer`; a
    sibling of `peer`'s path or name for ipc and inproc. Return the address bound."""
    if not peer.startswith("tcp://"):
        return endpoint.bind(f"{peer}.{os.getpid()}.{next(_siblings)}")
    host, _ = addresses.split_host_port(peer)
    return endpoint.bind(_any_port(own or os.environ.get("RINGLIB_HOST") or
                                   addresses.route_to(host)))


_siblings = itertools.count()


def _bind_seed(endpoint: Endpoint, seed: str, own: str | None) -> None:
    """Rank 0 binds the seed, where the others join. With an interface's address `own`
    that the seed is not on, it binds that too and advertises it: the seed serves the
    joins alone."""
    if own is None or _ip(seed) == own:
        endpoint.bind(seed)
    else:
        endpoint.bind(_any_port(own), also=seed)


def _check_on(address: str, own: str, ifname: str, rank: int) -> None:
    """A rank given its address in the table must find it on the interface it was told."""
    if address.startswith("tcp://") and _ip(address) != own:
        raise InvalidArgument(f"rank {rank}'s address {address} is not on interface "
                              f"{ifname!r} ({own})")


def _ip(address: str) -> str:
    return addresses.split_host_port(addresses.bind_address(address), bind=True)[0]


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
