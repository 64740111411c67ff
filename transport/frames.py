"""The wire format: a msgpack header frame, optionally followed by one payload frame.

The header is a flat msgpack array, cheap to pack and unpack:

    [version, kind, seq, step, chunk, sig, nbytes, sender]

nbytes is the payload's length (0 without one) and sender is the sending rank. The three
integers and the string between them place a message, and what they hold depends on its
kind; each kind has a constructor here that names them, and a key to wait on:

    kind      seq          step                  chunk          sig         made by
    DATA      collective   step                  piece          signature   data()
    STREAM    item         part                  stream number  dtype       stream()
    REFORM    generation   round                 attempt        token       reform()
    LOST      lost rank    1 if it said BYE      -              token       lost()
    MISMATCH  collective   -                     -              token       mismatch()
    WAITING   collective   -                     -              token       waiting()
    SHARED    -            OFFER/ACCEPT/...      -              token       shared_link()
    HELLO, LINK, BYE       -                     -              token       control()
    others    -            -                     -              -           control()

Payloads travel as their own frame so they can be sent and received without copying.

The token is the sending endpoint's own random word (Roster.token), which its peers
learn from its HELLO at start-up: the endpoint stamps it on the kinds that can change a
ring's course (TOKENED) and drops those whose token is not the sender's (an older ring
at the same address, re-opened since, or a stranger who reached the port).

Records in a shared-memory ring (shared.py) carry the same header as fixed-width fields
and the signature's bytes (pack/unpack): there, msgpack's few microseconds per message
were a tenth of a small collective, and no other implementation reads the format.
"""

from __future__ import annotations

import enum
import operator
import struct
from typing import NamedTuple

import msgpack

from ringlib.errors import ProtocolError

PROTOCOL_VERSION = 4


class Kind(enum.IntEnum):
    """What a message is for. DATA carries collective payloads; the rest are control."""

    DATA = 0
    HELLO = 1      # a peer announces itself to a neighbour during start-up
    JOIN = 2       # rendezvous: a rank tells the seed rank its own address
    TABLE = 3      # rendezvous: the seed rank sends every rank the full address table
    STREAM = 4     # an item of a stream between neighbours, outside the collectives
    LINK = 5       # a peer offers a direct link: its address (direct_links.py)
    HEARTBEAT = 6  # a peer is alive (heartbeat.py)
    LOST = 7       # a peer tells the others that a rank fell silent
    BYE = 8        # a peer closes its ring on purpose: its silence is no loss
    MISMATCH = 9   # ranks called a collective differently (payload: who and how)
    REFORM = 10    # survivors agree on a new ring (runtime/reform.py)
    SHARED = 11    # a shared-memory link offered, taken or declined (shared_links.py)
    DOORBELL = 12  # a record waits in a shared-memory link (shared.py)
    WAITING = 13   # a rank has long waited for the receiver's piece of a collective
    CLOCK = 14     # a question for a peer's clock (step 0) or its answer (step 1, sig: ns)
    ADMIT = 15     # a newcomer asks a member to be admitted (payload: its address)
    WELCOME = 16   # rank 0 tells an admitted newcomer its ring (runtime/admission.py)


# The kinds an endpoint stamps with its token; HELLO carries it to the peers, which check
# it on the others.
TOKENED = frozenset({Kind.HELLO, Kind.LINK, Kind.BYE, Kind.LOST, Kind.MISMATCH, Kind.REFORM,
                     Kind.SHARED, Kind.WAITING})
CHECKED = TOKENED - {Kind.HELLO}


class SharedStep(enum.IntEnum):
    """What a SHARED message says about a shared-memory link (shared_links.py)."""

    OFFER = 0    # here is a segment to read from
    ACCEPT = 1   # taken
    DECLINE = 2  # not taken (payload: why)
    NONE = 3     # nothing is offered


class Key(NamedTuple):
    """Where a message is filed, and what a receiver waits on: its place, not its contents."""

    kind: Kind
    seq: int
    step: int
    chunk: int
    sender: int


class Header(NamedTuple):
    kind: Kind
    seq: int
    step: int
    chunk: int
    sig: str
    nbytes: int
    sender: int

    @property
    def key(self) -> Key:
        return _new(Key, _PLACE(self))


# What every message pays for, built the cheap way: a NamedTuple's own constructor is a
# Python function (about 0.7 us here), and looking up an enum member (Kind.DATA) about
# 0.2 us; a small collective makes several of each per message.
_new = tuple.__new__
_PLACE = operator.itemgetter(0, 1, 2, 3, 6)  # a header's key fields
DATA, STREAM = Kind.DATA, Kind.STREAM


def tokened(header: Header, token: str) -> Header:
    """`header` stamped with its sender's token (TOKENED kinds)."""
    return _new(Header, (*header[:4], token, *header[5:]))


def sized(header: Header, nbytes: int) -> Header:
    """`header` for a payload of `nbytes` (NamedTuple's _replace costs microseconds)."""
    return _new(Header, (*header[:5], nbytes, header[6]))


def data(seq: int, step: int, chunk: int, sig: str, sender: int, nbytes: int = 0) -> Header:
    """A piece of collective `seq` at `step`, running as `sig` (its signature)."""
    return _new(Header, (DATA, seq, step, chunk, sig, nbytes, sender))


