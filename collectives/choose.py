"""The collectives as the runtime calls them: each picks its algorithm by buffer size.

Every function takes a Channel for one collective call and storage views (flat arrays
as the kernels see them, from ringlib.dtypes.typed_storage) that were checked already.
"""

from __future__ import annotations

import functools

import numpy as np

from ringlib.dtypes import DType
from ringlib.ops import Op
from ringlib.partition import chunk_bounds
from ringlib.reduce import storage_reducer

from .barrier import dissemination_barrier
from .channel import Channel
from .direct_broadcast import direct_broadcast
from .pairwise_allreduce import pairwise_allreduce
from .recursive_doubling import recursive_doubling
from .ring_all_gather import all_gather_phase
from .ring_allreduce import ring_allreduce
from .ring_broadcast import ring_broadcast
from .ring_reduce_scatter import Reducer, reduce_scatter_phase

# Buffers up to this size take the latency-optimal algorithms (recursive doubling, direct
# broadcast); larger ones the ring. Measured with `python -m ringlib.bench.allreduce
# --crossover`: see bench/NOTES.md.
SMALL_BYTES = 128 << 10


@functools.cache
def step_reducers(dtype: DType, op: Op, world_size: int) -> tuple[Reducer, Reducer]:
    """(partial, final): the reducer of every step but the last, and of the last one, which
    also divides by the world size for a mean. Raises UnsupportedOp for an integer mean."""
    final = storage_reducer(dtype, op, count=world_size)
    return (storage_reducer(dtype, Op.SUM) if op is Op.MEAN else final), final


def all_reduce_algorithm(nbytes: int, world_size: int, small_bytes: int,
                         reaches_peer: bool) -> str:
    """"doubling", "pairwise" or "ring": every rank finds the same from the same call.
    `reaches_peer`: whether the 2 ranks can read and write each other's memory
    (Endpoint.reaches, alike on both once start-up is over)."""
    if nbytes <= small_bytes:
        return "doubling"
    return "pairwise" if world_size == 2 and reaches_peer else "ring"


async def all_reduce(ch: Channel, buf: np.ndarray, dtype: DType, op: Op,
                     algorithm: str) -> None:
    partial, final = step_reducers(dtype, op, ch.world_size)
    if algorithm == "doubling":
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


async def broadcast(ch: Channel, buf: np.ndarray, root: int,
                    small_bytes: int = SMALL_BYTES) -> None:
    if buf.nbytes <= small_bytes:
        await direct_broadcast(ch, buf, root)
    else:
        await ring_broadcast(ch, buf, root)


async def barrier(ch: Channel) -> None:
    await dissemination_barrier(ch)
