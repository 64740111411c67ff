"""Growing a running ring: newcomers ask to be let in, and the members admit them together.

A newcomer (connect(join=ADDRESS)) binds an address of its own and asks the member at
ADDRESS to be admitted (ADMIT, said again every ASK_EVERY_S until it is welcomed: the
members let newcomers in only when they call admit()). Each member's Doorway notes who
asked it. admit() is a collective of the members, in five steps:

  1. an all-reduce of how many newcomers each member heard (Ring.admit): if none did,
     that is all it costs;
  2. each member binds a fresh address, and an all-gather trades (fresh address,
     newcomers heard), from which every member computes the same table: the members in
     rank order, then the newcomers, in the order in which the lowest-ranked member that
     heard each one heard them;
  3. rank 0 sends each newcomer the table (WELCOME);
  4. members and newcomers meet at the fresh addresses as connect() does
     (rendezvous.join);
  5. the members confirm over the old ring, an all-reduce of whether each one's meeting
     went well. Only if all did do they leave the old ring for the new one, whose first
     collective (a barrier) tells the newcomers that they are in. Otherwise each member
     closes its fresh endpoint, the old ring goes on as it was (a newcomer that died while
     being admitted, say), and admit() raises; the newcomers' connect() fails too.

A member lost meanwhile fails the old ring's collectives with PeerLost, as any collective
would: the survivors reform(), which admits the waiting newcomers as well.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import msgpack
import numpy as np

from ringlib.errors import RendezvousError, RendezvousTimeout, RingError
from ringlib.transport import Endpoint, Kind, Message, addresses, frames, interfaces
from ringlib.transport.security import Keys

from .rendezvous import bind_towards, join
from .settings import Settings

log = logging.getLogger(__name__)

ASK_EVERY_S = 0.5  # how often a newcomer asks again, until it is welcomed
# A newcomer's rank until it is welcomed: the rank no ring reaches. The member it asks
# sits in its roster as rank 0, whose address the welcome then replaces with rank 0's.
NEWCOMER = (1 << 31) - 1
ADDRESS_BYTES = 512  # longest address a newcomer may ask with
_LENGTH = struct.Struct("<I")


class Doorway:
    """The newcomers that asked this member to be admitted, in the order they first
    asked, kept across the ring's changes of membership."""

    def __init__(self, rank: Any) -> None:
        self._me = rank  # a callable: this member's name, for the log
        self._asked: dict[str, None] = {}

    def heard(self, message: Message) -> None:
        """An ADMIT: note its newcomer, once."""
        try:
            address = addresses.check(message.payload.bytes.decode())
        except (AttributeError, UnicodeDecodeError, RingError):
            log.warning("%s ignored a request to be admitted without a valid address",
                        self._me())
            return
        if len(address.encode()) > ADDRESS_BYTES or address in self._asked:
            return
        self._asked[address] = None
        log.info("%s: the newcomer at %s asks to be admitted", self._me(), address)

    def waiting(self, members: list[str]) -> list[str]:
        """The newcomers that asked and are not `members` already, in order. Safe from a
        thread other than the loop's, which notes them: the copy is made in one step."""
        if not self._asked:
            return []
        return [a for a in list(self._asked) if a not in members]

    def forget(self, newcomers: list[str]) -> None:
        """Admitted, or given up on (those alive ask again)."""
        for address in newcomers:
            self._asked.pop(address, None)


async def admit(ring: Any, doorway: Doorway, mine: list[str], most: int, timeout: float,
                ) -> tuple[Endpoint, list[str], list[str]]:
    """Steps 2-5 above, on `ring` (a Ring whose endpoint is up), once step 1 found that
    some member heard newcomers (`most`, the most any heard; `mine`, those this one
    heard, as step 1 counted them): the fresh endpoint, the new table and the newcomers
    admitted. The old endpoint is closed then; the caller goes on in the new ring. Raises
    RendezvousError if the members could not meet the newcomers, with the old ring
    untouched."""
    old: Endpoint = ring._endpoint
    new = Endpoint(old.rank, old.keys)
    try:
        new.bind(addresses.fresh(old.address, ring.generation + 1))
        table, newcomers = await _trade(ring, new.address, mine, most, timeout)
        if old.rank == 0:
            _welcome(new, table, len(ring.peers), ring.generation + 1)
        failure = await _meet(new, table, ring.settings, timeout)
        met = await ring.all_reduce(np.array([failure is None], np.int64), op="min",
                                    timeout=timeout)
    except BaseException:
        await new.close("admission failed")
        raise
    if not met[0]:
        await new.close("admission failed")
        doorway.forget(newcomers)
        why = failure or "another member could not meet them"
        raise RendezvousError(f"rank {old.rank} ({old.address}): admitting "
                              f"{', '.join(newcomers)} failed, and the ring goes on as it "
                              f"was: {why}")
    old.on(Kind.ADMIT, _ignore)  # what it files while it closes is not news
    doorway.forget(newcomers)
    await old.close()
    return new, table, newcomers


