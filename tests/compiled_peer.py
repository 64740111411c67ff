"""One rank of a compiled-path or mesh test (test_compiled.py), placed by
RINGLIB_* variables. PATH_TAKEN names the path the small collectives take: "compiled" (the
default) or "mesh" (shared memory off).

    python compiled_peer.py mismatch SEED   ranks call different collectives, on the compiled
                                            path and across it (rank 1 too large for it):
                                            every rank raises MismatchError, then carries on
    python compiled_peer.py die SEED        the last rank SIGKILLs (DIE=kill) or SIGSTOPs
                                            (DIE=stop) itself amid compiled collectives;
                                            the others must raise PeerLost in bounded time
    python compiled_peer.py mixed SEED      compiled and message collectives in flight at
                                            once (asyncio.gather), every result checked
    python compiled_peer.py late SEED       rank 0 arrives 2 s late: the others wait without
                                            burning their cores, then finish
    python compiled_peer.py blocking SEED   the blocking facade on the compiled path, with
                                            _async calls in flight and from another thread
    python compiled_peer.py many SEED       ROUNDS small all-reduces back to back, each
                                            checked: with more ranks than cores, ranks are
                                            preempted at every point of the protocol

Each prints what it saw, and "ok" at the end; failures exit non-zero with the case.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

import numpy as np

import ringlib

PATH = os.environ.get("PATH_TAKEN", "compiled")
LIMIT = {"compiled": "compiled_bytes", "mesh": "mesh_bytes"}[PATH]  # the path's size setting


def data(seed: int, case: int, world: int, n: int, dtype: str = "float32") -> np.ndarray:
    """Every rank's input of one case, as rows."""
    return np.random.default_rng([seed, case]).standard_normal((world, n)).astype(dtype)


async def mismatch(ring: ringlib.Ring, seed: int) -> None:
    rank, world = ring.rank, ring.world_size
    limit = getattr(ring, LIMIT) // 4
    odd = world - 1  # the rank that calls something else
    cases = {
        "shape": lambda: ring.all_reduce(np.ones(3 if rank == odd else 2, np.float32)),
        "op": lambda: ring.all_reduce(np.ones(2, np.float32), "max" if rank == odd else "sum"),
        "kind": lambda: (ring.broadcast(np.ones(2, np.float32), root=0) if rank == odd
                         else ring.all_reduce(np.ones(2, np.float32))),
        "root": lambda: ring.broadcast(np.ones(5, np.float32), root=1 if rank == odd else 0),
        # rank `odd` takes messages: its buffer is over the path's limit
        "path": lambda: ring.all_reduce(np.ones(limit + 1 if rank == odd else limit, np.float32)),
        # ... or its path is off
        "setting": lambda: barrier_with(ring, 0 if rank == odd else getattr(ring, LIMIT)),
    }
    if PATH == "mesh":  # a broadcast takes messages there, which find it only later
        del cases["root"]
    for i, (name, call) in enumerate(cases.items()):
        start = time.monotonic()
        try:
            await call()
        except ringlib.MismatchError as exc:
            print(f"mismatch {name} in {time.monotonic() - start:.1f} s: {exc}", flush=True)
        else:
            raise AssertionError(f"rank {rank}: case {name} raised nothing")
        xs = data(seed, i, world, 1000)
        x = xs[rank].copy()
        await ring.all_reduce(x)  # the ring carries on, in step
        assert np.allclose(x, xs.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5), name
    print("recovered", flush=True)


async def barrier_with(ring: ringlib.Ring, limit: int) -> None:
    """A barrier under another size limit for the path, which is put back after it."""
    kept = getattr(ring, LIMIT)
    setattr(ring, LIMIT, limit)
    try:
        await ring.barrier()
    finally:
        setattr(ring, LIMIT, kept)


async def die(ring: ringlib.Ring, seed: int) -> None:
    victim, how = ring.world_size - 1, os.environ["DIE"]
    xs = data(seed, 0, ring.world_size, 50_000)  # split all-reduces, and small ones between
    try:
        for i in range(1_000_000):
            if ring.rank == victim and i == 200:
                os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            start = time.monotonic()
            await ring.all_reduce(xs[ring.rank].copy() if i % 2 else np.ones(2, np.float32))
    except ringlib.PeerLost as exc:
        print(f"lost {exc.rank} after {time.monotonic() - start:.1f} s", flush=True)
        return
    raise AssertionError("no PeerLost")


