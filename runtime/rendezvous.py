"""Start-up without a server: learn every rank's address, then meet the two neighbours.

When only rank 0's seed address is known, every other rank binds a free port on the
interface that routes towards rank 0 (or on RINGLIB_HOST, where set), tells rank 0 (JOIN), and gets the whole table back
(TABLE). Rank 0 does this in its own runtime, as the peer it is; nothing passes through
it afterwards. Then each rank greets its left and right neighbours (HELLO) and waits,
up to the start-up timeout, to be greeted back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Iterable

import msgpack

from ringlib.collectives.ring_schedule import neighbours
from ringlib.errors import RendezvousTimeout
from ringlib.transport import Endpoint, Kind, Message, addresses, frames

from .environment import Placement
from .settings import SIDE_SHM_BYTES, Settings


async def bind_and_exchange(endpoint: Endpoint, where: Placement, timeout: float) -> list[str]:
    """Bind this rank's socket and return every rank's address, in rank order."""
    if where.peers is not None:
        endpoint.bind(where.peers[where.rank])
        return where.peers
    if where.rank == 0:
        endpoint.bind(where.seed)
        return await _collect_joins(endpoint, where, timeout)
    host, _ = addresses.split_host_port(where.seed)
    own_host = os.environ.get("RINGLIB_HOST") or addresses.route_to(host)
    endpoint.bind(f"tcp://[{own_host}]:0" if ":" in own_host else f"tcp://{own_host}:0")
    endpoint.connect(0, where.seed)
    await endpoint.send(0, frames.control(Kind.JOIN, where.rank), endpoint.address.encode())
    got, missing = await _receive_from(endpoint, Kind.TABLE, [0], timeout)
    if missing:
        raise RendezvousTimeout(
            f"rank {where.rank} ({endpoint.address}) got no address table from rank 0 at "
            f"{where.seed} within {timeout:g} s; is rank 0 running and reachable?")
    return [addresses.check(a) for a in msgpack.unpackb(got[0].payload.bytes)]


async def _collect_joins(endpoint: Endpoint, where: Placement, timeout: float) -> list[str]:
    joins, missing = await _receive_from(endpoint, Kind.JOIN, range(1, where.world_size), timeout)
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
    """Meet the neighbours, start watching them, and offer every rank a direct link and
    a shared-memory link (taken by those on this host)."""
    rank, world_size = endpoint.rank, len(peers)
    endpoint.set_peers(peers)
    left, right = neighbours(rank, world_size)
    # Beating starts first: a neighbour that waits for its other, late, neighbour must
    # hear from this rank meanwhile.
    endpoint.watch(sorted({left, right}), settings.heartbeat_s, settings.peer_timeout)
    await greet_neighbours(endpoint, left, right, timeout)
    endpoint.direct_bytes = settings.direct_bytes
    others = [r for r in range(world_size) if r != rank]
    await endpoint.offer_links(others)
    endpoint.offer_shared({r: settings.shm_bytes if r == right else
                           min(settings.shm_bytes, SIDE_SHM_BYTES) for r in others})
    await endpoint.settle_shared(others, timeout)


async def greet_neighbours(endpoint: Endpoint, left: int, right: int, timeout: float) -> None:
    """Send HELLO to both neighbours and wait for theirs; name whoever stays silent."""
    neighbours = sorted({left, right})
    for rank in neighbours:
        await endpoint.send(rank, frames.control(Kind.HELLO, endpoint.rank))
    _, missing = await _receive_from(endpoint, Kind.HELLO, neighbours, timeout)
    if missing:
        silent = ", ".join(f"rank {r} at {endpoint.peer_addresses[r]}" for r in missing)
        keys = "; with CurveZMQ keys, do all ranks hold the same key?" if endpoint.keys else ""
        raise RendezvousTimeout(f"rank {endpoint.rank} ({endpoint.address}) could not reach "
                                f"{silent} within {timeout:g} s{keys}")


async def _receive_from(endpoint: Endpoint, kind: Kind, ranks: Iterable[int],
                        timeout: float) -> tuple[dict[int, Message], list[int]]:
    """The `kind` messages that `ranks` sent within `timeout`, and the ranks that sent none."""
    got: dict[int, Message] = {}

    async def one(rank: int) -> None:
        got[rank] = await endpoint.recv(frames.control_key(kind, rank))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*map(one, ranks))
    return got, [r for r in ranks if r not in got]
