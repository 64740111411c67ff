"""Training step time with gradient averaging against the pure compute, and how much of
the averaging's communication hides behind backward.

    ringlib bench trainer [-n 2] [--bucket-mb 25] [--steps 12] [--threads 1]

Each rank trains an MLP of about 10M float32 parameters on its own batch. Three kinds of
step take turns, a few steps at a time, so machine noise hits all of them:
  compute    forward, backward, optimizer step, with the averager's hooks idle (no_sync)
  averaged   the same, with GradientAverager overlapping the all-reduces with backward
  comm       the averager's buckets all-reduced alone, with nothing to overlap
hidden = 1 - (averaged - compute) / comm: the share of the communication that costs no
step time. Rank 0 reports medians. Gradients are zeroed in place (set_to_none=False), so
that .grad keeps pointing into the averager's buckets and backward accumulates straight
into them, with no copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import time
from typing import Callable

from .ranks import collect, exit_with_parent

LAYERS = [1024, 2048, 2048, 1024, 1024, 10]  # 9.4M parameters
TURN = 3                                      # steps of one kind in a row


def build(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = []
    for width_in, width_out in zip(LAYERS, LAYERS[1:]):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def run_worker(args: argparse.Namespace) -> None:
    import torch

    import ringlib
    import ringlib.torch as rt

    model = build(args.threads)
    x, y = torch.randn(args.batch, LAYERS[0]), torch.randint(0, LAYERS[-1], (args.batch,))
    with ringlib.init() as ring:
        averager = rt.GradientAverager(model, ring, bucket_mb=args.bucket_mb)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def compute() -> None:
            with averager.no_sync():
                torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        def averaged() -> None:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            averager.synchronize()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        def comm() -> None:
            for future in [ring.all_reduce_async(b.buffer, "mean") for b in averager.buckets]:
                future.result()

        kinds = {"compute": compute, "averaged": averaged, "comm": comm}
        times = take_turns(kinds, args.steps, ring.barrier)
        if ring.rank == 0:
            params = sum(p.numel() for p in model.parameters())
            print(json.dumps({"params": params, "buckets": len(averager.buckets),
                              **{k: statistics.median(v) for k, v in times.items()}}), flush=True)


def take_turns(kinds: dict[str, Callable[[], None]], steps: int,
                barrier: Callable[[], None]) -> dict[str, list[float]]:
    for step in kinds.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {f"{k} cpu": [] for k in kinds}
    barrier()
    for _ in range(-(-steps // TURN)):
        for name, step in kinds.items():
            for _ in range(TURN):
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                times[name].append(time.perf_counter() - start)
                cpu[f"{name} cpu"].append(time.process_time() - start_cpu)
    return {**times, **cpu}


def report(result: dict, args: argparse.Namespace) -> str:
    compute, averaged, comm = result["compute"], result["averaged"], result["comm"]
    hidden = 1 - (averaged - compute) / comm
    return "\n".join([
        f"{result['params'] / 1e6:.1f}M float32 parameters in {result['buckets']} buckets of "
        f"<= {args.bucket_mb:g} MB, {args.ranks} ranks, batch {args.batch} per rank, "
        f"torch threads {args.threads}",
        f"  {'step':<28} {'p50 ms':>8} {'CPU ms':>8}   (CPU: all of rank 0's threads)",
        f"  {'compute only':<28} {compute * 1e3:>8.1f} {result['compute cpu'] * 1e3:>8.1f}",
        f"  {'with gradient averaging':<28} {averaged * 1e3:>8.1f} {result['averaged cpu'] * 1e3:>8.1f}",
        f"  {'all-reduce of the buckets':<28} {comm * 1e3:>8.1f} {result['comm cpu'] * 1e3:>8.1f}",
        f"  averaging adds {(averaged - compute) * 1e3:.1f} ms to a step: "
        f"{hidden:.0%} of the communication is hidden behind backward",
        f"command: ringlib bench trainer -n {args.ranks} --bucket-mb {args.bucket_mb:g} "
        f"--steps {args.steps} --batch {args.batch} --threads {args.threads}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringlib bench trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--ranks", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.worker:
        exit_with_parent()
        run_worker(args)
        return
    results = collect(__spec__.name, argv, args.ranks, "trainer")
    print(report(results[-1], args))


if __name__ == "__main__":
    main()
