"""The ring all-reduce streamed over the mesh: large all-reduces of a ring without an arena
(ranks on several hosts, or shared memory off), run by the calling thread.

Over ZeroMQ a large all-reduce pays for the I/O thread's hops and a copy out of every
frame, and its reduce-scatter and all-gather run one after the other. Here each rank's
whole part goes as one frame to its right neighbour on its mesh link (transport/mesh.py),
its payload streamed: the 2(N-1) chunks the ring sends, one after the other, each
written as far as it is ready. The first is this rank's own chunk; every later one is
the chunk just received from the left, once reduced (reduce-scatter) or placed
(all-gather). What comes from the left is read piece by piece into a staging buffer and
reduced into place while the piece is in cache, or, in the all-gather, straight into
place. So the phases overlap, one thread drives both directions, and each byte is copied
only by the kernel and by the reduction. Gloo's ring does the same with receives posted
ahead of time (docs/benchmark-notes.md has the measurements).

The result is bit-identical on every rank: each chunk is reduced along the ring once, on
the ranks in ring order from its first, and the last one's bytes are what all place.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ringlib.errors import PeerLost
from ringlib.partition import chunk_bounds
from ringlib.transport.mesh import Link, Mesh

from .ring_reduce_scatter import Reducer

PIECE_BYTES = 256 << 10  # a reduction's share of a received chunk: it stays in cache


class RingStream:
    """One rank's part of a streamed ring all-reduce over `mesh`, of `buf` (a storage
    view) in place. `check(peer, sig_hash, nbytes, expected)` raises where the left peer's
    frame is not the one this rank expects (another signature, or not `expected` bytes)."""

    def __init__(self, mesh: Mesh, rank: int, world_size: int, buf: np.ndarray,
                 reducers: tuple[Reducer, Reducer], staging: np.ndarray,
                 check: Callable[[int, int, int, int], None]) -> None:
        n = world_size
        self.left_rank = (rank - 1) % n
        self.left, self.right = mesh.links[self.left_rank], mesh.links[(rank + 1) % n]
        self.buf, self.check, self.staging = buf, check, staging
        self.bytes = memoryview(buf).cast("B")
        bounds = [b * buf.itemsize for b in chunk_bounds(buf.size, n)]
        span = lambda c: (bounds[c % n], bounds[c % n + 1])  # noqa: E731
        # the k-th chunk sent right, and the k-th received from the left (as the k-th it
        # sends, the rank's left neighbour sends the chunk this rank sends as the k+1-th)
        self.sends = [span(rank - k) for k in range(n - 1)] + \
            [span(rank + 1 - j) for j in range(n - 1)]
        self.receives = [span(rank - k - 1) for k in range(n - 1)] + \
            [span(rank - j) for j in range(n - 1)]
        partial, final = reducers
        self.reducers = [partial] * (n - 2) + [final] + [None] * (n - 1)
        self.total = sum(b - a for a, b in self.sends)       # what this rank's frame holds
        self.incoming = sum(b - a for a, b in self.receives)  # and its left neighbour's
        self.sent = self.got = 0      # chunks wholly sent, received
        self.sent_in = self.got_in = 0  # bytes of the current one
        self.filled = 0               # bytes in staging
        self.begun = self.heard = False
        self.blocked = False          # the right socket took less than was ready

    def begin(self, seq: int, sig_hash: int) -> None:
        self.right.send_header(seq, sig_hash, self.total)
        self.begun = True

    def progress(self, seq: int) -> bool:
        """Move what the sockets take and hold now; whether all is sent and received."""
        while self._send() | self._receive(seq):
            pass
        return self.sent == len(self.sends) and self.got == len(self.receives) and \
            not self.right.unsent

    def _ready(self) -> int:
        """How many bytes of the chunk being sent are ready to go."""
        a, b = self.sends[self.sent]
        if self.sent == 0 or self.got >= self.sent:
            return b - a
        return self.got_in  # the one being received now: as far as it is done

    def _send(self) -> bool:
        """Write what is ready; whether anything went."""
        moved = False
        self.blocked = False
        while self.sent < len(self.sends):
            a, b = self.sends[self.sent]
            if a == b:  # an empty chunk (fewer elements than ranks)
                self.sent, moved = self.sent + 1, True
                continue
            ready = self._ready()
            if self.sent_in >= ready:
                return moved
            n = self.right.write(self.bytes[a + self.sent_in:a + ready])
            if n == 0:
                self.blocked = True
                return moved
            moved, self.sent_in = True, self.sent_in + n
            if self.sent_in == b - a:
                self.sent, self.sent_in = self.sent + 1, 0
        return moved

    def _receive(self, seq: int) -> bool:
        """Read and reduce or place what the left socket holds; whether anything came."""
        if not self.heard:
            frame = self.left.header(seq)
            if frame is None:
                return False
            self.heard = True  # its payload is this rank's to read, or to skip (abandon())
            self.check(self.left_rank, frame[0], frame[1], self.incoming)
        moved = False
        while self.got < len(self.receives):
            a, b = self.receives[self.got]
            if a == b:
                self.got, moved = self.got + 1, True
                continue
            reducer = self.reducers[self.got]
            if reducer is None:  # all-gather: straight into place
                n = self.left.read_into(self.bytes[a + self.got_in:b])
                if n == 0:
                    return moved
            else:  # reduce-scatter: a piece into staging, then reduced into place
                want = min(self.staging.nbytes, b - a - self.got_in)
                n = self.left.read_into(memoryview(self.staging)[self.filled:want])
                if n == 0:
                    return moved
                self.filled += n
                if self.filled < want:
                    moved = True
                    continue
                self._reduce(reducer, a + self.got_in, want)
                n, self.filled = want, 0
            moved, self.got_in = True, self.got_in + n
            if self.got_in == b - a:
                self.got, self.got_in = self.got + 1, 0
        return moved

    def _reduce(self, reducer: Reducer, at: int, nbytes: int) -> None:
        size = self.buf.itemsize
        part = self.staging[:nbytes].view(self.buf.dtype)
        reducer(self.buf[at // size:(at + nbytes) // size], part)

    def abandon(self) -> None:
        """It failed here: finish this rank's frame with zeros and skip the rest of the
        left's, so that the next collective's frames are read as frames. (Over a broken
        link there is no next one.)"""
        written = sum(b - a for a, b in self.sends[:self.sent]) + self.sent_in
        try:
            if self.begun:
                self.right.pad(self.total - written)
        except PeerLost:
            pass
        if self.heard:
            self.left.abandon()
        self.begun = self.heard = False

    def waits(self) -> list[tuple[Link, bool, bool]]:
        """(link, to read, to write) of what this rank waits on; one entry per link."""
        reading = self.got < len(self.receives)
        writing = self.blocked or self.right.unsent
        if self.left is self.right:
            return [(self.left, reading, writing)] if reading or writing else []
        return [w for w in ((self.left, reading, False), (self.right, False, writing))
                if w[1] or w[2]]

    def waiting_on(self) -> int | None:
        """The left peer, while its chunks have not all come."""
        return self.left_rank if self.got < len(self.receives) else None
