"""Ring all-gather: every rank ends with every rank's chunk.

Cost (N ranks, S bytes in all): N-1 steps; each rank sends and receives (N-1)/N x S
bytes, bandwidth-optimal. A received piece is passed on as the very ZeroMQ frame it came
in, so forwarding copies nothing and needs no tracker; a piece that came through shared
memory is passed on from the buffer it was copied into. What it sent from the caller's
buffer, the collective waits for before it returns (Ring._run drains every collective).
Like the reduce-scatter, the rank sends its own chunk a few pieces ahead of what it has
received (SentAhead), so that a slow neighbour holds a few pieces, not a whole chunk.
"""

from __future__ import annotations

import numpy as np

from .channel import Channel
from .ring_reduce_scatter import SentAhead
from .ring_schedule import all_gather_chunks, neighbours


async def all_gather_phase(ch: Channel, buf: np.ndarray, bounds: list[int],
                           first_step: int = 0) -> None:
    """Fill every chunk of `buf` (a storage view) from the rank that holds it complete:
    chunk i from rank i. Steps are numbered from `first_step` in message headers."""
    n, r = ch.world_size, ch.rank
    left, right = neighbours(r, n)
    own = SentAhead(ch, right, first_step, buf, bounds, r)
    await own.start()
    for step in range(n - 1):
        _, c = all_gather_chunks(r, n, step)
        await ch.before_overwrite(c)  # the reduce-scatter phase may still be sending it
        for k, (a, b) in enumerate(ch.pieces(bounds, c)):
            piece, frame = await ch.recv(left, first_step + step, k, b - a)
            if step == 0:
                await own.received(k)
            await ch.copy(buf[a:b], piece)
            if step < n - 2:
                await ch.forward(right, first_step + step + 1, k, frame, buf[a:b], region=c)
            ch.release(frame)
