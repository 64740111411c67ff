"""Start-up without a server: learn every rank's address, then meet the two neighbours.

When only rank 0's seed address is known, every other rank binds a free port on the
interface that routes towards rank 0, tells rank 0 (JOIN), and gets the whole table back
(TABLE). Rank 0 does this in its own runtime, as the peer it is; nothing passes through
it afterwards. Then each rank greets its left and right neighbours (HELLO) and waits,
up to the start-up timeout, to be greeted back.
"""

from __future__ import annotations

import asyncio
import os

import msgpack

from ringlib.errors import RendezvousTimeout
from ringlib.transport import Endpoint, Header, Kind
from ringlib.transport import addresses

from .environment import Placement


def _header(kind: Kind, sender: int) -> Header:
    return Header(kind, 0, 0, 0, "", 0, sender)


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
    await endpoint.send(0, _header(Kind.JOIN, where.rank), endpoint.address.encode())
    try:
        async with asyncio.timeout(timeout):
            message = await endpoint.recv(_header(Kind.TABLE, 0).key)
    except TimeoutError:
        raise RendezvousTimeout(
            f"rank {where.rank} ({endpoint.address}) got no address table from rank 0 at "
            f"{where.seed} within {timeout:g} s; is rank 0 running and reachable?") from None
    return [a for a in msgpack.unpackb(message.payload.bytes)]


async def _collect_joins(endpoint: Endpoint, where: Placement, timeout: float) -> list[str]:
    table = [endpoint.address] + [""] * (where.world_size - 1)
    try:
        async with asyncio.timeout(timeout):
            for rank in range(1, where.world_size):
                message = await endpoint.recv(_header(Kind.JOIN, rank).key)
                table[rank] = addresses.check(message.payload.bytes.decode())
    except TimeoutError:
        missing = [r for r in range(1, where.world_size) if not table[r]]
        raise RendezvousTimeout(
            f"rank 0 waited {timeout:g} s at {where.seed} for ranks {missing} to join; "
            "they never reached it") from None
    packed = msgpack.packb(table)
    for rank in range(1, where.world_size):
        endpoint.connect(rank, table[rank])
        await endpoint.send(rank, _header(Kind.TABLE, 0), packed)
    return table


async def greet_neighbours(endpoint: Endpoint, left: int, right: int, timeout: float) -> None:
    """Send HELLO to both neighbours and wait for theirs; name whoever stays silent."""
    neighbours = sorted({left, right})
    for rank in neighbours:
        endpoint.connect(rank, endpoint.peer_addresses[rank])
        await endpoint.send(rank, _header(Kind.HELLO, endpoint.rank))
    heard: set[int] = set()
    try:
        async with asyncio.timeout(timeout):
            for rank in neighbours:
                await endpoint.recv(_header(Kind.HELLO, rank).key)
                heard.add(rank)
    except TimeoutError:
        silent = ", ".join(f"rank {r} at {endpoint.peer_addresses[r]}"
                           for r in neighbours if r not in heard)
        raise RendezvousTimeout(
            f"rank {endpoint.rank} ({endpoint.address}) could not reach {silent} within "
            f"{timeout:g} s") from None
