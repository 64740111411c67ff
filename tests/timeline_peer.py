"""A rank for test_timeline.py, started by `ringlib launch`: MODE SEED OUT.

all       every collective, on both sides of the small/large line, checked against float64
runtime   the same, with the timeline started and stopped by the ring's methods
die       rank 1 raises after its collectives; rank 0 waits until the launcher SIGTERMs it
interrupt the same, with rank 1 ended by Ctrl-C (SIGINT) instead
late      rank 2 starts every all-reduce LATE_S after the others
timeout   rank 0 times out waiting for rank 1, which raises SIGUSR1 on itself meanwhile
mismatch  the ranks all-reduce different shapes
profile   a torch.profiler trace of a step with a ringlib all-reduce (OUT: its path)
work      a training step through GradientAverager (small buckets), then a 2-stage pipeline,
          both checked against float64
lost      3 ranks; rank 2 SIGKILLs itself, the others get PeerLost and re-form as two
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


def work(ring, seed: int) -> None:
    """One averaged training step, then four micro-batches through two stages."""
    import torch

    import ringlib.torch as rt
    from ringlib.runtime.pipeline import Pipeline
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    reference = [torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]).double()
                 for _ in range(ring.world_size)]
    inputs = torch.randn(ring.world_size, 8, 64, generator=torch.Generator().manual_seed(seed))
    averager = rt.GradientAverager(model, ring, bucket_mb=0.02)  # 2 buckets
    model(inputs[ring.rank]).sum().backward()
    averager.synchronize()
    for copy, x in zip(reference, inputs):
        copy.load_state_dict(model.state_dict())
        copy(x.double()).sum().backward()
    for i, p in enumerate(model.parameters()):
        mean = sum(list(c.parameters())[i].grad for c in reference) / ring.world_size
        torch.testing.assert_close(p.grad.double(), mean, rtol=1e-5, atol=1e-5)
    stage = model[ring.rank]
    pipe = Pipeline(ring, stage, micro_batch=2)
    if ring.rank == 0:
        outputs = list(pipe.run([inputs[0]]))
        expected = model[1](model[0](inputs[0]))
        torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)
        pipe.close()
    else:
        pipe.serve()


def lost(ring) -> None:
    """Rank 2 dies; the survivors' next all-reduce fails with PeerLost, and they re-form."""
    if ring.rank == 2:
        ring.all_reduce(np.ones(4, np.float32))
        os.kill(os.getpid(), signal.SIGKILL)
    ring.all_reduce(np.ones(4, np.float32))
    time.sleep(0.5)
    try:
        ring.all_reduce(np.ones(4, np.float32), timeout=20)
    except ringlib.PeerLost as exc:
        print(f"rank {ring.rank} lost a peer: {exc}", flush=True)
    ring.reform(timeout=20)
    x = np.ones(4, np.float32)
    ring.all_reduce(x)
    assert (x == 2).all() and ring.world_size == 2


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
    elif mode in ("die", "interrupt"):
        collectives(ring, seed)
        if rank == 1 and mode == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
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
    elif mode == "work":
        work(ring, seed)
    elif mode == "lost":
        lost(ring)
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
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "-")
