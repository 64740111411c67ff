"""Hypothesis drives bytes into the two places a peer's bytes land: a direct link's frame
reader and the endpoint's delivery of ZeroMQ frames. Nothing raises out of them, whole
frames come out exactly as sent however the stream is cut, and what reaches the inbox
always agrees with its header."""

from __future__ import annotations

import asyncio
import socket

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ringlib.transport import Endpoint, Header, Kind
from ringlib.transport.direct import MAGIC, MAX_HEADER, PREFIX, Reader
from ringlib.transport.frames import decode, encode

pytestmark = pytest.mark.timeout(120)

frames = st.lists(st.tuples(st.binary(max_size=MAX_HEADER), st.one_of(st.none(),
                                                                     st.binary(max_size=2048))),
                  max_size=8)
headers = st.builds(Header, st.sampled_from(Kind), st.integers(0, 2**40), st.integers(0, 99),
                    st.integers(0, 99), st.text(max_size=30), st.integers(0, 64),
                    st.integers(0, 7))


def framed(header: bytes, payload: bytes | None) -> bytes:
    """A direct-link frame as Writer.send writes it."""
    size = 0 if payload is None else len(payload) + 1
    return PREFIX.pack(MAGIC, len(header), size) + header + (payload or b"")


class Link:
    """A Reader on one end of a socket pair, and the other end to write into."""

    def __init__(self, loop) -> None:
        self.writer, conn = socket.socketpair()
        conn.setblocking(False)
        self.got: list[tuple[bytes, bytes | None]] = []
        self.closed = False
        self.reader = Reader(conn, self._deliver, loop, self._on_close)

    def _deliver(self, header: bytes, payload: zmq.Frame | None) -> None:
        self.got.append((header, None if payload is None else payload.bytes))

    def _on_close(self, reader: Reader) -> None:
        self.closed = True

    def feed(self, data: bytes) -> None:
        self.writer.sendall(data)
        self.reader.read_ready()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


async def test_frames_cut_anywhere_arrive_whole_and_in_order():
    loop = asyncio.get_running_loop()

    @settings(max_examples=200)
    @given(frames, st.lists(st.integers(1, 4096), min_size=1, max_size=20))
    def cut(sent, cuts):
        link = Link(loop)
        try:
            stream, at = b"".join(framed(h, p) for h, p in sent), 0
            for size in cuts * (len(stream) // sum(cuts) + 1):
                if at >= len(stream):
                    break
                link.feed(stream[at:at + size])
                at += size
            assert link.got == sent and not link.closed
        finally:
            link.close()
    cut()


async def test_garbage_on_a_direct_link_closes_it_without_raising():
    loop = asyncio.get_running_loop()

    @settings(max_examples=300)
    @given(frames, st.binary(min_size=PREFIX.size, max_size=512))
    def garbage(before, junk):
        """A whole prefix of junk is judged at once; a shorter one would wait for more."""
        link = Link(loop)
        try:
            link.feed(b"".join(framed(h, p) for h, p in before) + junk)
            assert link.got[:len(before)] == before
            if junk[:4] != PREFIX.pack(MAGIC, 0, 0)[:4]:
                assert link.closed and len(link.got) == len(before)
        finally:
            link.close()
    garbage()


async def test_random_zeromq_frames_never_crash_delivery_and_only_sound_ones_are_filed():
    endpoint = Endpoint(0)
    endpoint.set_peers(["inproc://fuzz-0", "inproc://fuzz-1"])
    try:
        @settings(max_examples=400)
        @given(st.one_of(st.lists(st.binary(max_size=64), min_size=1, max_size=3),
                         st.tuples(headers.map(encode), st.binary(max_size=64)).map(list),
                         headers.map(encode).map(lambda h: [h])))
        def deliver(parts):
            endpoint._file([zmq.Frame(p) for p in parts])
            for message in endpoint.inbox.kept(lambda key: True):
                size = 0 if message.payload is None else len(message.payload)
                assert message.header.nbytes == size
                assert decode(encode(message.header)) == message.header
        deliver()
    finally:
        await endpoint.close()
