"""The wire format: a msgpack header frame, optionally followed by one payload frame.

The header is a flat msgpack array, cheap to pack and unpack:

    [version, kind, seq, step, chunk, sig, nbytes, sender]

seq numbers collectives in the order every rank issues them, step and chunk place a
message inside one collective, sig says what the sender was doing (for a collective its
name, dtype, shape, op and root, compared by the receiver; opaque to the transport),
nbytes is the payload's length (0 without one) and sender is the sending rank. Payloads
travel as their own frame so they can be sent and received without copying.

Records in a shared-memory ring (shared.py) carry the same header as fixed-width fields
and the signature's bytes (pack/unpack): there, msgpack's few microseconds per message
were a tenth of a small collective, and no other implementation reads the format.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import msgpack

from ringlib.errors import ProtocolError

PROTOCOL_VERSION = 3


class Kind(enum.IntEnum):
    """What a message is for. DATA carries collective payloads; the rest are control."""

    DATA = 0
    HELLO = 1      # a peer announces itself to a neighbour during start-up
    JOIN = 2       # rendezvous: a rank tells the seed rank its own address
    TABLE = 3      # rendezvous: the seed rank sends every rank the full address table
    STREAM = 4     # a stream between neighbours, outside the collectives (pipeline stages)
    LINK = 5       # a peer offers a direct link: its address (transport/direct.py)
    HEARTBEAT = 6  # a peer is alive (transport/heartbeat.py)
    LOST = 7       # a peer tells the others that rank `seq` fell silent
    BYE = 8        # a peer closes its ring on purpose: its silence is no loss
    MISMATCH = 9   # ranks called collective `seq` differently (payload: who and how)
    REFORM = 10    # survivors agree on a new ring (runtime/reform.py)
    SHARED = 11    # a shared-memory link offered, taken or declined (shared_links.py)
    DOORBELL = 12  # a record waits in a shared-memory link (shared.py)


class Header(NamedTuple):
    kind: Kind
    seq: int
    step: int
    chunk: int
    sig: str
    nbytes: int
    sender: int

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """What a receiver waits on: the message's place, independent of its contents."""
        return (self.kind, self.seq, self.step, self.chunk, self.sender)


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
    return Header(_KINDS[kind], seq, step, chunk, sig, nbytes, sender)


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
    return Header(_KINDS[kind], seq, step, chunk, sig, nbytes, sender)
