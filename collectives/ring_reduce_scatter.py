"""Ring reduce-scatter: after N-1 steps rank r holds chunk r of the element-wise reduction.

Cost (N ranks, S bytes): N-1 steps; each rank sends and receives (N-1)/N x S bytes and
reduces as many, which is bandwidth-optimal. Each chunk travels in pieces of at most
segment_elems elements, so sending piece k to the right overlaps reducing piece k+1 from
the left: ZeroMQ's I/O thread moves bytes while the worker thread runs the kernel.

Memory: a received piece is held until it is reduced. The first step's pieces go out
WINDOW at a time, the next one after each piece received, so that a rank whose kernels
lag holds at most about WINDOW + 1 of its left neighbour's pieces, not a whole chunk.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .channel import Channel
from .ring_schedule import neighbours, reduce_scatter_chunks

Reducer = Callable[[np.ndarray, np.ndarray], None]
WINDOW = 2  # first-step pieces in flight before the first receive


class SentAhead:
    """A rank's own chunk, sent to the right WINDOW pieces ahead of what it has received
    from the left (the first step of the reduce-scatter and of the all-gather). Pieces of
    two chunks differ in number by at most one, so every piece goes out."""

    def __init__(self, ch: Channel, to: int, step: int, buf: np.ndarray, bounds: list[int],
                 chunk: int) -> None:
        self.ch, self.to, self.step, self.buf, self.chunk = ch, to, step, buf, chunk
        self.pieces = ch.pieces(bounds, chunk)

    async def start(self) -> None:
        for k in range(min(WINDOW, len(self.pieces))):
            await self._send(k)

    async def received(self, k: int) -> None:
        """Piece k came in from the left: one more goes out to the right."""
        if k + WINDOW < len(self.pieces):
            await self._send(k + WINDOW)

    async def _send(self, k: int) -> None:
        a, b = self.pieces[k]
        await self.ch.send(self.to, self.step, k, self.buf[a:b], region=self.chunk)


async def reduce_scatter_phase(ch: Channel, buf: np.ndarray, bounds: list[int],
                               partial: Reducer, final: Reducer) -> None:
    """Reduce `buf` (a storage view) in place so that chunk `ch.rank` of `bounds` holds the
    full reduction; `final` is the reducer of the last step (the division of a mean)."""
    n, r = ch.world_size, ch.rank
    left, right = neighbours(r, n)
    first, _ = reduce_scatter_chunks(r, n, 0)
    own = SentAhead(ch, right, 0, buf, bounds, first)
    await own.start()
    for step in range(n - 1):
        _, c = reduce_scatter_chunks(r, n, step)
        last = step == n - 2
        for k, (a, b) in enumerate(ch.pieces(bounds, c)):
            piece, frame = await ch.recv(left, step, k, b - a)
            if step == 0:
                await own.received(k)
            await ch.run(final if last else partial, buf[a:b], piece)
            ch.release(frame)
            if not last:  # the chunk reduced at step s is the one sent at step s+1
                await ch.send(right, step + 1, k, buf[a:b], region=c)
