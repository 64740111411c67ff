"""One rank's part of a collective sweep (`ringlib bench allreduce|reduce_scatter|...`):
every system times the same collective over the same sizes, taking turns size by size.

For each size every system is checked once against the float64 reference, then its peak
memory growth over two calls is taken (bench/memory.py); then all systems warm up, rank 0
sizes the timed loop from the warm-up and tells the others, the ranks meet at a barrier,
and the systems take turns: with one system a sample is one call, with several each turn
is one untimed call (it waits out the previous system's tail on the other ranks) and
TURN_CALLS calls timed together. Rank 0 prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import time
from typing import Any, Callable

import numpy as np

import ringlib
from ringlib.dtypes import BY_NAME

from . import memory
from .systems import (BLOCKING_PEERS_VARIABLE, CURVE_KEY_VARIABLE, CURVE_PEERS_VARIABLE,
                      BlockingSystem, Case, GlooSystem, MpiSystem, RinglibSystem, System,
                      Unavailable, check)
from .timing import format_size

ALWAYS = 1 << 62           # a small_bytes no buffer reaches: recursive doubling for all
BUDGET_S = 2.5             # timed seconds per size (all systems together) when adaptive
MIN_ITERS, MAX_ITERS = 5, 2000
TURN_CALLS = 4             # calls timed together per system when systems take turns
CONNECT_TIMEOUT = 30.0
COLLECTIVE_TIMEOUT = 60.0  # a lost rank fails the run in a minute, not the ring's 5


# ringlib settings that several values of can be timed side by side, one column each:
# option -> (Ring attribute, column label)
SETTINGS = {"segment": ("segment_bytes", lambda v: f"seg {format_size(v)}"),
            "spin": ("spin_us", lambda v: f"spin {v}us"),
            "direct": ("direct_bytes", lambda v: f"direct {format_size(v) if v else 'off'}")}


def _fixed(args: argparse.Namespace) -> dict[str, int]:
    """The settings given one value, which apply to every ringlib column."""
    return {attr: getattr(args, option)[0] for option, (attr, _) in SETTINGS.items()
            if getattr(args, option) and len(getattr(args, option)) == 1}


def ringlib_systems(ring: ringlib.Ring, args: argparse.Namespace) -> list[RinglibSystem]:
    """ringlib's asyncio columns: doubling vs ring (--crossover), several values of one
    setting (one column each), or one column; none without async in --api."""
    fixed = _fixed(args)
    if "async" not in args.api:
        return []
    if args.crossover:
        return [RinglibSystem(ring, "doubling", **{**fixed, "small_bytes": ALWAYS}),
                RinglibSystem(ring, "ring", **{**fixed, "small_bytes": 0})]
    for option, (attr, label) in SETTINGS.items():
        values = getattr(args, option) or []
        if len(values) > 1:
            return [RinglibSystem(ring, label(v), **{**fixed, attr: v}) for v in values]
    return [RinglibSystem(ring, **fixed)]


def compared_systems(ring: ringlib.Ring, names: list[str],
                     skipped: dict[str, str]) -> list[System]:
    """The systems named by --compare that can run here; why the others cannot goes into
    `skipped`."""
    made: list[System] = []
    for name in names:
        if name == "curve":  # a ring of its own: see secure_ring()
            continue
        try:
            made.append(GlooSystem(ring.rank, ring.world_size) if name == "gloo"
                        else MpiSystem())
        except Unavailable as exc:
            skipped[name] = str(exc)
    return made


async def _turn(systems: list[System], samples: list[list[float]]) -> None:
    """One sample per system, seconds per call, appended to that system's samples."""
    calls = TURN_CALLS if len(systems) > 1 else 1
    for system, times in zip(systems, samples):
        if calls > 1:
            await system.call()
        start = time.perf_counter()
        for _ in range(calls):
            await system.call()
        times.append((time.perf_counter() - start) / calls)


async def _agree_on_iterations(ring: ringlib.Ring, warmup: list[list[float]],
                               iters: int | None) -> int:
    """Rank 0 sizes the timed loop from its slowest warm-up turn and tells the others."""
    if iters:
        return iters
    calls = TURN_CALLS + 1 if len(warmup) > 1 else 1  # per sample, the untimed one too
    per_turn = calls * float(np.max(np.sum(warmup, axis=0))) if warmup[0] else 1e-3
    box = np.array([max(MIN_ITERS, min(MAX_ITERS, int(BUDGET_S / max(per_turn, 1e-7))))])
    await ring.broadcast(box, root=0)
    return int(box[0])


async def checked(systems: list[System], case: Case, skipped: dict[str, str]) -> list[System]:
    """Prepare every system and check one call; return those that ran it. A compared system
    that cannot run this case (a dtype or op it lacks) is left out, with its reason in
    `skipped`; every rank drops it alike, since all pass the same case."""
    kept = []
    for system in systems:
        try:
            system.prepare(case)
            await system.call()
        except (Unavailable, RuntimeError, TypeError, ValueError) as exc:
            if isinstance(system, RinglibSystem):
                raise
            skipped[system.label] = f"{type(exc).__name__}: {exc}"
            continue
        check(system.label, case, system.out)
        kept.append(system)
    return kept


