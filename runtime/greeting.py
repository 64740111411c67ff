"""Start-up words repeated until they are heard.

A rank that re-opens its ring at the same address (a notebook, a test harness) may start
before a peer has closed the old ring there: its first words then reach the old ring,
which reads and drops them. So every word of start-up that another rank waits for
(JOIN, HELLO) is said again every RESEND_S until its answer comes, and the words are
taken by a handler that keeps the latest from each rank, so that repeats do no harm.
Once a rank has heard a peer's HELLO, that peer's old ring is gone (the new one bound
its address), and whatever this rank sends it from then on reaches the new one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from ringlib.transport import Endpoint, Kind, Message

RESEND_S = 0.1


async def until_heard(endpoint: Endpoint, kind: Kind, ranks: list[int],
                      say: Callable[[int], None] | None, timeout: float, answer: bool = False,
                      learn: Callable[[Message], None] | None = None,
                      ) -> tuple[dict[int, Message], list[int]]:
    """The `kind` messages that `ranks` sent within `timeout`, and the ranks that sent
    none. say(rank) is repeated to each rank not heard yet, every RESEND_S; with
    `answer`, also once to each as soon as it is heard, so that it hears this rank even
    if every earlier word was lost. learn(message) sees each as it arrives, before any
    message that follows it. A lost peer (PeerLost) ends the wait at once. Words of
    `kind` that come after the wait teach nothing (a stranger's must not teach this rank
    a token); with `answer`, a peer's repeat is answered again, since it missed the
    answer."""
    heard: dict[int, Message] = {}
    everyone = asyncio.Event()

    def on(message: Message) -> None:
        rank = message.header.sender
        first = rank not in heard
        heard[rank] = message
        if learn is not None:
            learn(message)
        if first and answer and say is not None:
            say(rank)
        if all(r in heard for r in ranks):
            everyone.set()

    endpoint.on(kind, on)  # with what came before
    try:
        missing = await _saying(endpoint, ranks, heard, everyone, say, timeout)
    finally:
        endpoint.on(kind, _answering(ranks, say) if answer and say is not None else _ignore)
    return heard, missing


async def _saying(endpoint: Endpoint, ranks: list[int], heard: dict[int, Message],
                  everyone: asyncio.Event, say: Callable[[int], None] | None,
                  timeout: float) -> list[int]:
    """until_heard's wait: say(rank) to the ranks not `heard` yet every RESEND_S, until
    `everyone` is set or `timeout` passes; return those still missing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with endpoint.expecting(ranks):  # the ring needs them all
        while (missing := [r for r in ranks if r not in heard]) and loop.time() < deadline:
            if endpoint.inbox.failure is not None:
                raise endpoint.inbox.failure
            for rank in missing if say is not None else ():
                say(rank)
            try:
                async with asyncio.timeout(min(RESEND_S, deadline - loop.time())):
                    await everyone.wait()
            except TimeoutError:
                pass
    if missing and endpoint.inbox.failure is not None:
        raise endpoint.inbox.failure
    return missing


def _answering(ranks: list[int], say: Callable[[int], None]) -> Callable[[Message], None]:
    """After the wait: a peer among `ranks` that says its word again missed this rank's
    answer, so say it again (at most once per RESEND_S to each), and learn nothing."""
    last: dict[int, float] = {}

    def answer(message: Message) -> None:
        rank, now = message.header.sender, time.monotonic()
        if rank in ranks and now - last.get(rank, -RESEND_S) >= RESEND_S:
            last[rank] = now
            say(rank)

    return answer


def _ignore(message: Message) -> None:
    """A start-up word after its wait."""
