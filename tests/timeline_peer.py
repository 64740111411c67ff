"""A rank for test_timeline.py, started by `ringlib launch`: MODE SEED OUT.

all       every collective, on both sides of the small/large line, checked against float64
runtime   the same, with the timeline started and stopped by the ring's methods
die       rank 1 raises after its collectives; rank 0 waits until the launcher SIGTERMs it
late      rank 2 starts every all-reduce LATE_S after the others
timeout   rank 0 times out waiting for rank 1, which raises SIGUSR1 on itself meanwhile
mismatch  the ranks all-reduce different shapes
profile   a torch.profiler trace of a step with a ringlib all-reduce (OUT: its path)
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import ringlib

LATE_S = 0.3


def collectives(ring, rng) -> None:
    """Every kind of collective, small and large, each checked against float64."""
    n, rank = ring.world_size, ring.rank
    for size in (3, 70_000, 600_000):
        inputs = [np.random.default_rng([rng, r, size]).standard_normal(size) for r in range(n)]
        x = inputs[rank].astype(np.float32)
        ring.all_reduce(x)
        np.testing.assert_allclose(x, np.sum(inputs, axis=0), rtol=1e-4, atol=1e-4)
    b = np.full(1000, rank, np.float32)
    ring.broadcast(b, root=n - 1)
    assert (b == n - 1).all()
    g = ring.all_gather(np.full(5, rank, np.int64))
    assert (g == np.arange(n)[:, None]).all()
    part = ring.reduce_scatter(np.ones(10 * n, np.float64))
    assert (part == n).all()
    ring.barrier()


def main(mode: str, seed: int, out: str) -> None:
    ring = ringlib.init()
    rank = ring.rank
    if mode == "all":
        collectives(ring, seed)
    elif mode == "runtime":
        ring.barrier()  # before the timeline: not in it
        ring.start_timeline(out)
        collectives(ring, seed)
        ring.stop_timeline()
        ring.barrier()  # after it
    elif mode == "die":
        collectives(ring, seed)
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(120)  # until the launcher stops this rank with SIGTERM
    elif mode == "late":
        for _ in range(5):
            if rank == 2:
                time.sleep(LATE_S)
            ring.all_reduce(np.ones(100, np.float32))
    elif mode == "timeout":
        if rank == 0:
            try:
                ring.all_reduce(np.ones(10, np.float32), timeout=1.0)
            except ringlib.CollectiveTimeout as exc:
                print(f"rank 0 timed out: {exc}", flush=True)
        else:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(2.0)
        os._exit(0)  # the ring cannot close cleanly with a collective abandoned
    elif mode == "mismatch":
        try:
            ring.all_reduce(np.ones(10 + rank, np.float32))
        except ringlib.MismatchError as exc:
            print(f"rank {rank} mismatched: {exc}", flush=True)
    elif mode == "profile":
        import json

        import torch
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = torch.ones(1000) * 2
            ring.all_reduce(y)
        if rank == 0:
            prof.export_chrome_trace(out)
            events = json.load(open(out))["traceEvents"]
            print("threads", sorted({e.get("tid") for e in events if e.get("name") in
                                     ("ringlib:all_reduce", "aten::mul")}), flush=True)
    ring.close()
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