async def measure(ring: ringlib.Ring, systems: list[System], case: Case,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Measure the memory of, warm up and time every (checked) system on `case`."""
    peaks = []
    for system in systems:
        system.zero()
        peaks.append(await memory.peak_growth(system.call) if args.memory else None)
    warmup: list[list[float]] = [[] for _ in systems]
    for _ in range(args.warmup):
        await _turn(systems, warmup)
    iters = await _agree_on_iterations(ring, warmup, args.iters)
    samples: list[list[float]] = [[] for _ in systems]
    await ring.barrier()
    gc.collect()
    gc.disable()
    try:
        for _ in range(iters):
            await _turn(systems, samples)
    finally:
        gc.enable()
    first = systems[0]
    if case.collective == "latency":  # one-way: half of each round trip
        samples = [[t / 2 for t in times] for times in samples]
    return {"kind": "row", "bytes": case.count * BY_NAME[case.dtype].itemsize,
            "count": case.count, "iters": iters,
            "algo": first.algorithm(case) if isinstance(first, RinglibSystem) else "",
            "results": [{"label": s.label, "p50": float(np.median(t)),
                         "p99": float(np.percentile(t, 99)), "peak_bytes": peak}
                        for s, t, peak in zip(systems, samples, peaks)]}


async def secure_ring(ring: ringlib.Ring) -> ringlib.Ring:
    """A second ring of the same ranks, with CurveZMQ on every link (--compare curve) and
    the first's settings: ranks on one host pass payloads through shared memory, which
    needs no encryption, and RINGLIB_SHM_BYTES=0 shows what the encryption costs."""
    return await ringlib.connect(ring.rank, ring.world_size,
                                 os.environ[CURVE_PEERS_VARIABLE].split(","),
                                 timeout=CONNECT_TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT,
                                 curve_key=os.environ[CURVE_KEY_VARIABLE],
                                 shm_bytes=ring.settings.shm_bytes)


async def blocking_system(ring: ringlib.Ring, args: argparse.Namespace) -> BlockingSystem:
    """The blocking facade's column (--api blocking): ringlib.init() on a second ring of
    the same ranks and settings, made in a worker thread so that this loop keeps beating."""
    made = functools.partial(
        ringlib.init, ring.rank, ring.world_size, os.environ[BLOCKING_PEERS_VARIABLE].split(","),
        timeout=CONNECT_TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT,
        shm_bytes=ring.settings.shm_bytes, compiled_bytes=ring.settings.compiled_bytes)
    blocking = await asyncio.get_running_loop().run_in_executor(None, made)
    return BlockingSystem(blocking, **_fixed(args))


async def run_worker(args: argparse.Namespace) -> None:
    """This rank's part: join the ring from the environment; rank 0 prints JSON lines."""
    async with ringlib.connect(timeout=CONNECT_TIMEOUT,
                               collective_timeout=COLLECTIVE_TIMEOUT) as ring:
        say = _printer(ring.rank)
        skipped: dict[str, str] = {}
        compared: list[System] = []
        if "blocking" in args.api:
            compared.append(await blocking_system(ring, args))
        compared += compared_systems(ring, args.compare, skipped)
        secure = await secure_ring(ring) if "curve" in args.compare else None
        if secure is not None:
            compared.append(RinglibSystem(secure, "curve"))
        systems: list[System] = [*ringlib_systems(ring, args), *compared]
        args.memory = args.memory and memory.supported()
        say({"kind": "setup", "labels": [s.label for s in systems],
             "small_bytes": ring.small_bytes,
             "segment_bytes": ring.segment_bytes, "spin_us": ring.spin_us,
             "direct_bytes": ring.direct_bytes, "skipped": dict(skipped),
             "links": ring.endpoint.links() if ring.endpoint is not None else {},
             "versions": {s.label: s.version for s in compared
                          if not isinstance(s, BlockingSystem)}})
        try:
            for nbytes in args.sizes:
                case = Case(args.collective, nbytes // BY_NAME[args.dtype].itemsize,
                            args.dtype, args.op, ring.rank, ring.world_size)
                systems = await checked(systems, case, skipped)
                say({**await measure(ring, systems, case, args), "skipped": dict(skipped)})
                for system in systems:
                    system.release()
        finally:  # dropped ones too: each joined its group once, and leaves it once
            for system in compared:
                system.close()
            if secure is not None:
                await secure.close()


def _printer(rank: int) -> Callable[[dict[str, Any]], None]:
    def say(message: dict[str, Any]) -> None:
        if rank == 0:
            print(json.dumps(message), flush=True)
    return say
