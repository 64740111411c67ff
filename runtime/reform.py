"""Re-forming a ring after a peer was lost: the survivors agree on who they are.

Every survivor binds a fresh address, then runs rounds over the old ring's sockets: in
round k it sends each rank it believes alive a REFORM message with the ranks it knows
lost and its fresh address, and waits for theirs. A rank that stays silent for the whole
timeout of a round, or that the heartbeats find lost meanwhile, joins the lost set; each
round has a timeout of its own, so survivors that answer are never dropped for another's
silence. A rank that the others declared lost (it stalled, or was cut off) is out: its
reform() raises RendezvousTimeout at once. A survivor
stops once every member's message of a round carried its own lost set, unchanged; a
larger set anywhere starts another round. The members, in old rank order, become ranks
0..M-1 of the new ring.

Survivors agree as long as each hears the others within the deadline; one that cannot
is left out by the rest and forms a ring of its own, which the others' heartbeats then
lose on its next collective: a rank is left waiting, never silently out of step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Coroutine, TypeVar

import msgpack

from ringlib.errors import RendezvousTimeout
from ringlib.transport import Endpoint, Kind, addresses, frames

from .rendezvous import join
from .settings import Settings

T = TypeVar("T")

POLL_S = 0.2  # how often a wait checks whether the rank it waits on was lost meanwhile
NEXT_TRY = (1 << 31) - 1  # the round of a REFORM that only says: the next try is numbered so


@dataclass
class Attempt:
    """Which try at re-forming a ring as `generation` this is. Survivors number their
    tries alike (agree()), so that the words of a try that failed, which carry the address
    of an endpoint closed since, are never taken for those of the next."""

    generation: int
    number: int = 0


async def reform(old: Endpoint, attempt: Attempt, world_size: int, settings: Settings,
                 timeout: float) -> tuple[Endpoint | None, list[str]]:
    """Re-form the ring of `old` as `attempt.generation`: bind a fresh address, agree with
    the other survivors, meet them, and close `old`. Return the new ring's endpoint (None
    if this rank is the only survivor: a ring of one) and every member's address, in the
    new rank order; the endpoint's rank is this rank's new one. If it fails, the next try
    is numbered above this one, and the other survivors are told so at once."""
    new = Endpoint(old.rank, old.keys)
    try:
        new.bind(addresses.fresh(old.address, attempt.generation))
        members, peers = await agree(old, attempt, new.address, world_size, timeout)
        new.rank = members.index(old.rank)
        if len(members) > 1:
            await join(new, peers, settings, timeout)
    except BaseException:
        await new.close()
        attempt.number += 1
        for rank in range(world_size):
            if rank != old.rank and rank not in old.liveness.lost:
                old.notify(rank, frames.reform(attempt.generation, attempt.number, NEXT_TRY,
                                               old.rank))
        raise
    await old.close()
    if len(members) == 1:
        await new.close()
        return None, peers
    return new, peers


class _Newer(Exception):
    """Another survivor tries again already: so does this one."""


async def agree(old: Endpoint, attempt: Attempt, address: str, world_size: int,
                timeout: float) -> tuple[list[int], list[str]]:
    """(old ranks of the new ring's members, in order; their fresh addresses). Every
    survivor takes the highest try number that any has reached, and drops what lower
    ones said."""
    generation = attempt.generation
    while True:
        attempt.number = max(attempt.number, _newest(old, generation))
        old.inbox.purge(lambda key: key.kind == Kind.REFORM and key.seq == generation and
                        key.chunk < attempt.number)
        try:
            return await _rounds(old, generation, attempt.number, address, world_size,
                                 timeout)
        except _Newer:
            continue


async def _rounds(old: Endpoint, generation: int, attempt: int, address: str,
                  world_size: int, timeout: float) -> tuple[list[int], list[str]]:
    _check_not_excluded(old)
    lost = set(old.liveness.lost)
    for round_ in itertools.count():
        deadline = asyncio.get_running_loop().time() + timeout
        members = [r for r in range(world_size) if r not in lost]
        others = [r for r in members if r != old.rank]
        payload = msgpack.packb([sorted(lost), address])
        for rank in others:
            old.notify(rank, frames.reform(generation, attempt, round_, old.rank), payload)
        replies = await _all([_reply(old, generation, attempt, round_, r, deadline)
                              for r in others])
        seen = [set(reply[0]) for reply in replies if reply is not None]
        union = lost.union(*seen, (r for r, reply in zip(others, replies) if reply is None))
        if old.rank in union:
            raise RendezvousTimeout(
                f"rank {old.rank} ({old.address}): the other survivors re-formed the ring "
                f"without this rank; it did not answer them within {timeout:g} s")
        if union == lost and all(s == lost for s in seen):
            table = dict(zip(others, (reply[1] for reply in replies)))
            table[old.rank] = address
            return members, [table[r] for r in members]
        lost = union


async def _all(waits: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of `waits`, run at once; if one raises, the others are cancelled
    (and awaited) before it propagates."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _reply(old: Endpoint, generation: int, attempt: int, round_: int, rank: int,
                 deadline: float) -> tuple[list[int], str] | None:
    """`rank`'s message of this round, or None if it was lost or silent until `deadline`;
    _Newer if a survivor tries again meanwhile."""
    key = frames.reform_key(generation, attempt, round_, rank)
    loop = asyncio.get_running_loop()
    while rank not in old.liveness.lost and loop.time() < deadline:
        _check_not_excluded(old)
        if _newest(old, generation) > attempt:
            raise _Newer()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(POLL_S, max(deadline - loop.time(), 0))):
                message = await old.recv(key, despite_failure=True)
                return _parse(message.payload)
    return None


def _newest(old: Endpoint, generation: int) -> int:
    """The highest try at `generation` that another survivor's kept words belong to."""
    return max((m.header.chunk for m in old.inbox.kept(
        lambda key: key.kind == Kind.REFORM and key.seq == generation)), default=0)


def _check_not_excluded(old: Endpoint) -> None:
    excluded_by = old.liveness.excluded_by
    if excluded_by is not None:
        raise RendezvousTimeout(f"rank {old.rank} ({old.address}) cannot re-form: rank "
                                f"{excluded_by} declared it lost, and the others go on "
                                "without it")


def _parse(payload: object) -> tuple[list[int], str] | None:
    try:
        lost, address = msgpack.unpackb(payload.bytes)
        return [int(r) for r in lost], str(address)
    except Exception:  # an authorized peer never sends this; treat it as silence
        return None
