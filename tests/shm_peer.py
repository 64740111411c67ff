"""One rank of a shared-memory test (test_shared_memory.py), placed by RINGLIB_* variables.

    python shm_peer.py check SEED     all-reduces of every size against a float64 reference;
                                      prints the ranks it reaches through shared memory
    python shm_peer.py mismatch SEED  rank 1 passes another shape: every rank must raise
    python shm_peer.py die SEED       the last rank kills itself (SIGKILL) amid large
                                      all-reduces, leaving an offer nobody took; every
                                      other rank must raise PeerLost (and remove it)
    python shm_peer.py crowd SEED     24 large all-reduces in flight at once
    python shm_peer.py orphan SEED    offers a segment nobody takes, then SIGKILLs itself
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time

import numpy as np

import ringlib
from ringlib.transport import segment_names, shared

SIZES = [1, 2, 1000, 40_000, 300_001, 2_500_000]  # small, doubling, ring, many pieces


async def shared_peers(ring: ringlib.Ring, expected: int) -> list[int]:
    """The ranks this rank writes to through shared memory, once `expected` have answered
    (or after 10 s, so that a test expecting fewer sees what there is)."""
    deadline = time.monotonic() + 10
    while len(ring.endpoint.links()["shared"]) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return ring.endpoint.links()["shared"]


async def check(ring: ringlib.Ring, seed: int) -> None:
    peers = await shared_peers(ring, int(os.environ.get("EXPECT_SHARED", ring.world_size - 1)))
    print("shared", ",".join(map(str, peers)) or "-", flush=True)
    reached = [r for r in range(ring.world_size) if r != ring.rank and ring.endpoint.reaches(r)]
    print("reaches", ",".join(map(str, reached)) or "-", flush=True)
    prefix = f"{segment_names.PREFIX}{segment_names.job(ring.peers)}-{ring.rank}-"  # its offers, all taken
    names = [n for n in os.listdir(segment_names.DIRECTORY) if n.startswith(prefix)]
    print("named", len(names), flush=True)
    digest = hashlib.sha256()
    for i, n in enumerate(SIZES):
        rng = np.random.default_rng([seed, i])
        xs = rng.standard_normal((ring.world_size, n)).astype(np.float32)
        x = xs[ring.rank].copy()
        if ring.rank == 1 and i == len(SIZES) - 1:  # the others' messages arrive first
            await asyncio.sleep(0.5)
        await ring.all_reduce(x, op="mean")
        digest.update(x.tobytes())
        want = xs.astype(np.float64).mean(axis=0)
        err = np.abs(x - want).max() if n else 0.0
        assert err < 1e-5, f"seed {seed}, {n} elements: off by {err} on rank {ring.rank}"
        for root in (0, ring.world_size - 1):
            y = xs[ring.rank].copy()
            await ring.broadcast(y, root=root)
            assert np.array_equal(y, xs[root]), f"seed {seed}: broadcast from {root}, {n}"
    print("checked", len(SIZES), digest.hexdigest()[:16], flush=True)


async def crowd(ring: ringlib.Ring, seed: int) -> None:
    """Many large all-reduces in flight at once: with tiny rings, the records that lend a
    half by address find no room, and the halves travel as messages (the fallback)."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((24, ring.world_size, 70_001)).astype(np.float32)
    mine = [x[ring.rank].copy() for x in xs]
    await asyncio.gather(*(ring.all_reduce(x) for x in mine))
    for x, every in zip(mine, xs):
        err = np.abs(x - every.astype(np.float64).sum(axis=0)).max()
        assert err < 1e-4, f"seed {seed}: off by {err} on rank {ring.rank}"
    print("crowd", len(mine), hashlib.sha256(b"".join(x.tobytes() for x in mine)).hexdigest()[:16],
          flush=True)


async def mismatch(ring: ringlib.Ring, seed: int) -> None:
    await shared_peers(ring, ring.world_size - 1)
    for n in (4, 300_000):  # the small path and the ring
        x = np.ones(n + (ring.rank == 1), np.float32)
        try:
            await ring.all_reduce(x, timeout=20)
        except ringlib.MismatchError as exc:
            print("mismatch", n, str(exc).splitlines()[0][:200], flush=True)
        else:
            raise AssertionError(f"seed {seed}: rank {ring.rank} found no mismatch at {n}")
    x = np.ones(10, np.float32)
    await ring.all_reduce(x)
    assert (x == ring.world_size).all()
    print("recovered", flush=True)


async def die(ring: ringlib.Ring, seed: int) -> None:
    await shared_peers(ring, ring.world_size - 1)
    x = np.random.default_rng(seed).standard_normal(1_000_000).astype(np.float32)
    try:
        for step in range(1000):
            if step == 5 and ring.rank == ring.world_size - 1:
                shared.Writer(segment_names.job(ring.peers), ring.rank, 99, 1 << 20)
                os.kill(os.getpid(), signal.SIGKILL)
            await ring.all_reduce(x, op="mean", timeout=30)
    except ringlib.PeerLost as exc:
        print("lost", exc.rank, flush=True)
        return
    raise AssertionError(f"seed {seed}: rank {ring.rank} never noticed the kill")


async def main(scenario: str, seed: int) -> None:
    async with ringlib.connect(peer_timeout=float(os.environ.get("PEER_TIMEOUT", 5))) as ring:
        await {"check": check, "mismatch": mismatch, "die": die, "crowd": crowd}[scenario](ring,
                                                                                      seed)


if __name__ == "__main__":
    scenario, seed = sys.argv[1], int(sys.argv[2])
    if scenario == "orphan":
        shared.Writer(segment_names.job([]), int(os.environ["RINGLIB_RANK"]), 99, 1 << 20)
        print("offered", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    asyncio.run(main(scenario, seed))
