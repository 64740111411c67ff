"""Streams: numbered flows of items between ranks, outside the collectives.

A pipeline's micro-batches, or the latency benchmark's ping-pong, are not collectives:
they have no signature and need no agreement, only an order. A Stream is one such flow,
numbered like collectives (ranks that open their streams in the same order agree on the
numbers: Ring.new_stream), so that streams on one ring never mix; within it, item i
travels as parts 0, 1, ..., each a message of its own, which can be received in any
order. A part travels over the sockets (ZeroMQ or a direct link), or, sent `held` to a
peer on this host, through the shared-memory link: its receiver reads it in place and
must release() the payload when done with it (shared.SharedPayload), or the link's ring
fills and later parts fall back to the sockets.
"""

from __future__ import annotations

from typing import Any, Awaitable

from . import frames
from .endpoint import Endpoint
from .inbox import Message


class Stream:
    """Stream `number` of `endpoint`'s ring."""

    __slots__ = ("endpoint", "number")

    def __init__(self, endpoint: Endpoint, number: int) -> None:
        self.endpoint, self.number = endpoint, number

    # Both return the endpoint's own coroutine to await: a latency benchmark runs on them,
    # and each coroutine frame costs every resumption.

    def send(self, to: int, item: int, part: int, payload: Any = None,
             dtype: str = "", held: bool = False) -> Awaitable[Any]:
        """Send part `part` of item `item` to rank `to`; await it for its tracker
        (Endpoint.send). `dtype` names what the payload holds, for the receiver; `held`:
        the receiver releases the payload, so it may come through shared memory."""
        nbytes = 0 if payload is None else memoryview(payload).nbytes
        header = frames.stream(self.number, item, part, dtype, self.endpoint.roster.rank, nbytes)
        return self.endpoint.send(to, header, payload, held=held)

    def recv(self, frm: int, item: int, part: int, spin: float = 0.0) -> Awaitable[Message]:
        """Part `part` of item `item` from rank `frm`, polling up to `spin` seconds first."""
        return self.endpoint.recv(frames.stream_key(self.number, item, part, frm), spin)
