"""Setting up shared-memory links (shared.py) between an endpoint and its peers.

A rank offers each peer a segment to read from: it creates one and sends its name over
the socket links (a SHARED message saying OFFER). A peer that can open it, map it and find
the nonce in it shares this host's /dev/shm; it unlinks the name and answers ACCEPT, and
from then on collective payloads to it travel through the segment. A peer on another host
(or in a container with its own /dev/shm) finds no such file and answers DECLINE, and the
sockets carry, as they always do until an answer comes. So a ring spread over several
hosts runs shared memory between the ranks on each host and tcp between hosts.

The taker also tries to read the nonce straight out of the offerer's memory, and says in
its ACCEPT whether that worked: then large payloads travel by address (single_copy.py).

A rank that offers a peer nothing (shared memory off) says so (NONE). So once a rank has
heard from every peer and had every offer answered, it knows, for each peer, whether
each of the two can reach the other's memory, and so does the peer: ranks may choose an
algorithm by it (`reach`) and still agree.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import msgpack

from ringlib.errors import ProtocolError

from . import frames
from .frames import Header, SharedStep
from .inbox import Message
from .roster import Roster
from .segment_names import remove_job_segments
from .shared import Reader, Writer
from .single_copy import readable

log = logging.getLogger(__name__)

_SINGLE_COPY = b"single-copy"  # an ACCEPT's payload where the taker can read the offerer


class SharedLinks:
    """One endpoint's shared-memory links: the segments it writes, one per peer that took
    its offer, and those it reads."""

    def __init__(self, roster: Roster, notify: Callable[[int, Header, bytes | None], None],
                 deliver: Callable[[memoryview, Any], None],
                 drop: Callable[[str], None]) -> None:
        self._roster = roster
        self._notify = notify  # Endpoint.notify: a control message over the sockets
        self._deliver = deliver
        self._drop = drop      # Endpoint's: a message dropped, said at a bounded rate
        self.writers: dict[int, Writer] = {}
        self.readers: dict[int, Reader] = {}
        self.job = ""  # the ring's part of segment names (shared.job), set by the first offer
        self._reads_memory: set[int] = set()  # peers whose memory this rank can read
        self._heard: set[int] = set()         # peers whose OFFER or NONE was answered
        self._unanswered: set[int] = set()    # peers this rank's offer waits on
        self._asleep = False                  # see sleep()

    def writer_to(self, rank: int) -> Writer | None:
        """The writer to `rank`, if `rank` took it."""
        writer = self.writers.get(rank)
        return writer if writer is not None and writer.ready else None

    def offer(self, rank: int, capacity: int) -> None:
        """Create a segment of `capacity` bytes for `rank` to read and offer it; with
        capacity 0 (or if no segment can be made), tell `rank` that none is offered."""
        if rank in self.writers:
            return
        try:
            writer = Writer(self.job, self._roster.rank, rank, capacity) if capacity > 0 else None
        except OSError as exc:
            log.info("rank %d offers rank %d no shared memory: %s", self._roster.rank, rank, exc)
            writer = None
        if writer is None:
            return self._say(rank, SharedStep.NONE)
        self.writers[rank] = writer
        self._unanswered.add(rank)
        offer = (writer.name, writer.nonce, writer.capacity, *writer.probe)
        self._say(rank, SharedStep.OFFER, msgpack.packb(offer))

    def answer(self, message: Message) -> None:
        """Act on a SHARED message: take an offer (or decline it), or learn the answer."""
        rank, step = message.header.sender, frames.shared_step(message.header)
        if rank == self._roster.rank or rank not in self._roster.peers:
            return self._drop(f"a shared-memory message from rank {rank}, which is not its "
                              "peer")
        if step in (SharedStep.OFFER, SharedStep.NONE):
            self._heard.add(rank)
            return self._take(rank, message) if step == SharedStep.OFFER else None
        writer = self.writers.get(rank)
        self._unanswered.discard(rank)
        if step == SharedStep.ACCEPT:
            if writer is not None and not writer.ready:
                writer.accepted(single_copy=message.payload is not None and
                                message.payload.bytes == _SINGLE_COPY)
            return
        log.info("rank %d: rank %d takes no shared memory (%s); sockets carry",
                 self._roster.rank, rank, message.text())
        if writer is not None:  # declined: what it sends this rank is another matter
            self.writers.pop(rank).close()

    def _take(self, rank: int, offer: Message) -> None:
        try:
            name, nonce, capacity, pid, address = msgpack.unpackb(offer.payload.bytes)
            reader = Reader(name, nonce, capacity, self._deliver, pid,
                            (rank, self._roster.peers.get(rank, "?")))
        except (OSError, ValueError, TypeError, AttributeError, ProtocolError,
                msgpack.UnpackException) as exc:
            return self._say(rank, SharedStep.DECLINE, str(exc).encode())
        old = self.readers.pop(rank, None)
        if old is not None:
            old.close()
        self.readers[rank] = reader
        if self._asleep:
            reader.asleep()
        else:
            reader.awake()
        if readable(pid, address, nonce):
            self._reads_memory.add(rank)
        self._say(rank, SharedStep.ACCEPT, _SINGLE_COPY if rank in self._reads_memory else None)

    def settled(self, ranks: list[int]) -> bool:
        """Whether every one of `ranks` was heard from and answered this rank's offer."""
        return self._heard.issuperset(ranks) and not self._unanswered.intersection(ranks)

    def peers(self) -> list[int]:
        """The ranks this rank sends collective payloads to through shared memory, now."""
        return sorted(rank for rank in self.writers if self.writer_to(rank))

    def unsettled(self, ranks: list[int]) -> list[int]:
        return sorted(set(ranks) - self._heard | self._unanswered.intersection(ranks))

    def linked(self, rank: int) -> bool:
        """Whether this rank and `rank` each took the other's offer (both find the same
        once settled): they share this host's /dev/shm."""
        return self.writer_to(rank) is not None and rank in self.readers

    def reach(self, rank: int) -> bool:
        """Whether this rank and `rank` can each read and write the other's memory; both
        find the same once settled."""
        writer = self.writer_to(rank)
        return writer is not None and writer.single_copy and rank in self._reads_memory

    def held(self) -> int:
        """Records received from every peer and not released yet."""
        return sum(reader.held() for reader in self.readers.values())

    def poll(self, rank: int | None = None) -> None:
        """Deliver what the segments of every peer (or of `rank`) hold now."""
        if rank is not None:
            reader = self.readers.get(rank)
            if reader is not None and not reader.poll() and reader.broken:
                self._broken(rank)
            return
        for rank, reader in self.readers.items():
            if not reader.poll() and reader.broken:
                return self._broken(rank)

    def _broken(self, rank: int) -> None:
        """The ring from `rank` went out of step: stop reading it, and tell `rank` (a
        DECLINE), which then sends by socket."""
        self._reads_memory.discard(rank)
        self.readers.pop(rank).close()
        self._say(rank, SharedStep.DECLINE, b"its ring broke")

    def _say(self, rank: int, step: SharedStep, payload: bytes | None = None) -> None:
        self._notify(rank, frames.shared_link(step, self._roster.rank), payload)

    def wake(self) -> None:
        """This endpoint no longer waits on its event loop: peers need not ring."""
        self._asleep = False
        for reader in self.readers.values():
            reader.awake()

    def sleep(self) -> None:
        """This endpoint waits on its event loop: peers ring. What came meanwhile is
        delivered."""
        self._asleep = True
        for reader in self.readers.values():
            reader.asleep()
        self.poll()

    def left(self, rank: int) -> None:
        """`rank` closed its ring: it reads nothing more of what this rank sent it."""
        writer = self.writers.get(rank)
        if writer is not None:
            writer.unread = True

    def lose(self, rank: int, died: bool = True) -> None:
        """`rank` is gone: unmap its segment, unlink ours if it never took it, and if it
        `died`, what it offered others that they never took."""
        if self.job and died:
            remove_job_segments(self.job, rank)
        self._close(rank)

    def _close(self, rank: int) -> None:
        """Drop both ends of the links with `rank`."""
        self._reads_memory.discard(rank)
        self._unanswered.discard(rank)
        writer, reader = self.writers.pop(rank, None), self.readers.pop(rank, None)
        if writer is not None:
            writer.close()
        if reader is not None:
            reader.close()

    def close(self) -> None:
        for rank in list(self.writers) + list(self.readers):
            self._close(rank)
