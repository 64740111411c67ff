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
from ringlib.transport import frames
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


async def test_strangers_cannot_inject_into_a_ring_with_keys(key_file, tmp_path, caplog, rng):
    """Ranks 0 and 1 share the key; a stranger pushes a well-formed message for the next
    all-reduce, once without CURVE and once with a key pair of its own. Neither arrives."""
    peers = local_addresses(2, "tcp", "")
    outsider = Keys.load(generate(tmp_path / "outsider")[1])
    ring_keys = Keys.load(key_file)
    ctx = zmq.asyncio.Context()  # the stranger's own: no ZAP handler of ringlib's
    plain, curved = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    for push in (plain, curved):
        push.linger = 0
    curved.curve_serverkey = ring_keys.public
    curved.curve_publickey, curved.curve_secretkey = outsider.public, outsider.secret
    xs = [rng.standard_normal(4).astype(np.float32) for _ in range(2)]
    expected = xs[0].astype(np.float64) + xs[1]
    forged = [encode(frames.data(1, 0, 0, signature("all_reduce", "float32", (4,), "sum"), 1,
                                 16)), np.full(4, 1e6, np.float32)]
    try:
        with caplog.at_level(logging.WARNING, logger="ringlib"):
            rings = await asyncio.gather(*[ringlib.connect(r, 2, peers, timeout=10,
                                                           curve_key=key_file)
                                           for r in range(2)])
            assert all(r.endpoint.links()["direct"] == [] for r in rings)  # no plain links
            for push in (plain, curved):
                push.connect(peers[0])
                await push.send_multipart(forged)
            await asyncio.sleep(0.5)
            await asyncio.gather(*[r.all_reduce(x, timeout=10) for r, x in zip(rings, xs)])
            await asyncio.gather(*[r.close() for r in rings])
        for x in xs:
            np.testing.assert_allclose(x, expected, rtol=1e-6)
        assert any("refused a CurveZMQ client" in r.message for r in caplog.records)
    finally:
        plain.close()
        curved.close()
        ctx.term()


def test_a_rank_without_the_key_cannot_join(key_file, tmp_path):
    """Rank 1 holds another pair: neither rank gets through start-up; both name the other."""
    other = str(generate(tmp_path / "other")[1])
    peers = local_addresses(2, "tcp", "")
    envs = [{**ringlib_env(r, 2, peers), "RINGLIB_CURVE_KEY": key, "RINGLIB_CONNECT_TIMEOUT": "3"}
            for r, key in enumerate((key_file, other))]
    code = "import ringlib; ringlib.init()"
    finished = run_ranks(["-c", code], envs, timeout=40)
    for f in finished:
        assert f.returncode != 0 and "RendezvousTimeout" in f.stderr, f.stderr[-2000:]
        assert "do all ranks hold the same key?" in f.stderr, f.stderr[-2000:]
