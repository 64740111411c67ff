"""The collectives as the runtime calls them, and the one place that picks their algorithm.

plan() decides, for a collective of a given size on a given ring, which algorithm runs,
whether it is latency-bound (its receives then poll before they yield), and what of the
choice its signature carries, so that ranks that chose differently raise MismatchError
instead of mixing steps. Every rank finds the same plan from the same call.

Every other function takes a Channel for one collective call, storage views (flat arrays
as the kernels see them, from ringlib.dtypes.typed_storage) that were checked already,
and the plan's algorithm.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np

from ringlib.dtypes import DType
from ringlib.ops import Op
from ringlib.partition import chunk_bounds
from ringlib.reduce import storage_reducer

from .barrier import dissemination_barrier
from .channel import Channel
from .flat_broadcast import flat_broadcast
from .hierarchical_allreduce import Hosts, hierarchical_allreduce
from .pairwise_allreduce import pairwise_allreduce
from .recursive_doubling import recursive_doubling
from .ring_all_gather import all_gather_phase
from .ring_allreduce import ring_allreduce
from .ring_broadcast import ring_broadcast
from .ring_reduce_scatter import Reducer, reduce_scatter_phase

# Buffers up to this size take the latency-optimal algorithms (recursive doubling, flat
# broadcast); larger ones the ring. Measured with `ringlib bench allreduce --crossover`:
# see docs/benchmark-notes.md.
SMALL_BYTES = 128 << 10
# Collectives up to this size run compiled over the shared arena where the ring has one
# (compiled.py), and all-reduces above SPLIT_BYTES of them split the reduction among the
# ranks. Measured: see docs/benchmark-notes.md.
COMPILED_BYTES = 8 << 20
SPLIT_BYTES = 64 << 10
# All-reduces up to this size, and barriers, run over the mesh where the ring has one and
# no arena (mesh_path.py). Measured: see docs/benchmark-notes.md.
MESH_BYTES = 64 << 10


class Plan(NamedTuple):
    """How a collective runs on this ring."""

    algorithm: str       # "doubling", "pairwise", "ring", "hierarchical", "flat",
                         # "dissemination", or, over the shared arena, "compiled" or
                         # "compiled-split", or over the mesh, "mesh" or "mesh-ring"
    latency_bound: bool  # its receives poll for their messages before they yield
    tag: str             # what its signature carries of the choice ("" if the size says it)


# Every plan there is, made once: plan() runs on every collective.
_RING, _DOUBLING = Plan("ring", False, ""), Plan("doubling", True, "")
_PAIRWISE, _FLAT = Plan("pairwise", False, "pairwise"), Plan("flat", True, "")
_DISSEMINATION = Plan("dissemination", True, "")
_HIERARCHICAL = Plan("hierarchical", False, "hierarchical")
_COMPILED = Plan("compiled", True, "compiled")
_SPLIT = Plan("compiled-split", True, "compiled-split")
_MESH = Plan("mesh", True, "mesh")
_MESH_RING = Plan("mesh-ring", False, "mesh-ring")
EMPTY_PLAN = _DISSEMINATION  # an empty collective: its ranks meet as a barrier's do


def plan(collective: str, nbytes: int, world_size: int, small_bytes: int,
         reaches_peer: Callable[[], bool], compiled_bytes: int = 0,
         hosts: Hosts | None = None, mesh_bytes: int = 0, mesh_ring: bool = False) -> Plan:
    """The plan of `collective` ("all_reduce", "reduce_scatter", "all_gather",
    "broadcast" or "barrier") over `nbytes`. reaches_peer(), asked only where the choice
    depends on it: whether the 2 ranks of a ring of two can read and write each other's
    memory (Endpoint.reaches), which ranks know alike once start-up is over, but which no
    size tells: it is in the tag. compiled_bytes: the largest buffer the ring's shared
    arena takes (0: it has none); the tag says so too, as ranks' settings may differ.
    hosts: the ranks of each host where a hierarchical all-reduce may run (several
    hosts of several ranks each: hierarchical_allreduce.host_groups), else None; in the
    tag as well, for the same reason. mesh_bytes: the largest all-reduce the ring's mesh
    takes all to all (0: it has none); mesh_ring: whether larger ones stream round the
    ring over the mesh (mesh_ring_allreduce.py), where no hierarchy applies; both tagged
    too."""
    slot = nbytes // world_size if collective == "all_gather" else nbytes
    if compiled_bytes and slot <= compiled_bytes:
        return _SPLIT if collective == "all_reduce" and nbytes > SPLIT_BYTES else _COMPILED
    if mesh_bytes and collective in ("all_reduce", "barrier") and nbytes <= mesh_bytes:
        return _MESH
    if collective == "all_reduce":
        if mesh_ring and hosts is None:
            return _MESH_RING
        if nbytes <= small_bytes:
            return _DOUBLING
        if hosts is not None:
            return _HIERARCHICAL
        return _PAIRWISE if world_size == 2 and reaches_peer() else _RING
    if collective == "barrier":
        return _DISSEMINATION
    if collective == "broadcast" and nbytes <= small_bytes:
        return _FLAT
    return _RING


@functools.cache
def step_reducers(dtype: DType, op: Op, world_size: int) -> tuple[Reducer, Reducer]:
    """(partial, final): the reducer of every step but the last, and of the last one, which
    also divides by the world size for a mean. Raises UnsupportedOp for an integer mean."""
    final = storage_reducer(dtype, op, count=world_size)
    return (storage_reducer(dtype, Op.SUM) if op is Op.MEAN else final), final


async def all_reduce(ch: Channel, buf: np.ndarray, dtype: DType, op: Op,
                     algorithm: str, hosts: Hosts | None = None) -> None:
    partial, final = step_reducers(dtype, op, ch.world_size)
    if algorithm == "hierarchical":
        await hierarchical_allreduce(ch, buf, hosts, partial, final)
    elif algorithm == "doubling":
        await recursive_doubling(ch, buf, partial, final)
    elif algorithm == "pairwise":
        await pairwise_allreduce(ch, buf, final)
    else:
        await ring_allreduce(ch, buf, partial, final)


async def reduce_scatter(ch: Channel, work: np.ndarray, dtype: DType, op: Op) -> tuple[int, int]:
    """Reduce `work` in place until chunk `ch.rank` is complete; return that chunk's range."""
    partial, final = step_reducers(dtype, op, ch.world_size)
    bounds = chunk_bounds(work.size, ch.world_size)
    await reduce_scatter_phase(ch, work, bounds, partial, final)
    return bounds[ch.rank], bounds[ch.rank + 1]


async def all_gather(ch: Channel, out: np.ndarray) -> None:
    """Fill block i of `out` (N equal blocks) from rank i, whose own block is filled."""
    block = out.size // ch.world_size
    await all_gather_phase(ch, out, [i * block for i in range(ch.world_size + 1)])


async def broadcast(ch: Channel, buf: np.ndarray, root: int, algorithm: str) -> None:
    if algorithm == "flat":
        await flat_broadcast(ch, buf, root)
    else:
        await ring_broadcast(ch, buf, root)


async def barrier(ch: Channel) -> None:
    await dissemination_barrier(ch)
