"""Bytes that are not ringlib's, sent by a hand-played peer over real tcp sockets: garbage
is logged and dropped, and a payload that disagrees with its header is refused before any
kernel reads it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zmq
import zmq.asyncio

import ringlib
from ringlib import ProtocolError
from ringlib.transport import Header, Kind
from ringlib.transport.addresses import local_addresses
from ringlib.transport.frames import encode

pytestmark = pytest.mark.timeout(60)


def data(seq: int, count: int) -> bytes:
    """Rank 1's header for the one step of a 2-rank recursive-doubling all-reduce."""
    return encode(Header(Kind.DATA, seq, 0, 0, "float32", count, 1))


async def test_garbage_is_dropped_and_a_short_payload_is_refused(caplog):
    peers = local_addresses(2, "tcp", "")
    ctx = zmq.asyncio.Context()
    fake = ctx.socket(zmq.PUSH)
    fake.linger = 0
    fake.connect(peers[0])
    inbox = ctx.socket(zmq.PULL)
    inbox.linger = 0
    inbox.bind(peers[1])
    await fake.send(encode(Header(Kind.HELLO, 0, 0, 0, "", 0, 1)))
    try:
        async with ringlib.connect(0, 2, peers, timeout=10) as ring:
            with caplog.at_level(logging.WARNING, logger="ringlib.transport"):
                await fake.send(b"\x00garbage")
                await fake.send_multipart([b"\xc1", b"more"])
                await fake.send_multipart([data(1, 4), np.full(4, 2.0, np.float32)])
                x = np.ones(4, np.float32)
                await ring.all_reduce(x, timeout=5)
            assert x.tolist() == [3.0] * 4
            assert sum("dropped a message" in r.message for r in caplog.records) == 2
            await fake.send_multipart([data(2, 4), b"\x00" * 4])
            with pytest.raises(ProtocolError, match=f"rank 1 \\({peers[1]}\\) sent a payload of 4 bytes"):
                await ring.all_reduce(np.ones(4, np.float32), timeout=5)
    finally:
        fake.close()
        inbox.close()
        ctx.term()