def _ignore(message: Message) -> None:
    pass


async def _trade(ring: Any, address: str, mine: list[str], most: int,
                 timeout: float) -> tuple[list[str], list[str]]:
    """Step 2: every member's fresh address and newcomers, in one all-gather of slots
    big enough for the most newcomers any member heard; (table, newcomers)."""
    slot = _LENGTH.size + ADDRESS_BYTES * (most + 1) + 16
    packed = msgpack.packb([address, mine])
    own = np.zeros(slot, np.uint8)
    own[:_LENGTH.size + len(packed)] = np.frombuffer(_LENGTH.pack(len(packed)) + packed,
                                                     np.uint8)
    gathered = await ring.all_gather(own, timeout=timeout)
    members, newcomers = [], []
    for row in np.asarray(gathered).reshape(len(ring.peers), slot):
        raw = row.tobytes()
        (length,) = _LENGTH.unpack_from(raw)
        fresh, heard = msgpack.unpackb(raw[_LENGTH.size:_LENGTH.size + length])
        members.append(fresh)
        newcomers.extend(a for a in heard if a not in newcomers)
    return members + newcomers, newcomers


def _welcome(new: Endpoint, table: list[str], members: int, generation: int) -> None:
    """Step 3, on rank 0: tell each newcomer the table and the generation it joins."""
    word = msgpack.packb([generation, table])
    for rank in range(members, len(table)):
        new.connect(rank, table[rank])
        new.notify(rank, frames.control(Kind.WELCOME, 0), word)


async def _meet(new: Endpoint, table: list[str], settings: Settings,
                timeout: float) -> str | None:
    """Step 4: None if this member met every rank of the new table, else why not."""
    try:
        await join(new, table, settings, timeout)
    except RingError as exc:
        return str(exc)
    return None


async def ask(address: str, keys: Keys | None, settings: Settings,
              timeout: float) -> tuple[Endpoint, list[str], int]:
    """The newcomer's side: ask the member at `address` until welcomed, then meet the
    ring (step 4). Return the endpoint (its rank set), the table and the generation.
    RendezvousTimeout if nobody admits it within `timeout`."""
    addresses.check(address)
    endpoint = Endpoint(NEWCOMER, keys)
    try:
        own = bind_towards(endpoint, address, _interface(settings))
        endpoint.connect(0, address)
        generation, table = await _welcomed(endpoint, address, timeout)
        if own not in table:
            raise RendezvousError(f"the newcomer at {own} was welcomed into a ring without "
                                  f"its address: {table}")
        endpoint.rank = table.index(own)
        await join(endpoint, table, settings, timeout)
    except BaseException as exc:
        await endpoint.close(f"it gave up joining: {exc}")
        raise
    return endpoint, table, generation


def _interface(settings: Settings) -> str | None:
    return interfaces.address_of(settings.ifname) if settings.ifname else None


async def _welcomed(endpoint: Endpoint, address: str, timeout: float) -> tuple[int, list[str]]:
    """Say ADMIT to the member until rank 0's WELCOME comes: (generation, table)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    word, own = frames.control(Kind.ADMIT, NEWCOMER), endpoint.address.encode()
    key = frames.control_key(Kind.WELCOME, 0)
    while True:
        endpoint.notify(0, word, own)
        left = deadline - loop.time()
        if left <= 0:
            keys = "; with CurveZMQ keys, does it hold the ring's key?" if endpoint.keys else ""
            raise RendezvousTimeout(
                f"the newcomer at {endpoint.address} asked the member at {address} to be "
                f"admitted, and no ring admitted it within {timeout:g} s (the members "
                f"admit newcomers when they call admit() or reform()){keys}")
        try:
            async with asyncio.timeout(min(ASK_EVERY_S, left)):
                message = await endpoint.recv(key)
        except TimeoutError:
            continue
        try:
            generation, table = msgpack.unpackb(message.payload.bytes)
            return int(generation), [addresses.check(a) for a in table]
        except Exception:  # a key holder never sends this: wait for a proper one
            continue
