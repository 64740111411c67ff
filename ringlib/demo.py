"""`ringlib demo`, the job `make demo` runs: a real ring of 4 processes on this host.

The demo launches 4 peers through `ringlib launch`'s machinery. Each peer draws every
rank's gradients for a small convolutional network from one seed, so it can compute the
float64 reference on its own. The peers average their gradients with all_reduce, check
the other collectives, and time a short latency and bandwidth sweep. Rank 0 prints a
line per check and the sweep's table.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import numpy as np

# Parameter shapes of a small CNN for 28x28 digits: conv 1->16->32, then 1568->128->10.
MODEL_SHAPES = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (128, 1568), (128,), (10, 128), (10,)]
RANKS = 4
SWEEP = [(8, 200), (64 << 10, 50), (1 << 20, 20), (16 << 20, 5)]  # (bytes, timed calls)


def run_demo(seed: int | None = None) -> int:
    """Launch the 4 peers; return the exit status (0 when every check passed on every rank)."""
    from ringlib.runtime.hosts import Host, seat
    from ringlib.runtime.launcher import launch

    seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    command = [sys.executable, "-m", "ringlib.demo", "--peer", str(seed)]
    return launch(seat(RANKS, [Host("localhost", "127.0.0.1", RANKS)]), command, timeout=30)


def gradients(seed: int, rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, rank])
    return [rng.standard_normal(s).astype(np.float32) for s in MODEL_SHAPES]


def checks(ring, seed: int) -> list[tuple[str, bool, str]]:
    """(what, passed, detail) for each collective, against references every rank computes."""
    n, rank = ring.world_size, ring.rank
    everyone = [gradients(seed, r) for r in range(n)]
    expected = [np.mean([e[i].astype(np.float64) for e in everyone], 0) for i in range(len(MODEL_SHAPES))]
    mine = everyone[rank]
    for started in [ring.all_reduce_async(g, "mean") for g in mine]:  # all in flight at once
        started.result()
    error = max(float(np.max(np.abs(g - e))) for g, e in zip(mine, expected))
    digest = np.frombuffer(hashlib.sha256(b"".join(g.tobytes() for g in mine)).digest()[:8],
                           np.int64)
    digests = ring.all_gather(digest)
    params = sum(g.size for g in mine)
    result = [(f"all_reduce mean of {params:,} float32 gradients in {len(mine)} tensors",
               error <= 1e-6, f"max |error| vs float64 {error:.1e}"),
              ("every rank holds bit-identical averages", bool(np.all(digests == digests[0])),
               f"{n} digests compared")]
    shard = ring.reduce_scatter(np.full(1001, rank + 1.0))
    result.append(("reduce_scatter of 1001 elements", bool(np.all(shard == n * (n + 1) / 2)),
                   f"this rank's chunk: {shard.size} elements"))
    root_data = np.random.default_rng([seed, 99]).standard_normal(300_000)
    received = root_data.copy() if rank == n - 1 else np.zeros_like(root_data)
    ring.broadcast(received, root=n - 1)
    result.append((f"broadcast of {received.nbytes >> 10} KiB from rank {n - 1}",
                   bool(np.array_equal(received, root_data)), "pipelined along the ring"))
    return result


def train(ring, seed: int, steps: int = 20) -> tuple[str, bool, str]:
    """A few steps of data-parallel training (ring: a BlockingRing), each rank on its
    quarter of every batch; the result must match one process on the whole batch."""
    import torch

    import ringlib.torch as rt

    def mlp() -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))

    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(steps, 64, 32, generator=g), torch.randn(steps, 64, 4, generator=g)
    model, alone = mlp(), mlp()
    averager = rt.GradientAverager(model, ring, bucket_mb=0.01)
    optimizer = rt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), averager)
    single = torch.optim.SGD(alone.parameters(), lr=0.1)
    share = 64 // ring.world_size
    mine = slice(ring.rank * share, (ring.rank + 1) * share)
    for x, y in zip(xs, ys):
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(alone(x), y).backward()
        single.step()
        single.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = ring.all_gather(flat)
    expected = torch.cat([p.detach().reshape(-1) for p in alone.parameters()])
    error = float(((flat - expected).abs() / expected.abs().clamp_min(1e-3)).max())
    ok = error <= 1e-4 and bool((rows == rows[0]).all())
    return (f"data-parallel training, {steps} steps of an MLP, each rank on 1/{ring.world_size} "
            "of every batch", ok, f"vs one process on the whole batch: max rel diff {error:.1e}; "
            "ranks bit-identical" if ok else f"max rel diff {error:.1e}")


def pipeline(ring, seed: int) -> tuple[str, bool, str]:
    """An MLP cut into one stage per rank; rank 0 checks the outputs against the whole."""
    import torch

    from ringlib.pipeline import Pipeline, TorchStage, split_sequential

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[m for _ in range(ring.world_size)
                                  for m in (torch.nn.Linear(64, 64), torch.nn.GELU())])
    pipe = Pipeline(ring, TorchStage(split_sequential(model, ring.world_size)[ring.rank]),
                    micro_batch=4, max_in_flight=4)
    what = f"pipeline inference, one MLP stage per rank, {ring.world_size} stages"
    if ring.rank != 0:
        pipe.serve()
        return what, True, "served"
    batches = [torch.randn(n, 64, generator=torch.Generator().manual_seed(seed + n))
               for n in (10, 3, 16, 7)]
    outputs = list(pipe.run(batches))
    pipe.close()
    with torch.inference_mode():
        error = max(float((o - model(b)).abs().max()) for o, b in zip(outputs, batches))
    return what, error <= 1e-6, f"{len(batches)} batches in order, max |error| {error:.1e}"


def sweep(ring) -> list[tuple[int, float]]:
    """(bytes, median seconds) of back-to-back float32 sum all-reduces, timed on each rank."""
    rows = []
    for nbytes, calls in SWEEP:
        x = np.zeros(nbytes // 4, np.float32)
        ring.all_reduce(x)
        ring.barrier()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            ring.all_reduce(x)
            times.append(time.perf_counter() - start)
        rows.append((nbytes, float(np.median(times))))
    return rows


def report(results: list[tuple[str, bool, str]], rows: list[tuple[int, float]], seed: int,
           world: int, elapsed: float) -> None:
    from ringlib.bench.timing import format_size

    print(f"ringlib demo: {world} peers on this host, one process each, seed {seed}")
    for what, ok, detail in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {what} ({detail})")
    print(f"\n  {'all_reduce':>10} {'p50 us':>10} {'busbw GB/s':>11}   "
          f"({world} ranks, tcp, float32 sum, blocking API)")
    for nbytes, seconds in rows:
        busbw = nbytes / seconds * 2 * (world - 1) / world / 1e9
        print(f"  {format_size(nbytes):>10} {seconds * 1e6:>10.1f} {busbw:>11.3f}")
    print(f"\n  busbw = bytes / time x 2(n-1)/n; checks and sweep took {elapsed:.1f} s")


def peer(seed: int) -> int:
    """One rank, on the blocking API that training loops use."""
    import ringlib

    with ringlib.init() as ring:
        start = time.perf_counter()
        results = checks(ring, seed) + [train(ring, seed), pipeline(ring, seed)]
        rows = sweep(ring)
        passed = all(ok for _, ok, _ in results)
        if ring.rank == 0:
            report(results, rows, seed, ring.world_size, time.perf_counter() - start)
        elif not passed:
            print("\n".join(f"FAILED {w} ({d})" for w, ok, d in results if not ok))
        return 0 if passed else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ringlib.demo")
    parser.add_argument("--peer", type=int, required=True, help="run one peer with this seed")
    sys.exit(peer(parser.parse_args().peer))
