"""One rank of a multi-process ring test: `python ring_peer.py SCENARIO SEED`.

Started by tests/ring_harness.py with RINGLIB_* (or torchrun/mpirun/srun) variables set.
Every rank draws every rank's inputs from the same seed, so each computes the float64
reference on its own; it prints a digest of all its results so the test can check that
all ranks agree bit for bit, and exits non-zero with the failing case on stderr.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import numpy as np
import torch

import ringlib
from ringlib.collectives.choose import SPLIT_BYTES

FLOATS = ("float32", "float64", "float16", "bfloat16")
INTS = ("int8", "uint8", "int32", "int64")
OPS = ("sum", "prod", "min", "max", "mean")
EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def inputs(seed: int, case: int, world: int, dtype: str, op: str, n: int,
           only: int | None = None) -> list:
    """Every rank's input for one case (or rank `only`'s, None for the others): numpy
    arrays, or torch tensors for every other case (always for bfloat16). Products draw
    factors near 1 so that no order overflows."""
    out = []
    for rank in range(world):
        if only is not None and rank != only:
            out.append(None)
            continue
        rng = np.random.default_rng([seed, case, rank])
        if dtype in INTS:
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        elif op == "prod":
            values = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)
        else:
            values = rng.standard_normal(n) * 10.0 ** rng.integers(-2, 3)
        if dtype == "bfloat16" or case % 2:
            tensor = torch.from_numpy(np.asarray(values, dtype="float64" if dtype in FLOATS else dtype))
            out.append(tensor.to(getattr(torch, dtype)))
        else:
            out.append(values.astype(dtype))
    return out


def copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def as64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.to(torch.float64 if x.is_floating_point() else torch.int64).numpy()
    return x.astype(np.float64 if x.dtype.kind == "f" else np.int64)


def reference(op: str, xs: list) -> np.ndarray:
    stacked = np.stack([as64(x) for x in xs])
    return {"sum": stacked.sum, "prod": stacked.prod, "min": stacked.min, "max": stacked.max,
            "mean": stacked.mean}[op](axis=0)


def check(got, xs: list, op: str, dtype: str, what: str) -> None:
    expected, value = reference(op, xs), as64(got)
    if dtype in INTS:  # integer ops wrap: compare modulo the dtype's width
        ok = np.array_equal(value, expected.astype(dtype).astype(np.int64))
    else:
        scale = np.abs(np.stack([as64(x) for x in xs])).sum(axis=0) if op in ("sum", "mean") \
            else np.abs(expected)
        tol = len(xs) * EPS[dtype] * scale + np.finfo(np.float32).tiny
        ok = bool(np.all(np.abs(value - expected) <= tol))
    if not ok:
        worst = np.argmax(np.abs(value - expected)) if value.size else 0
        raise AssertionError(f"{what}: element {worst} is {value.flat[worst]}, "
                             f"expected {expected.flat[worst]}")


class Digest:
    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, x) -> None:
        data = x.view(torch.int16) if isinstance(x, torch.Tensor) and x.dtype.itemsize == 2 else x
        self._hash.update(np.ascontiguousarray(data).tobytes())

    def hex(self) -> str:
        return self._hash.hexdigest()[:16]


def thresholds(ring: ringlib.Ring, itemsize: int, big: bool) -> list[int]:
    """Element counts on both sides of every size at which the algorithm changes: the
    compiled path's split and limit (`big`: the limit too), and small_bytes."""
    limits = [SPLIT_BYTES, ring.small_bytes] + ([ring.compiled_bytes] if big else [])
    return [n for limit in limits if limit for n in (limit // itemsize, limit // itemsize + 1)]


async def grid(ring: ringlib.Ring, seed: int, digest: Digest) -> None:
    """Every op and dtype on sizes 0, 1, below the world size, primes, two drawn from the
    seed, and on both sides of every threshold (the largest, the compiled path's limit,
    for float32 and bfloat16 sums). Each case's result is checked against float64 by one
    rank in turn, which draws every rank's inputs; the others draw only their own (the
    work would grow with the world's square) and must agree with it bit for bit (the
    digests)."""
    n_ranks, case = ring.world_size, 0
    drawn = [int(n) for n in np.random.default_rng([seed, 7]).integers(2, 300_000, 2)]
    sizes = [0, 1, max(n_ranks - 1, 1), 7, 8191, 65521, *drawn]
    for dtype in FLOATS + INTS:
        itemsize = np.dtype("int16" if dtype == "bfloat16" else dtype).itemsize
        for op in OPS:
            if op == "mean" and dtype in INTS:
                continue
            big = dtype in ("float32", "bfloat16") and op == "sum"
            for n in sizes + thresholds(ring, itemsize, big):
                case += 1
                checker = case % n_ranks == ring.rank
                xs = inputs(seed, case, n_ranks, dtype, op, n, None if checker else ring.rank)
                mine = copy(xs[ring.rank])
                result = await ring.all_reduce(mine, op)
                assert result is mine
                if checker:
                    check(result, xs, op, dtype, f"all_reduce {op} {dtype} n={n} case {case}")
                digest.add(result)


async def shapes_and_others(ring: ringlib.Ring, seed: int, digest: Digest) -> None:
    """reduce_scatter, all_gather and broadcast over shaped inputs, then concurrent calls."""
    n_ranks, rank = ring.world_size, ring.rank
    for case, (shape, dtype) in enumerate([((0,), "float32"), ((3, 5), "float64"),
                                           ((2, 300, 7), "bfloat16"), ((1,), "int64"),
                                           ((513, 1025), "float32"), ((4097,), "float16")],
                                          start=1000):
        n = int(np.prod(shape))
        xs = [x.reshape(shape) for x in inputs(seed, case, n_ranks, dtype, "sum", n)]
        keep = copy(xs[rank])
        shard = await ring.reduce_scatter(xs[rank], "sum")
        bounds = ringlib.chunk_bounds(n, n_ranks)
        lo, hi = bounds[rank], bounds[rank + 1]
        check(shard, [x.reshape(-1)[lo:hi] for x in xs], "sum", dtype, f"reduce_scatter {shape}")
        assert as64(xs[rank]).tobytes() == as64(keep).tobytes(), "reduce_scatter changed x"
        gathered = await ring.all_gather(xs[rank])
        assert tuple(gathered.shape) == (n_ranks, *shape) and type(gathered) is type(xs[rank])
        for i in range(n_ranks):
            assert np.array_equal(as64(gathered[i]), as64(xs[i])), f"all_gather row {i} {shape}"
        root = case % n_ranks
        mine = copy(xs[rank])
        await ring.broadcast(mine, root=root)
        assert np.array_equal(as64(mine), as64(xs[root])), f"broadcast {shape} root {root}"
    await ring.barrier()
    await concurrent(ring, seed)


async def concurrent(ring: ringlib.Ring, seed: int) -> None:
    """Collectives in flight at once, of different sizes and kinds, must not mix."""
    sizes = [5, 70_001, 3, 300_007, 1]
    xs_all = [inputs(seed, 2000 + i, ring.world_size, "float32", "sum", n)
              for i, n in enumerate(sizes)]
    mine = [copy(xs[ring.rank]) for xs in xs_all]
    root_data = inputs(seed, 2100, ring.world_size, "float64", "sum", 999)
    bcast = copy(root_data[ring.rank])
    await asyncio.gather(*[ring.all_reduce(x) for x in mine[:3]], ring.broadcast(bcast, root=0),
                         ring.barrier(), *[ring.all_reduce(x) for x in mine[3:]])
    for i, (x, xs) in enumerate(zip(mine, xs_all)):
        check(x, xs, "sum", "float32", f"concurrent all_reduce {i}")
    assert np.array_equal(bcast, root_data[0]), "concurrent broadcast"


async def overwrite_after_return(ring: ringlib.Ring, seed: int, digest: Digest) -> None:
    """Scribble on each result as soon as the collective returns: if any of its zero-copy
    sends had not left yet, a neighbour would receive the scribbles instead."""
    n = 3_000_017  # ~12 MiB of float32, many pieces in flight at once
    for case in range(3000, 3008):
        xs = inputs(seed, case, ring.world_size, "float32", "sum", n)
        x = copy(xs[ring.rank])
        x = x if isinstance(x, np.ndarray) else x.numpy()
        await ring.all_reduce(x)
        digest.add(x)
        check(x, xs, "sum", "float32", f"all_reduce before scribbling, case {case}")
        x[:] = np.nan


async def disagree(ring: ringlib.Ring, seed: int, digest: Digest) -> None:
    """The last rank keeps the flat ring where the others take the hierarchical
    all-reduce: every rank raises MismatchError, and the ring carries on in step."""
    ring.configure(hierarchical=ring.rank != ring.world_size - 1)
    xs = inputs(seed, 1, ring.world_size, "float32", "sum", 1 << 16)
    try:
        await ring.all_reduce(copy(xs[ring.rank]))
    except ringlib.MismatchError as exc:
        print(f"mismatch: {exc}", flush=True)
    else:
        raise AssertionError(f"rank {ring.rank}: no MismatchError")
    ring.configure(hierarchical=True)
    mine = await ring.all_reduce(copy(xs[ring.rank]))
    check(mine, xs, "sum", "float32", "after the mismatch")
    digest.add(mine)


async def main(scenario: str, seed: int) -> None:
    digest = Digest()
    async with ringlib.connect(timeout=60) as ring:
        if scenario in ("grid", "all"):
            await grid(ring, seed, digest)
        if scenario in ("others", "all"):
            await shapes_and_others(ring, seed, digest)
        if scenario == "race":
            await overwrite_after_return(ring, seed, digest)
        if scenario == "disagree":
            await disagree(ring, seed, digest)
        if scenario == "quick":
            xs = inputs(seed, 1, ring.world_size, "float32", "mean", 1000)
            mine = await ring.all_reduce(copy(xs[ring.rank]), "mean")
            check(mine, xs, "mean", "float32", "quick")
            digest.add(mine)
        large, small = (ring.plan("all_reduce", n).algorithm for n in (1 << 20, 8))
        print(f"rank {ring.rank} of {ring.world_size} all_reduce 1 MiB: {large}, 8 B: {small}")
        print(f"rank {ring.rank} of {ring.world_size} ok {digest.hex()}")


def blocking(seed: int) -> None:
    """The blocking facade: init() from the environment, the same calls without await."""
    with ringlib.init() as ring:
        xs = inputs(seed, 1, ring.world_size, "float32", "mean", 4099)
        grads = torch.as_tensor(xs[ring.rank]).float().clone()
        assert ring.all_reduce(grads, op="mean") is grads
        check(grads, xs, "mean", "float32", "blocking all_reduce mean")
        gathered = ring.all_gather(torch.tensor([ring.rank]))
        assert gathered.tolist() == [[r] for r in range(ring.world_size)]
        ring.barrier()
        # Every collective started at once, finished in the background, in issue order.
        n, right, left = ring.world_size, (ring.rank + 1) % ring.world_size, \
            (ring.rank - 1) % ring.world_size
        received = torch.empty(3)
        futures = [ring.all_gather_async(torch.tensor([ring.rank * 10])),
                   ring.reduce_scatter_async(torch.arange(2.0 * n)),
                   ring.barrier_async(), ring.send_async(torch.full((3,), ring.rank * 1.0), right),
                   ring.recv_async(received, left)]
        results = [f.result(timeout=60) for f in futures]
        assert results[0].tolist() == [[r * 10] for r in range(n)], results[0]
        assert results[1].tolist() == [2.0 * n * ring.rank, 2.0 * n * ring.rank + n], results[1]
        assert received.tolist() == [left * 1.0] * 3, received
        digest = Digest()
        digest.add(grads)
        print(f"rank {ring.rank} of {ring.world_size} ok {digest.hex()}")


if __name__ == "__main__":
    name, seed_arg = sys.argv[1], int(sys.argv[2])
    if name == "blocking":
        blocking(seed_arg)
    else:
        asyncio.run(main(name, seed_arg))