async def mixed(ring: ringlib.Ring, seed: int) -> None:
    world, rank = ring.world_size, ring.rank
    sizes = [2, 70_001, 3, 2_000_000, 1, 40_000]  # compiled, split, compiled, messages, ...
    for rep in range(5):
        xs_all = [data(seed, 10 * rep + i, world, n) for i, n in enumerate(sizes)]
        mine = [xs[rank].copy() for xs in xs_all]
        root_data = data(seed, 10 * rep + 9, world, 999, "float64")
        bcast = root_data[rank].copy()
        gathered, shard, _, *_ = await asyncio.gather(
            ring.all_gather(mine[0].copy()), ring.reduce_scatter(mine[1]), ring.barrier(),
            *[ring.all_reduce(x) for x in mine], ring.broadcast(bcast, root=world - 1))
        for i, (x, xs) in enumerate(zip(mine, xs_all)):
            want = xs.astype(np.float64).sum(0)
            assert np.allclose(x, want, rtol=1e-4, atol=1e-4), f"seed {seed} rep {rep} size {i}"
        assert np.array_equal(gathered, xs_all[0]), f"all_gather, rep {rep}"
        lo, hi = ringlib.chunk_bounds(sizes[1], world)[rank:rank + 2]
        assert np.allclose(shard, xs_all[1].astype(np.float64).sum(0)[lo:hi], rtol=1e-4,
                           atol=1e-4), f"reduce_scatter, rep {rep}"
        assert np.array_equal(bcast, root_data[world - 1]), f"broadcast, rep {rep}"
    print("mixed checked", flush=True)


async def late(ring: ringlib.Ring, seed: int) -> None:
    x = np.ones(2, np.float32)
    await ring.all_reduce(x)
    if ring.rank == 0:
        await asyncio.sleep(2.0)
    wall, cpu = time.monotonic(), time.process_time()
    await ring.all_reduce(x)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    assert x[0] == ring.world_size ** 2, x
    print(f"waited {wall:.2f} s on {cpu:.2f} s of cpu", flush=True)


def blocking(seed: int) -> None:
    with ringlib.init() as ring:
        world, rank = ring.world_size, ring.rank
        plan = ring.ring.plan("all_reduce", 8)
        assert plan.algorithm == PATH, plan
        for i in range(300):  # on the calling thread
            xs = data(seed, i, world, 1 + i % 7 * 5000)
            x = xs[rank].copy()
            assert ring.all_reduce(x, op="mean") is x
            assert np.allclose(x, xs.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5), i
        # with collectives in flight, the calls go to the loop thread, in order
        futures = [ring.all_reduce_async(np.full(3, rank, np.float32)) for _ in range(4)]
        middle = ring.all_gather(np.array([rank]))
        assert middle.ravel().tolist() == list(range(world))
        for future in futures:
            assert future.result().tolist() == [sum(range(world))] * 3
        results = []  # from a thread of the same name on every rank
        worker = threading.Thread(target=lambda: results.append(
            ring.broadcast(np.full(2, rank, np.int64), root=1).tolist()), name="helper")
        worker.start()
        worker.join()
        assert results == [[1, 1]], results
        ring.barrier()
    print("blocking checked", flush=True)


async def many(ring: ringlib.Ring, seed: int) -> None:
    rounds, world = int(os.environ.get("ROUNDS", 20_000)), ring.world_size
    offsets = np.random.default_rng(seed).integers(0, 1000, world)
    x = np.zeros(2, np.int64)
    for i in range(rounds):
        x[:] = offsets[ring.rank] + i
        await ring.all_reduce(x)
        assert x[0] == offsets.sum() + world * i, f"seed {seed}, round {i}: {x}"
    print(f"{rounds} rounds checked", flush=True)


async def main(scenario: str, seed: int) -> None:
    async with ringlib.connect(timeout=60, peer_timeout=float(os.environ.get("PEER_TIMEOUT", 5)),
                               heartbeat_s=0.2) as ring:
        await {"mismatch": mismatch, "die": die, "mixed": mixed, "late": late,
               "many": many}[scenario](ring, seed)
        print("ok", flush=True)


if __name__ == "__main__":
    scenario, seed = sys.argv[1], int(sys.argv[2])
    if scenario == "blocking":
        blocking(seed)
        print("ok")
    else:
        asyncio.run(main(scenario, seed))
