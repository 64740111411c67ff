"""Pairwise all-reduce in place, for 2 ranks that can reach each other's memory (a shared-
memory link with single-copy reads and writes, transport/single_copy.py).

Each rank lends its peer its copy of the peer's half of the buffer. The peer reads it a
block at a time, reduces it into its own half, and writes the result back into the lent
half: after one step both ranks hold both halves, bit-identical, since one rank computed
each. Then each tells the other that its half is written (an empty message at step 1):
a release alone would not say so, since a rank that fails or dies releases too.

Cost (2 ranks, S bytes): one step; each rank reads S/2 bytes of its peer's memory and
writes S/2 bytes into it, and reduces S/2. The ring also moves S/2 each way per phase,
but in two phases, each with its own copy: reading the peer's reduced half in the
all-gather costs a full pass over memory that the write-back makes while the block is
still in cache. Where a lent half cannot go by address (no room in the ring for its
record), it travels as a plain message and its result comes back as the step-1 message.
"""

from __future__ import annotations

import numpy as np

from ringlib.partition import chunk_bounds

from .channel import Channel
from .ring_reduce_scatter import Reducer


async def pairwise_allreduce(ch: Channel, buf: np.ndarray, final: Reducer) -> None:
    """Reduce `buf` (a storage view) in place across the 2 ranks."""
    r, peer = ch.rank, 1 - ch.rank
    bounds = chunk_bounds(buf.size, 2)
    mine, theirs = buf[bounds[r]:bounds[r + 1]], buf[bounds[peer]:bounds[peer + 1]]
    lent = await ch.send(peer, 0, 0, theirs, region=0, writable=True)
    piece, frame = await ch.recv(peer, 0, 0, mine.size)
    written_back = await ch.reduce_back(final, mine, piece)
    ch.release(frame)
    await ch.send(peer, 1, 0, _WRITTEN if written_back else mine, region=1)
    result, frame = await ch.recv(peer, 1, 0, 0 if lent else theirs.size)
    if not lent:
        await ch.before_overwrite(0)
        await ch.copy(theirs, result)
    ch.release(frame)


_WRITTEN = np.empty(0, np.uint8)  # step 1 of a rank that wrote its result back
