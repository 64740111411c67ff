"""One rank of the chaos benchmark (`ringlib bench chaos`): random collectives, every
result checked, until the ring loses a rank; with --reform, then a re-formed ring and a
few more collectives, whose digest the parent compares across the survivors.

Collective i is drawn from (seed, i) as the soak draws it (bench/soak_rank.py), with a
barrier now and then, and every rank's input to it from (seed, i, rank), so that each
rank checks its results against the float64 (int64) reference on its own. The stream has
no end: the parent's fault ends it, and a watchdog (--limit) ends a rank that outlives
any trial. Each line on stdout is one JSON object with the time it was written, "t", on
CLOCK_MONOTONIC (time.monotonic), which every process on a host shares, so that the
parent subtracts the time of its fault from it:

    {"kind": "joining"}                                 the runtime loaded, connect() next
    {"kind": "ready", "rank", "world_size"}             connect() returned
    {"kind": "ok", "i", "phase"}                        collective i was right
    {"kind": "wrong", "i", "phase", "why"}              ... and what was wrong with it
    {"kind": "failed", "phase", "i", "type", "message", "lost_rank", "ring_error"}
    {"kind": "reformed", "rank", "world_size", "generation", "checked", "digest"}
    {"kind": "closed"}                                  the ring is closed; the rank exits

phase: "connect", "running" (the first ring), "reform" (in reform()) or "reformed" (the
ring after it). A failure is the first exception a phase raised; the rank then leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import threading
import time
from typing import Iterable

import numpy as np

import ringlib

from .soak_rank import Collective, combinations, draw, inputs, mismatch, run_one

DTYPES = ("float32", "float64", "int32")
MAX_BYTES = 256 << 10       # as the soak: doubling, flat broadcast and the ring algorithms
BARRIER_SHARE = 0.05       # collectives that are a barrier
REFORMED_DRAWN = 4         # random collectives on the re-formed ring, before the last two
WATCHDOG_EXIT = 4


def pick(seed: int, index: int, world: int) -> Collective:
    """Collective `index` of the stream of `seed`, alike on every rank: now and then a
    barrier, else the soak's draw over DTYPES (every combination once first)."""
    # The spawn key keeps this draw apart from the soak's [seed, index] and [seed, index, rank].
    rng = np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(2,)))
    if rng.random() < BARRIER_SHARE:
        return Collective(index, "barrier", "", 0)
    return draw(seed, index, world, DTYPES, MAX_BYTES)


def reformed_stream(seed: int, world: int) -> list[Collective]:
    """What the re-formed ring runs: random collectives past the soak's grid of every
    combination, then a broadcast from the last rank and a float32 sum, whose results
    every survivor must hold bit for bit."""
    first = len(combinations(DTYPES))
    drawn = [pick(seed, i, world) for i in range(first, first + REFORMED_DRAWN)]
    end = first + REFORMED_DRAWN
    return drawn + [Collective(end, "broadcast", "float64", 1000, root=world - 1),
                    Collective(end + 1, "all_reduce", "float32", 1001, "sum")]


def stream_seed(seed: int, generation: int) -> int:
    """The seed of the collectives of ring `generation`: each ring draws a stream of its own."""
    return int(np.random.SeedSequence([seed, generation]).generate_state(1)[0])


def report(kind: str, **fields: object) -> None:
    """One JSON line for the parent, stamped with the monotonic time."""
    print(json.dumps({"kind": kind, "t": time.monotonic(), **fields}), flush=True)


def report_failure(phase: str, exc: BaseException, index: int | None = None) -> None:
    """The first exception of `phase`, at once: its type, message and the rank it names."""
    report("failed", phase=phase, i=index, type=type(exc).__name__, message=str(exc),
           lost_rank=getattr(exc, "rank", None) if isinstance(exc, ringlib.PeerLost) else None,
           ring_error=isinstance(exc, ringlib.RingError))