def data_key(seq: int, step: int, chunk: int, sender: int) -> Key:
    return _new(Key, (DATA, seq, step, chunk, sender))


def stream(number: int, item: int, part: int, dtype: str, sender: int,
           nbytes: int = 0) -> Header:
    """Part `part` of item `item` of stream `number` (streams.py)."""
    return _new(Header, (STREAM, item, part, number, dtype, nbytes, sender))


def stream_key(number: int, item: int, part: int, sender: int) -> Key:
    return _new(Key, (STREAM, item, part, number, sender))


def reform(generation: int, attempt: int, round_: int, sender: int) -> Header:
    """A survivor's word in round `round_` of its `attempt`-th try at re-forming the ring
    as `generation`."""
    return Header(Kind.REFORM, generation, round_, attempt, "", 0, sender)


def reform_key(generation: int, attempt: int, round_: int, sender: int) -> Key:
    return Key(Kind.REFORM, generation, round_, attempt, sender)


def lost(rank: int, sender: int, closed: bool = False) -> Header:
    """`sender` found `rank` lost (the payload says why); `closed`: it said BYE."""
    return Header(Kind.LOST, rank, int(closed), 0, "", 0, sender)


def lost_rank(header: Header) -> tuple[int, bool]:
    """The rank a LOST message reports, and whether it closed its ring (said BYE)."""
    return header.seq, header.step == 1


def mismatch(seq: int, sender: int) -> Header:
    """`sender` found collective `seq` called differently (the payload says how)."""
    return Header(Kind.MISMATCH, seq, 0, 0, "", 0, sender)


def waiting(seq: int, sender: int) -> Header:
    """`sender` has long waited for the receiver's piece of collective `seq`; the payload
    is the signature it runs it as, which the receiver compares with its own."""
    return Header(Kind.WAITING, seq, 0, 0, "", 0, sender)


def shared_link(step: SharedStep, sender: int) -> Header:
    return Header(Kind.SHARED, 0, step, 0, "", 0, sender)


def shared_step(header: Header) -> int:
    """What a SHARED message says: a SharedStep, or another number from a foreign peer."""
    return header.step


def clock(nonce: int, sender: int, answer_ns: int | None = None) -> Header:
    """A question for the receiver's clock (`nonce` pairs it with its answer), or the
    answer: the wall clock in ns, as text, in the signature's place."""
    if answer_ns is None:
        return Header(Kind.CLOCK, nonce, 0, 0, "", 0, sender)
    return Header(Kind.CLOCK, nonce, 1, 0, str(answer_ns), 0, sender)


def control(kind: Kind, sender: int) -> Header:
    """A message whose header says only what it is and who sent it (HELLO, JOIN, TABLE,
    LINK, HEARTBEAT, BYE, DOORBELL)."""
    return Header(kind, 0, 0, 0, "", 0, sender)


def control_key(kind: Kind, sender: int) -> Key:
    return Key(kind, 0, 0, 0, sender)


_FIELDS = len(Header._fields)


def encode(header: Header) -> bytes:
    return msgpack.packb((PROTOCOL_VERSION, *header))


def decode(frame: bytes | memoryview) -> Header:
    """Parse a header frame, or raise ProtocolError saying what is wrong with it."""
    try:
        fields = msgpack.unpackb(frame, use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"undecodable header ({type(exc).__name__}: {exc})") from None
    if not isinstance(fields, tuple) or len(fields) != _FIELDS + 1:
        raise ProtocolError(f"header is not a {_FIELDS + 1}-field array: {fields!r:.80}")
    if fields[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {fields[0]!r}, expected {PROTOCOL_VERSION}")
    kind, seq, step, chunk, sig, nbytes, sender = fields[1:]
    # One chained test, not a loop: this runs for every message, small ones included.
    if not (type(kind) is type(seq) is type(step) is type(chunk) is type(nbytes)
            is type(sender) is int) or min(kind, seq, step, chunk, nbytes, sender) < 0:
        raise ProtocolError(f"header fields must be non-negative integers: {fields!r:.80}")
    if not isinstance(sig, str) or kind not in _KINDS:
        raise ProtocolError(f"bad kind or sig in header: {fields!r:.80}")
    return _new(Header, (_KINDS[kind], seq, step, chunk, sig, nbytes, sender))


_KINDS = {int(k): k for k in Kind}
# kind, sender, seq, step, chunk, nbytes; the signature's UTF-8 bytes follow
_PACKED = struct.Struct("<HxxIQIIQ")


def pack(header: Header) -> bytes:
    """The header as a shared-memory record carries it."""
    return _PACKED.pack(header.kind, header.sender, header.seq, header.step, header.chunk,
                        header.nbytes) + header.sig.encode()


def unpack(frame: memoryview) -> Header:
    """Parse a packed header, or raise ProtocolError saying what is wrong with it."""
    try:
        kind, sender, seq, step, chunk, nbytes = _PACKED.unpack_from(frame)
        sig = bytes(frame[_PACKED.size:]).decode()
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"unreadable packed header ({exc})") from None
    if kind not in _KINDS:
        raise ProtocolError(f"packed header of unknown kind {kind}")
    return _new(Header, (_KINDS[kind], seq, step, chunk, sig, nbytes, sender))
