"""Hierarchical all-reduce (NCCL's tree of rings, Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE,
Open MPI's coll/han) for rings with several ranks on each of several hosts.

With H hosts of m ranks each, and S bytes:
  1. reduce-scatter within each host (shared memory, where the host has it): local rank l
     ends with chunk l of its host's sum;
  2. an all-reduce of chunk l across the hosts, in a ring of the H ranks whose local rank
     is l: each host's m ranks carry its m chunks side by side;
  3. an all-gather within each host.
Bytes between hosts: each rank sends 2(H-1)/H x S/m, so each host 2(H-1)/H x S, the least
any all-reduce can; a flat ring over contiguous ranks sends 2(N-1)/N x S on each of its H
links between hosts, H(N-1)/(N(H-1)) times as much (1.5x on 2 hosts of 2). The rest of
the gain: m connections per host carry at once, and 2(H-1) steps cross, not 2(N-1).
The result is bit-identical on every rank: each element is reduced on one path (within
its chunk's host ring, then its slice's cross-host ring) and copied.

The phases are the flat ring's own (ring_reduce_scatter, ring_allreduce, ring_all_gather)
run over a Group: the same channel, with the group's ranks numbered from 0. Their
messages cannot meet: phases 1 and 3 come from ranks of this host and take different
steps, phase 2 only from ranks of other hosts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ringlib.partition import chunk_bounds
from ringlib.transport import addresses

from .channel import Channel
from .ring_all_gather import all_gather_phase
from .ring_allreduce import ring_allreduce
from .ring_reduce_scatter import Reducer, reduce_scatter_phase

Hosts = tuple[tuple[int, ...], ...]


def host_groups(peers: list[str]) -> Hosts | None:
    """The ranks of each host, from their addresses (tcp hosts; every ipc or inproc
    address is this host), hosts in the order of their first rank; None unless there are
    several hosts, each with the same number of ranks, two or more. Alike on every rank:
    every rank has the same table."""
    groups: dict[str, list[int]] = {}
    for rank, address in enumerate(peers):
        host = addresses.split_host_port(address)[0] if address.startswith("tcp://") else ""
        groups.setdefault(host, []).append(rank)
    sizes = {len(g) for g in groups.values()}
    if len(groups) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return None
    return tuple(tuple(g) for g in groups.values())


class Group:
    """A channel seen by a subset of its ranks, numbered 0.. in `ranks` order: what the
    flat algorithms need (rank, world_size, send, recv and the rest) with ranks mapped."""

    def __init__(self, ch: Channel, ranks: tuple[int, ...]) -> None:
        self.ch, self.ranks = ch, ranks
        self.rank, self.world_size = ranks.index(ch.rank), len(ranks)

    def pieces(self, bounds: list[int], c: int) -> list[tuple[int, int]]:
        return self.ch.pieces(bounds, c)

    async def send(self, to: int, step: int, chunk: int, payload: Any, region: Any = None,
                   writable: bool = False) -> bool:
        return await self.ch.send(self.ranks[to], step, chunk, payload, region, writable)

    async def recv(self, frm: int, step: int, chunk: int, count: int) -> tuple[Any, Any]:
        return await self.ch.recv(self.ranks[frm], step, chunk, count)

    async def forward(self, to: int, step: int, chunk: int, frame: Any, copied: np.ndarray,
                      region: Any) -> None:
        await self.ch.forward(self.ranks[to], step, chunk, frame, copied, region)

    def __getattr__(self, name: str) -> Any:  # run, copy, release, before_overwrite, ...
        return getattr(self.ch, name)


async def hierarchical_allreduce(ch: Channel, buf: np.ndarray, hosts: Hosts,
                                 partial: Reducer, final: Reducer) -> None:
    """Reduce `buf` (a storage view) in place across the ring, host by host."""
    local = next(g for g in hosts if ch.rank in g)
    within = Group(ch, local)
    across = Group(ch, tuple(g[within.rank] for g in hosts))
    bounds = chunk_bounds(buf.size, within.world_size)
    await reduce_scatter_phase(within, buf, bounds, partial, partial)
    a, b = bounds[within.rank], bounds[within.rank + 1]
    await ring_allreduce(across, buf[a:b], partial, final)
    await all_gather_phase(within, buf, bounds, first_step=within.world_size - 1)
