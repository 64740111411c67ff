"""One rank of the network-fault benchmark (netem.py), run in its own network namespace.

    python -m ringlib.bench.netem_rank --seed S [--timeout 120]

It joins the ring from RINGLIB_RANK, RINGLIB_WORLD_SIZE and RINGLIB_PEERS, prints
{"ready": RANK}, then reads one command per stdin line, {"label": L, "bytes": N,
"iters": K}, and answers each with one JSON line: a checked warm-up call, then K timed
float32 sum all-reduces (K = 0: as many as fit BUDGET_S, from the slowest rank's warm-up),
each result checked against a float64 reference. Every rank regenerates every rank's
input from the seed, so each can check the whole result. It exits at the end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import zlib
from typing import Any

import numpy as np

import ringlib

from .ranks import exit_with_parent

BUDGET_S = 4.0             # timed seconds per command when it leaves K to the rank
MIN_ITERS, MAX_ITERS = 9, 50  # losses make long tails: enough calls for a steady median
MAX_HELD_BYTES = 256 << 20  # timed calls each get their own buffer, checked afterwards
EPS32 = float(np.finfo(np.float32).eps)


class WrongResult(AssertionError):
    """An all-reduce result differs from the float64 reference by more than rounding."""


def rank_input(seed: int, rank: int, count: int) -> np.ndarray:
    """Rank `rank`'s input of `count` float32 values in [-1, 1), the same on every rank."""
    return np.random.default_rng([seed, rank, count]).uniform(-1, 1, count).astype(np.float32)


def reference(seed: int, world: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sum of every rank's input, and how far a float32 sum may stray from it:
    world ulps of the sum of magnitudes (summation in any order, then one rounding)."""
    inputs = [rank_input(seed, r, count).astype(np.float64) for r in range(world)]
    return np.sum(inputs, axis=0), world * EPS32 * np.sum(np.abs(inputs), axis=0)


def check(result: np.ndarray, expected: np.ndarray, bound: np.ndarray, what: str) -> float:
    """The largest error of `result`; raise WrongResult naming the first element off."""
    error = np.abs(result.astype(np.float64) - expected)
    bad = np.flatnonzero(~(error <= bound))  # NaN counts as off
    if bad.size:
        i = int(bad[0])
        raise WrongResult(f"{what}: {bad.size} of {result.size} elements off; element {i} is "
                          f"{result[i]!r}, expected {expected[i]!r} within {bound[i]:.3g}")
    return float(error.max(initial=0.0))


def iterations(warmup_s: float, nbytes: int) -> int:
    """How many calls fit BUDGET_S, within MIN_ITERS..MAX_ITERS and MAX_HELD_BYTES."""
    most = max(MIN_ITERS, min(MAX_ITERS, MAX_HELD_BYTES // max(nbytes, 1)))
    return max(MIN_ITERS, min(most, int(BUDGET_S / max(warmup_s, 1e-6))))


async def agreed_iterations(ring: ringlib.Ring, warmup_s: float, nbytes: int) -> int:
    """The same count on every rank, from the slowest rank's warm-up."""
    slowest = await ring.all_reduce(np.array([warmup_s]), op="max")
    return iterations(float(slowest[0]), nbytes)


async def run_command(ring: ringlib.Ring, command: dict[str, Any], seed: int,
                      timeout: float) -> dict[str, Any]:
    """Warm up, time and check one size; this rank's answer."""
    label, count = command["label"], command["bytes"] // 4
    what = f"rank {ring.rank}, {label}, {command['bytes']} bytes"
    own = rank_input(seed, ring.rank, count)
    expected, bound = reference(seed, ring.world_size, count)
    warm = own.copy()
    start = time.perf_counter()
    await ring.all_reduce(warm, op="sum", timeout=timeout)
    warmup_s = time.perf_counter() - start
    worst = check(warm, expected, bound, f"{what}, warm-up call")
    iters = command["iters"] or await agreed_iterations(ring, warmup_s, command["bytes"])
    buffers = [own.copy() for _ in range(iters)]
    times = await timed_calls(ring, buffers, timeout)
    for i, result in enumerate(buffers):
        worst = max(worst, check(result, expected, bound, f"{what}, call {i}"))
    return {"rank": ring.rank, "label": label, "bytes": command["bytes"], "iters": iters,
            "times": times, "checked": iters + 1, "max_error": worst,
            "digest": zlib.crc32(buffers[-1].tobytes())}


async def timed_calls(ring: ringlib.Ring, buffers: list[np.ndarray], timeout: float) -> list[float]:
    """Seconds of each all-reduce, one buffer each, back to back after a barrier."""
    times = []
    await ring.barrier(timeout=timeout)
    gc.collect()
    gc.disable()
    try:
        for buffer in buffers:
            start = time.perf_counter()
            await ring.all_reduce(buffer, op="sum", timeout=timeout)
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


async def serve(seed: int, timeout: float) -> None:
    """Join the ring, then answer commands from stdin until it ends."""
    async with ringlib.connect(collective_timeout=timeout) as ring:
        print(json.dumps({"ready": ring.rank}), flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            answer = await run_command(ring, json.loads(line), seed, timeout)
            print(json.dumps(answer), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of each collective, seconds")
    args = parser.parse_args()
    exit_with_parent()
    asyncio.run(serve(args.seed, args.timeout))


if __name__ == "__main__":
    main()
