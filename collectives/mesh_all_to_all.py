"""Small all-reduces and barriers over the mesh, all to all: every rank writes its buffer
to every peer, waits for theirs, and reduces the ranks' buffers in rank order, so every
rank gets bit-identical results. One round trip, the least latency there is; the bytes
grow with the ranks, which is why it is for small buffers (mesh_bytes)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ringlib.transport.mesh import Link, Mesh

from .ring_reduce_scatter import Reducer


class AllToAll:
    """One rank's part of an all-to-all mesh collective over `buf` (a storage view);
    `reducers` None: a barrier. `check(peer, sig_hash, nbytes, expected)` raises where a
    peer's frame is not the one this rank expects."""

    def __init__(self, mesh: Mesh, rank: int, buf: np.ndarray,
                 reducers: tuple[Reducer, Reducer] | None,
                 check: Callable[[int, int, int, int], None]) -> None:
        self.links, self.rank, self.buf = mesh.links, rank, buf
        self.reducers, self.check = reducers, check
        self.got: dict[int, bytes] = {}

    def begin(self, seq: int, sig_hash: int) -> None:
        """Send this rank's buffer to every peer."""
        payload = memoryview(self.buf).cast("B")
        for link in self.links.values():
            link.send(seq, sig_hash, payload)

    def progress(self, seq: int) -> bool:
        """Write and read what the sockets take and hold now; whether it is done (and
        reduced)."""
        for peer, link in self.links.items():
            link.flush()
            if peer not in self.got:
                frame = link.take(seq)
                if frame is not None:
                    self.check(peer, frame[0], len(frame[1]), self.buf.nbytes)
                    self.got[peer] = frame[1]
        if len(self.got) < len(self.links) or any(link.unsent for link in self.links.values()):
            return False
        self._reduce()
        return True

    def _reduce(self) -> None:
        """Reduce the ranks' buffers in rank order into this rank's."""
        if self.reducers is None:
            return
        partial, final = self.reducers
        buf = self.buf
        parts = [buf if r == self.rank else np.frombuffer(self.got[r], buf.dtype)
                 for r in range(len(self.got) + 1)]
        acc = parts[0].copy()
        for part in parts[1:-1]:
            partial(acc, part)
        final(acc, parts[-1])
        buf[:] = acc

    def waits(self) -> list[tuple[Link, bool, bool]]:
        """(link, to read, to write) of every link this collective waits on."""
        return [(link, peer not in self.got, link.unsent) for peer, link in self.links.items()
                if link.unsent or peer not in self.got]

    def abandon(self) -> None:
        """Nothing to do: a frame is kept whole until the socket takes it, and one that
        comes later is skipped by the next collective."""

    def waiting_on(self) -> int | None:
        """The lowest rank whose frame has not come yet, if any."""
        return next((r for r in self.links if r not in self.got), None)
