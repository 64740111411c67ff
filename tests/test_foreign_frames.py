"""Bytes that are not ringlib's, sent by a hand-played peer over real tcp sockets: garbage,
wrong versions and payloads that disagree with their header are logged and dropped, and
the ring carries on with the right result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import AsyncIterator

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

import ringlib
from ringlib.collectives import signature
from ringlib.transport import PROTOCOL_VERSION, Kind, frames
from ringlib.transport.addresses import local_addresses
from ringlib.transport.frames import encode

pytestmark = pytest.mark.timeout(60)

SIG = signature("all_reduce", "float32", (4,), "sum")


def data(seq: int, nbytes: int) -> bytes:
    """Rank 1's header for the one step of a 2-rank recursive-doubling all-reduce."""
    return encode(frames.data(seq, 0, 0, SIG, 1, nbytes))


@contextlib.asynccontextmanager
async def hand_played_rank_1() -> AsyncIterator[tuple[list[str], zmq.asyncio.Socket]]:
    """Addresses for a 2-rank ring, and a socket that plays rank 1 to rank 0: it has
    greeted rank 0 and said it offers no shared memory (the ring offers none either:
    shm_bytes=0, and no mesh: mesh_bytes=0, as it could not meet one). Rank 1's own
    address is bound, so nothing rank 0 sends is refused."""
    peers = local_addresses(2, "tcp", "")
    ctx = zmq.asyncio.Context()
    fake, inbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    fake.linger = inbox.linger = 0
    fake.connect(peers[0])
    inbox.bind(peers[1])
    await fake.send(encode(frames.control(Kind.HELLO, 1)))
    await fake.send(encode(frames.shared_link(frames.SharedStep.NONE, 1)))
    try:
        yield peers, fake
    finally:
        fake.close()
        inbox.close()
        ctx.term()


async def test_garbage_and_payloads_unlike_their_header_are_dropped(caplog):
    foreign = [[b"\x00garbage"], [b"\xc1", b"more"], [b"a", b"b", b"c"],
               [msgpack.packb((PROTOCOL_VERSION + 1, 0, 1, 0, 0, SIG, 16, 1)), bytes(16)],
               [data(1, 16), bytes(4)], [data(1, 4), bytes(16)], [data(1, 16)]]
    async with hand_played_rank_1() as (peers, fake):
        async with ringlib.connect(0, 2, peers, timeout=10, peer_timeout=0,
                                   shm_bytes=0, mesh_bytes=0) as ring:
            with caplog.at_level(logging.WARNING, logger="ringlib.transport"):
                for parts in foreign:
                    await fake.send_multipart(parts)
                await fake.send_multipart([data(1, 16), np.full(4, 2.0, np.float32)])
                x = np.ones(4, np.float32)
                await ring.all_reduce(x, timeout=5)
            assert x.tolist() == [3.0] * 4
            dropped = [r.message for r in caplog.records if "dropped a message" in r.message]
            assert len(dropped) == len(foreign), dropped
            assert any("protocol version" in m for m in dropped)
            assert sum("payload bytes under a header of" in m for m in dropped) == 3


async def test_a_flood_of_junk_is_logged_at_a_bounded_rate_with_counts(caplog):
    async with hand_played_rank_1() as (peers, fake):
        with caplog.at_level(logging.WARNING, logger="ringlib.transport"):
            async with ringlib.connect(0, 2, peers, timeout=10, peer_timeout=0,
                                       shm_bytes=0, mesh_bytes=0) as ring:
                for i in range(2000):
                    await fake.send(b"\x00junk %d" % i)
                await fake.send_multipart([data(1, 16), np.full(4, 2.0, np.float32)])
                x = np.ones(4, np.float32)
                await ring.all_reduce(x, timeout=5)  # every piece of junk came before
        assert x.tolist() == [3.0] * 4
        lines = [r.message for r in caplog.records if r.name.startswith("ringlib.transport")]
        counted = [line for line in lines if "more like these" in line]
        assert len(lines) - len(counted) <= 10, lines[:20]
        assert len(counted) == 1 and "1990 more" in counted[0], lines[-3:]


async def test_foreign_clients_on_the_port_change_nothing(rng):
    """A ZeroMQ socket of the wrong type and a raw tcp client that writes junk connect to
    rank 0's port: ZeroMQ's handshake turns both away, and the ring's result is right."""
    peers = local_addresses(2, "tcp", "")
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    host, port = peers[0].removeprefix("tcp://").split(":")
    xs = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    expected = xs[0].astype(np.float64) + xs[1]
    rings = await asyncio.gather(*[ringlib.connect(r, 2, peers, timeout=10) for r in range(2)])
    try:
        dealer.connect(peers[0])
        await dealer.send_multipart([data(1, 16), bytes(16)])
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)
            await asyncio.gather(*[r.all_reduce(x, timeout=10) for r, x in zip(rings, xs)])
        for x in xs:
            np.testing.assert_allclose(x, expected, rtol=1e-6)
    finally:
        await asyncio.gather(*[r.close() for r in rings])
        dealer.close()
        ctx.term()
