"""One rank's part of the soak (`ringlib bench soak`): a long run of random
collectives, every result checked against a float64 (for integers, int64) reference.

Every rank draws collective i from (seed, i) alone, and every rank's input to it from
(seed, i, rank), so each rank knows what all the others pass and computes the reference
of every result on its own. Integer inputs are small enough that no sum or product
overflows, so integers must match exactly; so must min, max, all_gather and broadcast.
Float sums, means and products may differ from the float64 reference by the roundings of
world_size steps. After the warm-up, the rank's peak resident size is measured from
there to the end (bench/memory.py). Rank 0 prints one JSON line per PROGRESS_EVERY
collectives and a last one with every rank's figures, gathered over the ring itself.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass

import numpy as np

import ringlib

from . import memory

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
REDUCING = ("all_reduce", "reduce_scatter")
INTS = ("int8", "uint8", "int32", "int64")
# Machine epsilon (twice the unit roundoff) and the smallest subnormal of each float type:
# a float result may be off by world_size roundings of a step's sum or product.
EPS = {"float32": 2.0**-23, "float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}
SUBNORMAL = {"float32": 2.0**-149, "float64": 2.0**-1074, "float16": 2.0**-24,
             "bfloat16": 2.0**-133}
ZERO_SHARE = 0.02          # collectives of no elements at all
BLOCK = 16384              # elements whose reference is computed at a time
PROGRESS_EVERY = 1000
CONNECT_TIMEOUT = 60.0
COLLECTIVE_TIMEOUT = 60.0  # a lost rank fails the run in a minute, not the ring's 5


def soak_dtypes() -> tuple[str, ...]:
    """ringlib's dtypes as numpy arrays: bfloat16 only where ml_dtypes provides it."""
    floats = ("float32", "float64", "float16")
    if importlib.util.find_spec("ml_dtypes") is not None:
        floats += ("bfloat16",)
    return floats + INTS


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype called `name`, bfloat16 included."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def ops_for(kind: str, dtype: str) -> tuple[str, ...]:
    """The ops collective `kind` takes on `dtype` ("" alone where it does not reduce)."""
    if kind not in REDUCING:
        return ("",)
    return ("sum", "min", "max", "prod") if dtype in INTS else ("sum", "mean", "min", "max", "prod")


