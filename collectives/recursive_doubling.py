"""Recursive doubling all-reduce (Thakur, Rabenseifner and Gropp), for small buffers.

Cost (N ranks, p the largest power of two <= N, S bytes): log2(p) steps in which every
rank swaps its whole buffer with the rank whose number differs in one bit, plus, when N is
not a power of two, one step before and one after in which ranks p..N-1 hand their data
to ranks 0..N-p-1 and get the result back. log2(p) + 2 latencies and S x log2(p) bytes
per rank instead of the ring's 2(N-1) latencies: the faster choice while latency, not
bandwidth, dominates (see SMALL_BYTES in choose.py for where the crossover was measured).
Both partners of a swap compute a op b and b op a, which are equal for every op here, so
all ranks end bit-identical.
"""

from __future__ import annotations

import numpy as np

from .channel import Channel
from .ring_reduce_scatter import Reducer


async def recursive_doubling(ch: Channel, buf: np.ndarray, partial: Reducer,
                             final: Reducer) -> None:
    """Reduce `buf` (a storage view) in place across all ranks."""
    n, r = ch.world_size, ch.rank
    p = 1 << (n.bit_length() - 1)
    rounds = p.bit_length() - 1
    # Rounds are steps 0..rounds-1, like the ring's first steps, so that a rank that took
    # the ring because its buffer differs meets a size mismatch at once, not a timeout.
    fold_step, result_step = rounds, rounds + 1
    if r >= p:  # folded out: lend the data to rank r-p, get the result back
        await ch.send(r - p, fold_step, 0, buf, region=0)
        result, _ = await ch.recv(r - p, result_step, 0, buf.size)
        await ch.before_overwrite(0)
        await ch.copy(buf, result)
        return
    if r < n - p:
        piece, _ = await ch.recv(r + p, fold_step, 0, buf.size)
        await ch.run(partial, buf, piece)
    for i in range(rounds):
        partner = r ^ (1 << i)
        await ch.send(partner, i, 0, buf, region=0)
        piece, _ = await ch.recv(partner, i, 0, buf.size)
        await ch.before_overwrite(0)
        await ch.run(final if i == rounds - 1 else partial, buf, piece)
    if r < n - p:
        await ch.send(r + p, result_step, 0, buf, region=0)
