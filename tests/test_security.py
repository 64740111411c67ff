"""CurveZMQ over real tcp sockets: a ring with keys works, and a process without them can
neither join nor slip a message in."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import numpy as np
import pytest
import zmq
import zmq.asyncio

import ringlib
from ringlib import Unauthorized
from ringlib.collectives import signature
from ringlib.runtime.settings import Settings
from ringlib.transport import direct, frames
from ringlib.transport.addresses import local_addresses
from ringlib.transport.frames import encode
from ringlib.transport.security import Keys, generate

from ring_harness import ringlib_env, run_ranks

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def key_file(tmp_path) -> str:
    return str(generate(tmp_path / "keys")[1])


def test_keygen_writes_a_private_pair_and_never_overwrites_it(tmp_path):
    run = [sys.executable, "-m", "ringlib", "keygen", str(tmp_path)]
    made = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    keys = Keys.load(tmp_path / "ring.key_secret")
    assert len(keys.public) == len(keys.secret) == 40
    assert (tmp_path / "ring.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "exists already" in again.stderr
    with pytest.raises(Unauthorized, match="only a public key"):
        Keys.load(tmp_path / "ring.key")
    with pytest.raises(Unauthorized, match="cannot read"):
        Keys.load(tmp_path / "missing")
    malformed = tmp_path / "malformed.key_secret"
    malformed.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    with pytest.raises(Unauthorized, match="malformed key"):
        Keys.load(malformed)


# Rank 1's piece of a 2-rank ring's first all-reduce of 4 floats, as a stranger forges it.
FORGED = [encode(frames.data(1, 0, 0, signature("all_reduce", "float32", (4,), "sum"), 1, 16)),
          np.full(4, 1e6, np.float32)]


async def all_reduce_is_right(rings: list[ringlib.Ring], rng: np.random.Generator) -> None:
    """The next all-reduce of a 2-rank ring sums what its ranks hold: nothing forged got in."""
    xs = [rng.standard_normal(4).astype(np.float32) for _ in range(2)]
    expected = xs[0].astype(np.float64) + xs[1]
    await asyncio.gather(*[r.all_reduce(x, timeout=10) for r, x in zip(rings, xs)])
    for x in xs:
        np.testing.assert_allclose(x, expected, rtol=1e-6)


async def send_on_the_plain_link(end, message: list) -> None:
    """Write `message` to the direct-link listener of `end`, which under keys rings
    doorbells only: whatever else arrives there is unauthenticated."""
    writer = direct.Writer(end.direct.listener.address, resend=lambda *frame: None)
    try:
        async with asyncio.timeout(5):
            while not writer.ready:
                await asyncio.sleep(0.005)
        assert writer.send(*message)
        await asyncio.sleep(0.2)
    finally:
        writer.close()


async def test_strangers_cannot_inject_into_a_ring_with_keys(key_file, tmp_path, caplog, rng):
    """Ranks 0 and 1 share the key; a stranger pushes a well-formed message for the next
    all-reduce, once without CURVE, once with a key pair of its own and once on the plain
    direct link that carries doorbells. None arrives."""
    peers = local_addresses(2, "tcp", "")
    outsider = Keys.load(generate(tmp_path / "outsider")[1])
    ring_keys = Keys.load(key_file)
    ctx = zmq.asyncio.Context()  # the stranger's own: no ZAP handler of ringlib's
    plain, curved = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    for push in (plain, curved):
        push.linger = 0
    curved.curve_serverkey = ring_keys.public
    curved.curve_publickey, curved.curve_secretkey = outsider.public, outsider.secret
    try:
        with caplog.at_level(logging.WARNING, logger="ringlib"):
            rings = await asyncio.gather(*[ringlib.connect(r, 2, peers, timeout=10,
                                                           curve_key=key_file)
                                           for r in range(2)])
            for push in (plain, curved):
                push.connect(peers[0])
                await push.send_multipart(FORGED)
            await send_on_the_plain_link(rings[0].endpoint, FORGED)
            await asyncio.sleep(0.5)
            await all_reduce_is_right(rings, rng)
            await asyncio.gather(*[r.close() for r in rings])
        assert any("refused a CurveZMQ client" in r.message for r in caplog.records)
        assert any("DATA from rank 1 on a plain link of a ring with keys" in r.message
                   for r in caplog.records)
    finally:
        plain.close()
        curved.close()
        ctx.term()


async def test_a_key_of_one_ring_opens_no_other_ring_in_the_same_process(key_file, tmp_path,
                                                                        caplog, rng):
    """Two keyed rings in one process share its ZAP handler: a client holding ring A's
    pair reaches none of ring B's sockets."""
    a_peers, b_peers = local_addresses(2, "tcp", ""), local_addresses(2, "tcp", "")
    other_file = str(generate(tmp_path / "b")[1])
    a_keys, b_keys = Keys.load(key_file), Keys.load(other_file)
    ctx = zmq.asyncio.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.curve_serverkey = b_keys.public
    push.curve_publickey, push.curve_secretkey = a_keys.public, a_keys.secret
    try:
        with caplog.at_level(logging.WARNING, logger="ringlib"):
            rings = await asyncio.gather(
                *[ringlib.connect(r, 2, a_peers, timeout=10, curve_key=key_file)
                  for r in range(2)],
                *[ringlib.connect(r, 2, b_peers, timeout=10, curve_key=other_file)
                  for r in range(2)])
            push.connect(b_peers[0])
            await push.send_multipart(FORGED)
            await asyncio.sleep(0.5)
            await all_reduce_is_right(rings[2:], rng)
            await asyncio.gather(*[r.close() for r in rings])
        assert any("refused a CurveZMQ client" in r.message for r in caplog.records)
    finally:
        push.close()
        ctx.term()


def test_a_rank_without_the_key_cannot_join(key_file, tmp_path):
    """Rank 1 holds another pair: neither rank gets through start-up; both name the other
    and say why, even where the peer timeout is shorter than the start-up's (a peer that
    never passes the handshake is not a peer that died)."""
    other = str(generate(tmp_path / "other")[1])
    peers = local_addresses(2, "tcp", "")
    envs = [{**ringlib_env(r, 2, peers), "RINGLIB_CURVE_KEY": key, "RINGLIB_CONNECT_TIMEOUT": "3",
             "RINGLIB_PEER_TIMEOUT": "1", "RINGLIB_HEARTBEAT_S": "0.2"}
            for r, key in enumerate((key_file, other))]
    code = "import ringlib; ringlib.init()"
    finished = run_ranks(["-c", code], envs, timeout=40)
    for f in finished:
        assert f.returncode != 0 and "RendezvousTimeout" in f.stderr, f.stderr[-2000:]
        assert "do all ranks hold the same key?" in f.stderr, f.stderr[-2000:]


def test_a_ring_with_keys_sends_smaller_segments_unless_told_otherwise(key_file, monkeypatch):
    """CurveZMQ encrypts 1 MiB messages faster than 4 MiB ones (docs/benchmarks.md), so a
    keyed ring's ring steps default to 1 MiB; a setting or RINGLIB_SEGMENT_BYTES wins."""
    monkeypatch.delenv("RINGLIB_SEGMENT_BYTES", raising=False)
    assert Settings().segment_bytes == 4 << 20
    assert Settings(curve_key=key_file).segment_bytes == 1 << 20
    assert Settings(curve_key=key_file, segment_bytes=8192).segment_bytes == 8192
    monkeypatch.setenv("RINGLIB_SEGMENT_BYTES", "65536")
    assert Settings(curve_key=key_file).segment_bytes == 65536