async def checked(ring: ringlib.Ring, seed: int,
                  c: Collective) -> tuple[np.ndarray | None, str | None]:
    """Run c on this rank's input: its result (None for a barrier) and why it is wrong
    (None if it is right)."""
    if c.kind == "barrier":
        await ring.barrier()
        return None, None
    xs = inputs(seed, c, ring.world_size)
    got = await run_one(ring, c, xs[ring.rank].copy())
    return got, mismatch(c, got, xs, ring.rank)


async def run_stream(ring: ringlib.Ring, seed: int, stream: Iterable[Collective],
                     phase: str, digest: hashlib.blake2b | None = None) -> BaseException | None:
    """Run and check each collective of `stream`, reporting each; return the exception
    that ended it (reported too), or None if it ran to its end. Results that every rank
    holds alike go into `digest`."""
    for c in stream:
        try:
            got, why = await checked(ring, seed, c)
        except Exception as exc:  # what the fault made of this collective, whatever it is
            report_failure(phase, exc, c.index)
            return exc
        if why is not None:
            report("wrong", i=c.index, phase=phase, why=why)
        else:
            report("ok", i=c.index, phase=phase)
        if digest is not None and got is not None and c.kind != "reduce_scatter":
            digest.update(got.view(np.uint8))
    return None


async def reform_and_check(ring: ringlib.Ring, args: argparse.Namespace) -> None:
    """Re-form the ring of the survivors, run the re-formed stream, and report this rank's
    place in the new ring with the digest of the results all its members share."""
    try:
        await ring.reform(timeout=args.connect_timeout)
    except Exception as exc:
        report_failure("reform", exc)
        return
    seed, digest = stream_seed(args.seed, ring.generation), hashlib.blake2b(digest_size=8)
    stream = reformed_stream(seed, ring.world_size)
    if await run_stream(ring, seed, stream, "reformed", digest) is None:
        report("reformed", rank=ring.rank, world_size=ring.world_size,
               generation=ring.generation, checked=len(stream), digest=digest.hexdigest())


async def run_rank(args: argparse.Namespace) -> None:
    """Join the ring from the RINGLIB_* variables, run the endless stream until it fails,
    then re-form if asked and the failure was a lost peer."""
    connect = ringlib.connect  # loads the runtime (PEP 562): its connect timeout starts next
    report("joining")
    try:
        ring = await connect(timeout=args.connect_timeout,
                             peer_timeout=args.peer_timeout, heartbeat_s=args.heartbeat,
                             collective_timeout=args.collective_timeout)
    except Exception as exc:
        report_failure("connect", exc)
        return
    async with ring:
        report("ready", rank=ring.rank, world_size=ring.world_size)
        seed = stream_seed(args.seed, 0)
        stream = (pick(seed, i, ring.world_size) for i in itertools.count())
        failure = await run_stream(ring, seed, stream, "running")
        if args.reform and isinstance(failure, ringlib.PeerLost):
            await reform_and_check(ring, args)
    report("closed")


def start_watchdog(limit: float) -> None:
    """Exit the process after `limit` seconds, whatever it is doing: a rank never outlives
    its trial, even where ringlib would wait for ever."""
    def expire() -> None:
        report("watchdog", limit=limit)
        os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(limit, expire)
    timer.daemon = True
    timer.start()


def parser() -> argparse.ArgumentParser:
    """The rank's arguments, which the parent (bench/chaos_trial.py) sets for each trial."""
    p = argparse.ArgumentParser(prog="python -m ringlib.bench.chaos_rank",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="the trial's seed")
    p.add_argument("--connect-timeout", type=float, required=True)
    p.add_argument("--peer-timeout", type=float, required=True)
    p.add_argument("--heartbeat", type=float, required=True)
    p.add_argument("--collective-timeout", type=float, required=True)
    p.add_argument("--limit", type=float, required=True, help="the watchdog's seconds")
    p.add_argument("--reform", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    start_watchdog(args.limit)
    asyncio.run(run_rank(args))


if __name__ == "__main__":
    main()
