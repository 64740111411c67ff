"""Ring all-reduce (Patarasuk and Yuan; Gloo's allreduce_ring_chunked): reduce-scatter,
then all-gather, over a ring of N ranks.

Cost (S bytes): 2(N-1) steps; each rank sends and receives 2(N-1)/N x S bytes, the
least any all-reduce can move, so this is the algorithm for large buffers. Its 2(N-1)
message latencies make it slow for small ones: see recursive_doubling.py.
The result is bit-identical on every rank: each chunk is reduced on one path and then
copied around the ring.
"""

from __future__ import annotations

import numpy as np

from ringlib.partition import chunk_bounds

from .channel import Channel
from .ring_all_gather import all_gather_phase
from .ring_reduce_scatter import Reducer, reduce_scatter_phase


async def ring_allreduce(ch: Channel, buf: np.ndarray, partial: Reducer, final: Reducer) -> None:
    """Reduce `buf` (a storage view) in place across the ring."""
    bounds = chunk_bounds(buf.size, ch.world_size)
    await reduce_scatter_phase(ch, buf, bounds, partial, final)
    await all_gather_phase(ch, buf, bounds, first_step=ch.world_size - 1)
