"""How far this rank's wall clock is from rank 0's, measured as NTP does: a few questions
(CLOCK), each answered with the peer's clock, and the answer of the shortest round trip
taken, whose error is at most half that round trip. Timelines (timeline.py) shift their
times by it, so that the ranks' traces line up.

Every rank answers, from the moment its ring forms: a question costs the answering rank
one message, on the event loop."""

from __future__ import annotations

import asyncio
import itertools
import time

from ringlib.transport import Endpoint, Kind, Message, frames
from ringlib.transport.addresses import split_host_port

ROUNDS = 8      # questions per measurement
WAIT_S = 0.25   # how long one answer is awaited


class Clocks:
    """One endpoint's clock questions and answers."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._nonces = itertools.count(1)
        self._asked: dict[int, asyncio.Future] = {}
        endpoint.on(Kind.CLOCK, self._heard)

    def _heard(self, message: Message) -> None:
        header, endpoint = message.header, self._endpoint
        if header.sender == endpoint.rank or header.sender not in endpoint.peer_addresses:
            return  # not a peer of this ring: nobody to answer
        if header.step == 0:
            endpoint.notify(header.sender, frames.clock(header.seq, endpoint.rank,
                                                        time.time_ns()))
            return
        asked = self._asked.pop(header.seq, None)
        if asked is not None and not asked.done() and header.sig.isdigit():
            asked.set_result((time.time_ns(), int(header.sig)))

    async def offset_to(self, rank: int) -> float | None:
        """Microseconds to add to this rank's wall clock for `rank`'s; None if it never
        answered."""
        best: tuple[int, float] | None = None
        loop = asyncio.get_running_loop()
        for _ in range(ROUNDS):
            nonce, answer = next(self._nonces), loop.create_future()
            self._asked[nonce] = answer
            sent = time.time_ns()
            self._endpoint.notify(rank, frames.clock(nonce, self._endpoint.rank))
            try:
                async with asyncio.timeout(WAIT_S):
                    got, theirs = await answer
            except TimeoutError:
                self._asked.pop(nonce, None)
                continue
            if best is None or got - sent < best[0]:
                best = (got - sent, theirs - (sent + got) / 2)
        return None if best is None else best[1] / 1000.0


def same_host(a: str, b: str) -> bool:
    """Whether two ranks' addresses are on one host (ipc and inproc are this host's)."""
    def host(address: str) -> str:
        return split_host_port(address)[0] if address.startswith("tcp://") else ""
    return host(a) == host(b)