@functools.cache
def combinations(dtypes: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Every (kind, dtype, op) a run draws from; each run starts with each of them once."""
    return [(kind, dtype, op) for kind in KINDS for dtype in dtypes for op in ops_for(kind, dtype)]


@dataclass(frozen=True)
class Collective:
    """One drawn collective: `op` only for the reducing kinds, `root` for broadcast."""

    index: int
    kind: str
    dtype: str
    count: int
    op: str = ""
    root: int = 0

    def __str__(self) -> str:
        what = f"root {self.root}" if self.kind == "broadcast" else self.op
        words = [f"collective #{self.index}:", self.kind, what, self.dtype, f"n={self.count}"]
        return " ".join(w for w in words if w)


def draw(seed: int, index: int, world: int, dtypes: tuple[str, ...],
         max_bytes: int) -> Collective:
    """Collective `index` of the run of `seed`, the same on every rank: the first ones go
    through every combination once, the others pick a kind, a dtype and an op at random."""
    rng = np.random.default_rng([seed, index])
    grid = combinations(dtypes)
    if index < len(grid):
        kind, dtype, op = grid[index]
    else:
        kind, dtype = str(rng.choice(KINDS)), str(rng.choice(dtypes))
        op = str(rng.choice(ops_for(kind, dtype)))
    count = _draw_count(rng, numpy_dtype(dtype).itemsize, max_bytes)
    return Collective(index, kind, dtype, count, op, int(rng.integers(world)))


def group_size(seed: int, index: int, in_flight: int) -> int:
    """How many collectives from `index` on are in flight together: 1 to in_flight."""
    if in_flight == 1:
        return 1
    # The spawn key sets this stream apart from the draws' [seed, index] and the inputs'
    # [seed, index, rank].
    rng = np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(1,)))
    return int(rng.integers(1, in_flight, endpoint=True))


def _draw_count(rng: np.random.Generator, itemsize: int, max_bytes: int) -> int:
    """0 elements now and then, else log-uniform from 1 to max_bytes' worth: most
    collectives are small (latency-bound), and every size class gets its share."""
    if rng.random() < ZERO_SHARE:
        return 0
    most = max(1, max_bytes // itemsize)
    return min(most, int(np.exp(rng.uniform(0.0, np.log(most + 1)))))


def inputs(seed: int, c: Collective, world: int) -> list[np.ndarray]:
    """Every rank's input to collective c."""
    return [_values(np.random.default_rng([seed, c.index, rank]), c, world)
            for rank in range(world)]


def _values(rng: np.random.Generator, c: Collective, world: int) -> np.ndarray:
    """Drawn in the dtype itself (or float32 for the half types), to keep the soak's own
    memory small beside ringlib's."""
    dtype = numpy_dtype(c.dtype)
    if c.dtype in INTS:
        top = _int_root(np.iinfo(dtype).max, world) if c.op == "prod" \
            else np.iinfo(dtype).max // world
        return rng.integers(0 if c.dtype == "uint8" else -top, top, c.count, dtype=dtype,
                            endpoint=True)
    drawn = np.float64 if c.dtype == "float64" else np.float32
    if c.op == "prod":  # factors of 0.5 to 1.5 either way: no order of products overflows
        values = rng.random(c.count, dtype=drawn) + drawn(0.5)
        values[rng.random(c.count, dtype=drawn) < 0.5] *= -1
    else:
        values = rng.standard_normal(c.count, dtype=drawn) * drawn(10.0 ** rng.integers(-2, 3))
    return values.astype(dtype, copy=False)


def _int_root(top: int, world: int) -> int:
    """The largest k with k**world <= top: products of world such factors never overflow."""
    k = int(round(top ** (1.0 / world)))
    while k**world > top:
        k -= 1
    return k


def mismatch(c: Collective, got: np.ndarray, xs: list[np.ndarray], rank: int) -> str | None:
    """Why rank's result of c is wrong (the first bad element), or None if it is right.
    References are computed a block at a time, so that checking takes little memory."""
    lo, hi = _part(c, len(xs), rank)
    shape = (len(xs), c.count) if c.kind == "all_gather" else (hi - lo,)
    if got.shape != shape:
        return f"{c} on rank {rank}: shape {got.shape}, expected {shape}"
    if c.kind == "broadcast":
        return _first_difference(c, rank, got, xs[c.root])
    if c.kind == "all_gather":
        for r, x in enumerate(xs):
            if (why := _first_difference(c, rank, got[r], x, r * c.count)) is not None:
                return why
        return None
    return _first_out_of_tolerance(c, rank, got, xs, lo, hi)


def _first_out_of_tolerance(c: Collective, rank: int, got: np.ndarray, xs: list[np.ndarray],
                            lo: int, hi: int) -> str | None:
    """Where got, elements lo..hi-1 of the reduction of xs, first leaves its tolerance."""
    for start in range(lo, hi, BLOCK):
        part = slice(start, min(start + BLOCK, hi))
        expected, tol = _reduced(c, [x[part] for x in xs])
        value = got[part.start - lo:part.stop - lo].astype(expected.dtype)
        wrong = value != expected if tol is None else np.abs(value - expected) > tol
        if (bad := np.flatnonzero(wrong)).size:
            return _describe(c, rank, part.start - lo + int(bad[0]), value[bad[0]],
                             expected[bad[0]])
    return None


def _part(c: Collective, world: int, rank: int) -> tuple[int, int]:
    """The [start, stop) elements of the whole reduction that rank's result holds."""
    if c.kind == "reduce_scatter":
        bounds = ringlib.chunk_bounds(c.count, world)
        return bounds[rank], bounds[rank + 1]
    return 0, c.count


def _first_difference(c: Collective, rank: int, got: np.ndarray, expected: np.ndarray,
                      offset: int = 0) -> str | None:
    """Where got's bits first differ from expected's (equal shapes), or None."""
    as_uint = f"u{expected.dtype.itemsize}"
    for start in range(0, expected.size, BLOCK):
        part = slice(start, start + BLOCK)
        bad = np.flatnonzero(got[part].view(as_uint) != expected[part].view(as_uint))
        if bad.size:
            i = start + int(bad[0])
            return _describe(c, rank, offset + i, got[i], expected[i])
    return None


def _reduced(c: Collective, xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """The reduction of xs in float64 (int64 for integers), and each element's tolerance
    (None: it must be exact)."""
    wide = np.stack([x.astype(np.int64 if c.dtype in INTS else np.float64) for x in xs])
    expected = {"sum": wide.sum, "prod": wide.prod, "min": wide.min, "max": wide.max,
                "mean": wide.mean}[c.op](axis=0)
    if c.dtype in INTS or c.op in ("min", "max"):
        return expected, None
    world = len(xs)
    scale = np.abs(expected) if c.op == "prod" else np.abs(wide).sum(axis=0)
    if c.op == "mean":
        scale /= world
    return expected, world * (EPS[c.dtype] * scale + SUBNORMAL[c.dtype])


def _describe(c: Collective, rank: int, index: int, got: object, expected: object) -> str:
    """A wrong element, named by the collective, the rank and its index in the result."""
    return f"{c} on rank {rank}: element {index} of the result is {got}, expected {expected}"


async def run_one(ring: ringlib.Ring, c: Collective, mine: np.ndarray) -> np.ndarray:
    """Collective c on this rank's input (overwritten where the collective works in place)."""
    if c.kind == "all_reduce":
        return await ring.all_reduce(mine, c.op)
    if c.kind == "reduce_scatter":
        return await ring.reduce_scatter(mine, c.op)
    if c.kind == "all_gather":
        return await ring.all_gather(mine)
    return await ring.broadcast(mine, root=c.root)


class Soak:
    """Draws, runs and checks collectives on one rank, keeping the figures of the run."""

    def __init__(self, ring: ringlib.Ring, args: argparse.Namespace) -> None:
        self.ring, self.args = ring, args
        self.dtypes = soak_dtypes()
        self.checked = 0
        self.in_ring_s = 0.0      # time spent awaiting ringlib's collectives (wall clock)
        self.started = time.perf_counter()
        self.digest = hashlib.blake2b(digest_size=8)  # of the results all ranks share

    async def run(self, start: int, stop: int) -> None:
        """Collectives start..stop-1, in groups of up to --in-flight at once; raise
        AssertionError at the first wrong result, naming the seed, the collective and the
        element."""
        index = start
        while index < stop:
            group = range(index, min(stop, index + group_size(self.args.seed, index,
                                                              self.args.in_flight)))
            await self.run_group([draw(self.args.seed, i, self.ring.world_size, self.dtypes,
                                       self.args.max_bytes) for i in group])
            if self.ring.rank == 0 and group.stop // PROGRESS_EVERY > index // PROGRESS_EVERY:
                self.report("progress", done=group.stop)
            index = group.stop

    async def run_group(self, group: list[Collective]) -> None:
        """Start the collectives of `group` in order, all in flight at once, then check
        each result."""
        xss = [inputs(self.args.seed, c, self.ring.world_size) for c in group]
        mine = [xs[self.ring.rank].copy() for xs in xss]
        began = time.perf_counter()
        results = await asyncio.gather(*(run_one(self.ring, c, x) for c, x in zip(group, mine)))
        self.in_ring_s += time.perf_counter() - began
        for c, xs, x, got in zip(group, xss, mine, results):
            self.check(c, xs, x, got)

    def check(self, c: Collective, xs: list[np.ndarray], mine: np.ndarray,
              got: np.ndarray) -> None:
        """Check this rank's result of c (and, for reduce_scatter, its untouched input)."""
        if c.kind == "reduce_scatter" and not np.array_equal(mine, xs[self.ring.rank]):
            raise AssertionError(f"seed {self.args.seed}, {c}: reduce_scatter changed its input")
        if (why := mismatch(c, got, xs, self.ring.rank)) is not None:
            raise AssertionError(f"seed {self.args.seed}, {why}")
        self.checked += 1
        if c.kind != "reduce_scatter":  # every rank holds the same result, bit for bit
            self.digest.update(got.view(np.uint8))

    def report(self, kind: str, **fields: object) -> None:
        """Print one JSON line for the parent, with the time so far."""
        line = {"kind": kind, "seconds": time.perf_counter() - self.started,
                "in_ring_seconds": self.in_ring_s, **fields}
        print(json.dumps(line), flush=True)

    async def finish(self, growth: int) -> None:
        """Gather every rank's figures over the ring; rank 0 prints them."""
        figures = np.array([self.checked, growth], np.int64).tobytes() + self.digest.digest()
        rows = await self.ring.all_gather(np.frombuffer(figures, np.uint8))
        if self.ring.rank == 0:
            ranks = [{"checked": int(row[:16].view(np.int64)[0]),
                      "growth_bytes": int(row[:16].view(np.int64)[1]),
                      "digest": row[16:].tobytes().hex()} for row in rows]
            self.report("result", collectives=self.args.collectives, dtypes=self.dtypes,
                        ranks=ranks)


async def run_worker(args: argparse.Namespace) -> None:
    """Join the ring from RINGLIB_* variables, warm up, then soak under the memory probe."""
    if not memory.supported():
        raise SystemExit("cannot reset and read the peak resident size (/proc/self/clear_refs)")
    async with ringlib.connect(timeout=CONNECT_TIMEOUT,
                               collective_timeout=COLLECTIVE_TIMEOUT) as ring:
        soak = Soak(ring, args)
        warmup = min(args.warmup, args.collectives)
        await soak.run(0, warmup)
        growth = await memory.peak_growth(lambda: soak.run(warmup, args.collectives), times=1)
        await soak.finish(growth)
