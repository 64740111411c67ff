"""How the ranks of a ring without a shared arena come to hold a mesh (transport/mesh.py),
or agree not to.

Right after start-up (and after reform), where meet() made no arena, every rank of a ring
of two to MESH_RANKS ranks, all on tcp and without keys, calls meet_mesh(), unless its
mesh_bytes is 0 (which, like every setting that picks an algorithm, must be alike on every
rank: a rank that differs meets the others' meeting with its own first collective, and
both raise MismatchError). It runs two small collectives on the message path: an
all-gather of the port each rank listens at for the mesh (0: it could not listen); then,
once each rank has connected to every lower rank and been greeted by every higher one, a
minimum over the ranks says whether all did. Only then does any rank run collectives
over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

import numpy as np

from ringlib.errors import ProtocolError
from ringlib.transport import addresses, mesh
from ringlib.transport.mesh import Link, Mesh

from .settings import Settings

if TYPE_CHECKING:
    from .ring import Ring

log = logging.getLogger(__name__)

MESH_RANKS = 8    # a larger ring's ranks would each hold too many connections
MEET_S = 10.0     # how long the connections may take


async def meet_mesh(ring: Ring, settings: Settings) -> Mesh | None:
    """The mesh every rank of `ring` holds, or None (on every rank alike)."""
    if settings.mesh_bytes == 0 or ring.world_size > MESH_RANKS or not ring.endpoint.plain or \
            not all(p.startswith("tcp://") for p in ring.peers):
        return None
    listener = _listen(ring)
    links: dict[int, Link] = {}
    try:
        port = 0 if listener is None else listener.getsockname()[1]
        # the meeting's own collectives wait for the connections, whatever the timeout
        timeout = MEET_S + settings.collective_timeout
        ports = await ring.all_gather(np.array([port], np.int64), timeout=timeout)
        if listener is not None and ports.all():
            links = await _connect_all(ring, listener, [int(p) for p in ports[:, 0]])
        held = np.array([len(links) == ring.world_size - 1], np.int64)
        await ring.all_reduce(held, "min", timeout=timeout)
    except BaseException:
        _close(links)
        raise
    finally:
        if listener is not None:
            listener.close()
    if not held[0]:
        _close(links)
        return None
    return Mesh(links)


def _listen(ring: Ring) -> socket.socket | None:
    """A listening socket beside this rank's address, or None where it cannot have one."""
    host, _ = addresses.split_host_port(addresses.bind_address(ring.address), bind=True)
    try:
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                                        else socket.AF_INET, backlog=MESH_RANKS)
    except OSError as exc:
        log.info("rank %d (%s) takes no mesh: %s", ring.rank, ring.address, exc)
        return None
    listener.setblocking(False)
    return listener


async def _connect_all(ring: Ring, listener: socket.socket, ports: list[int]) -> dict[int, Link]:
    """Connect to every lower rank and take the connections of every higher one; {} (and
    a line in the log) where that fails within MEET_S."""
    loop, roster = asyncio.get_running_loop(), ring.endpoint.roster
    links: dict[int, Link] = {}
    try:
        async with asyncio.timeout(MEET_S):
            for peer in range(ring.rank):
                host, _ = addresses.split_host_port(ring.peers[peer])
                sock = await mesh.connect(loop, host, ports[peer])
                links[peer] = Link(sock, peer, ring.peers[peer])
                await loop.sock_sendall(sock, mesh.hello(ring.rank, roster.token))
            while len(links) < ring.world_size - 1:
                sock, where = await loop.sock_accept(listener)
                try:
                    peer = mesh.greeted_by(await mesh.receive_exactly(loop, sock, mesh.HELLO.size),
                                           roster.tokens)
                    if not ring.rank < peer < ring.world_size or peer in links:
                        raise ProtocolError(f"rank {peer} greeted rank {ring.rank}'s mesh out "
                                            "of turn")
                except ProtocolError as exc:  # a stranger: the peers may still come
                    log.warning("rank %d (%s) refused a mesh connection from %s: %s", ring.rank,
                                ring.address, where, exc)
                    sock.close()
                    continue
                except BaseException:
                    sock.close()
                    raise
                links[peer] = Link(sock, peer, ring.peers[peer])
    except (OSError, ProtocolError, TimeoutError) as exc:
        log.info("rank %d (%s) holds no mesh: %s", ring.rank, ring.address, exc)
        _close(links)
        return {}
    except BaseException:
        _close(links)
        raise
    return links


def _close(links: dict[int, Link]) -> None:
    for link in links.values():
        with contextlib.suppress(OSError):
            link.close()
