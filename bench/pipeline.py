"""Pipeline-parallel inference throughput: 2 stages on 2 peers against the whole model in
one process, each on one torch thread, with per-micro-batch latency and transport cost.

    ringlib bench pipeline [--width 1024] [--layers 8] [--batch 64]
        [--micro-batch 32] [--batches 48] [--rounds 5]

The model is `--layers` Linear+ReLU blocks of equal width, cut into two halves of equal
cost. Rank 0 takes turns: the whole model alone (rank 1 idles), then the pipeline, for
`--rounds` rounds, and reports medians. A third kind of round sends the same
activations through identity stages: its time per micro-batch is the transport's cost
for a round trip around the ring (rank 0 -> rank 1 -> rank 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Iterator

from .ranks import collect, exit_with_parent


def model(width: int, layers: int):
    import torch

    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)


async def run_worker(args: argparse.Namespace) -> None:
    import torch

    import ringlib
    from ringlib.pipeline import Pipeline, TorchStage, split_sequential

    torch.set_num_threads(1)
    whole = model(args.width, args.layers)
    halves = split_sequential(whole, 2)
    async with ringlib.connect() as ring:
        piped = Pipeline(ring, TorchStage(halves[ring.rank]), micro_batch=args.micro_batch)
        echo = Pipeline(ring, lambda x: x, micro_batch=args.micro_batch)
        if ring.rank == 1:
            await asyncio.gather(piped.aserve(), echo.aserve())
            return
        # Micro-batch-sized batches: each output's time in the pipe is a micro-batch's latency.
        micro = [torch.randn(args.micro_batch, args.width)
                 for _ in range(args.batches * args.batch // args.micro_batch)]
        rounds: dict[str, list[float]] = {"alone": [], "pipeline": [], "echo": [], "latency": []}
        for _ in range(args.rounds):
            rounds["alone"].append(_alone(whole, micro))
            seconds, latencies = await _through(piped, micro)
            rounds["pipeline"].append(seconds)
            rounds["latency"] += latencies
            rounds["echo"].append((await _through(echo, micro))[0])
        await piped.aclose()
        await echo.aclose()
        latencies = sorted(rounds["latency"])
        print(json.dumps({
            "alone": statistics.median(rounds["alone"]),
            "pipeline": statistics.median(rounds["pipeline"]),
            "echo_per_micro": statistics.median(rounds["echo"]) / len(micro),
            "p50": latencies[len(latencies) // 2], "p99": latencies[int(len(latencies) * 0.99)],
            "samples": args.micro_batch * len(micro)}), flush=True)


def _alone(whole, micro: list) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for part in micro:
            whole(part)
    return time.perf_counter() - start


async def _through(pipe, micro: list) -> tuple[float, list[float]]:
    """Seconds for all micro-batches, and each one's time from entering to leaving the pipe."""
    entered: list[float] = []

    def feed() -> Iterator:
        for part in micro:
            entered.append(time.perf_counter())
            yield part
    start, latencies = time.perf_counter(), []
    async for _ in pipe.arun(feed()):
        latencies.append(time.perf_counter() - entered[len(latencies)])
    return time.perf_counter() - start, latencies


def report(result: dict, args: argparse.Namespace) -> str:
    samples = result["samples"]
    alone, piped = samples / result["alone"], samples / result["pipeline"]
    return "\n".join([
        f"{args.layers} x Linear({args.width}, {args.width}) + ReLU, cut into 2 stages of "
        f"equal cost; batches of {args.batch}, micro-batches of {args.micro_batch}, "
        "torch threads 1 per process",
        f"  {'':<34} {'samples/s':>10}",
        f"  {'whole model, one process':<34} {alone:>10.0f}",
        f"  {'2-stage pipeline, 2 peers':<34} {piped:>10.0f}   {piped / alone:.2f}x",
        f"  micro-batch latency through the pipeline: p50 {result['p50'] * 1e3:.1f} ms, "
        f"p99 {result['p99'] * 1e3:.1f} ms",
        f"  transport, identity stages: {result['echo_per_micro'] * 1e6:.0f} us per micro-batch "
        f"round trip (rank 0 -> 1 -> 0, {args.micro_batch}x{args.width} float32)",
        f"command: ringlib bench pipeline --width {args.width} --layers {args.layers} "
        f"--batch {args.batch} --micro-batch {args.micro_batch} --batches {args.batches} "
        f"--rounds {args.rounds}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringlib bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8, help="an even number")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.worker:
        exit_with_parent()
        asyncio.run(run_worker(args))
        return
    results = collect(__spec__.name, argv, 2, "pipeline")
    print(report(results[-1], args))


if __name__ == "__main__":
    main()
