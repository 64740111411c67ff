"""Pipeline-parallel inference throughput and latency: N stages on N peers against the
whole model in one process, and against torch.distributed.pipelining on the same model,
each process on one torch thread.

    ringlib bench pipeline [--stages 2] [--width 1024] [--layers 8] [--batch 64]
        [--micro-batch 32] [--batches 48] [--rounds 5] [--compare torch]

The model is `--layers` Linear+ReLU blocks of equal width, cut into `--stages` stages of
equal cost (split_sequential). Rank 0 takes turns, for `--rounds` rounds, and reports
medians: the whole model alone (the other ranks idle); the ringlib pipeline through the
asyncio API (`arun`) and through the blocking one (`run`), fed `--batches` batches of
`--batch` rows in micro-batches of `--micro-batch`; with `--compare torch`, torch's
forward-only ScheduleGPipe on a Gloo group in the same processes, one `eval()` a batch.
Latency per micro-batch is measured twice: one micro-batch at a time through an idle
pipeline (what a lone request waits), and a batch's in the full pipe (with queueing). A serving
round sends requests of 1 to 8 rows at random (Poisson) times, at half the pipeline's
measured rows/s, through Serving (gathered up to a micro-batch, or 2 ms), and reports
each request's latency. A last kind of round sends the same activations through
identity stages: the transport's cost of a round trip around the ring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import timedelta
from typing import Any, Iterator

from .options import names_among
from .ranks import collect, exit_with_parent

COMPARED = ("torch",)


def model(width: int, layers: int):
    import torch

    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)


class TorchPipelining:
    """torch.distributed.pipelining's ScheduleGPipe, forward only, on a Gloo group met at
    127.0.0.1:`port`: this rank's stage of the same cut."""

    def __init__(self, part: Any, rank: int, stages: int, micro_per_batch: int,
                 port: int) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        self.dist, self.rank = dist, rank
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=stages, timeout=timedelta(seconds=120))
        stage = PipelineStage(part, rank, stages, torch.device("cpu"))
        self.schedule = ScheduleGPipe(stage, n_microbatches=micro_per_batch)

    def seconds(self, batches: list) -> float:
        """Every rank: all batches through the schedule; the time from a barrier to a
        barrier after the last stage's last output."""
        import torch

        self.dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                self.schedule.eval(batch) if self.rank == 0 else self.schedule.eval()
        self.dist.barrier()
        return time.perf_counter() - start

    def close(self) -> None:
        self.dist.destroy_process_group()


def run_worker(args: argparse.Namespace) -> None:
    import torch

    import ringlib
    from ringlib.pipeline import Pipeline, TorchStage, split_sequential

    torch.set_num_threads(1)
    whole = model(args.width, args.layers)
    parts = split_sequential(whole, args.stages)
    batches = [torch.randn(args.batch, args.width) for _ in range(args.batches)]
    with ringlib.init() as ring:
        rival = (TorchPipelining(parts[ring.rank], ring.rank, args.stages,
                                 args.batch // args.micro_batch, args.store_port)
                 if "torch" in args.compare else None)
        piped = Pipeline(ring, TorchStage(parts[ring.rank]), micro_batch=args.micro_batch)
        echo = Pipeline(ring, lambda x: x, micro_batch=args.micro_batch)
        if ring.rank != 0:
            served = ring._loop_thread().submit(_serve(piped, echo))
            for _ in range(args.rounds if rival else 0):
                rival.seconds(batches)
            served.result()
        else:
            print(json.dumps(_lead(ring, whole, piped, echo, rival, batches, args)), flush=True)
            ring._loop_thread().run(_close(piped, echo))
        if rival:
            rival.close()


async def _serve(*pipes) -> None:
    await asyncio.gather(*(pipe.aserve() for pipe in pipes))


async def _close(*pipes) -> None:
    for pipe in pipes:
        await pipe.aclose()


def _lead(ring, whole, piped, echo, rival, batches: list, args: argparse.Namespace) -> dict:
    """Rank 0's rounds, taking turns; what each took."""
    loop = ring._loop_thread()
    micro = [m for b in batches for m in b.split(args.micro_batch)]
    rounds: dict[str, list[float]] = {k: [] for k in
                                      ("alone", "asyncio", "blocking", "torch", "echo")}
    alone_latency, full_latency = [], []
    for _ in range(args.rounds):
        rounds["alone"].append(_alone(whole, batches))
        seconds, latencies = loop.run(_through(piped, batches))
        rounds["asyncio"].append(seconds)
        full_latency += latencies
        start = time.perf_counter()
        for _ in piped.run(batches):
            pass
        rounds["blocking"].append(time.perf_counter() - start)
        if rival:
            rounds["torch"].append(rival.seconds(batches))
        alone_latency += loop.run(_one_at_a_time(piped, micro[:16]))
        rounds["echo"].append(loop.run(_through(echo, micro))[0] / len(micro))
    rows_per_s = sum(len(b) for b in batches) / statistics.median(rounds["asyncio"])
    served = loop.run(_requests(piped, args, rows_per_s / 2, 4 * len(micro)))
    return {**{k: statistics.median(v) for k, v in rounds.items() if v},
            "latency": _percentiles(alone_latency), "full_latency": _percentiles(full_latency),
            "serving": {**_percentiles(served), "rate": rows_per_s / 2},
            "samples": sum(len(b) for b in batches)}


async def _requests(pipe, args: argparse.Namespace, rows_per_s: float, count: int) -> list:
    """Requests of 1 to 8 rows at Poisson times, `rows_per_s` on average, through Serving;
    each one's latency."""
    import torch

    from ringlib.pipeline import Serving

    serving, rng = Serving(pipe, max_rows=args.micro_batch, max_wait=0.002), random.Random(0)
    answers = []
    for _ in range(count):
        await asyncio.sleep(rng.expovariate(rows_per_s / 4.5))
        answers.append(asyncio.ensure_future(
            serving.asubmit(torch.randn(rng.randint(1, 8), args.width))))
    await asyncio.gather(*answers)
    await serving.aclose()
    return list(serving.latencies)


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50": values[len(values) // 2], "p99": values[int(len(values) * 0.99)]}


def _alone(whole, batches: list) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            whole(batch)
    return time.perf_counter() - start


async def _through(pipe, batches: list) -> tuple[float, list[float]]:
    """Seconds for all batches, and each one's time from entering to leaving the pipe."""
    entered: list[float] = []

    def feed() -> Iterator:
        for part in batches:
            entered.append(time.perf_counter())
            yield part
    start, latencies = time.perf_counter(), []
    async for _ in pipe.arun(feed()):
        latencies.append(time.perf_counter() - entered[len(latencies)])
    return time.perf_counter() - start, latencies


async def _one_at_a_time(pipe, micro: list) -> list[float]:
    """Each micro-batch's time through an idle pipe."""
    latencies = []
    for part in micro:
        start = time.perf_counter()
        async for _ in pipe.arun([part]):
            pass
        latencies.append(time.perf_counter() - start)
    return latencies


def report(result: dict, args: argparse.Namespace) -> str:
    samples, n = result["samples"], args.stages
    alone = samples / result["alone"]

    def row(label: str, key: str, anchor: str = "") -> str:
        rate = samples / result[key]
        against = f"   {rate / alone:.2f}x alone" + (
            f", {rate * result['torch'] / samples:.2f}x torch" if "torch" in result else "")
        return f"  {label:<44} {rate:>10.0f}{'' if key == 'alone' else against}"
    lines = [
        f"{args.layers} x Linear({args.width}, {args.width}) + ReLU, cut into {n} stages of "
        f"equal cost; batches of {args.batch}, micro-batches of {args.micro_batch}, "
        "torch threads 1 per process",
        f"  {'':<44} {'samples/s':>10}",
        row("whole model, one process", "alone"),
        row(f"ringlib pipeline, {n} peers, asyncio arun()", "asyncio"),
        row(f"ringlib pipeline, {n} peers, blocking run()", "blocking"),
    ]
    if "torch" in result:
        rate = samples / result["torch"]
        lines.append(f"  {'torch.distributed.pipelining ScheduleGPipe':<44} {rate:>10.0f}"
                     f"   {rate / alone:.2f}x alone")
    lines += [
        f"  micro-batch latency, one at a time: p50 {result['latency']['p50'] * 1e3:.2f} ms, "
        f"p99 {result['latency']['p99'] * 1e3:.2f} ms; a batch's in the full pipe: p50 "
        f"{result['full_latency']['p50'] * 1e3:.1f} ms, p99 "
        f"{result['full_latency']['p99'] * 1e3:.1f} ms",
        f"  serving requests of 1-8 rows at {result['serving']['rate']:.0f} rows/s (half the "
        f"pipeline's): latency p50 {result['serving']['p50'] * 1e3:.2f} ms, p99 "
        f"{result['serving']['p99'] * 1e3:.2f} ms",
        f"  transport, identity stages: {result['echo'] * 1e6:.0f} us per micro-batch round "
        f"trip (rank 0 -> ... -> {n - 1} -> 0, {args.micro_batch}x{args.width} float32)",
        f"command: ringlib bench pipeline --stages {n} --width {args.width} --layers "
        f"{args.layers} --batch {args.batch} --micro-batch {args.micro_batch} --batches "
        f"{args.batches} --rounds {args.rounds}"
        + (f" --compare {','.join(args.compare)}" if args.compare else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringlib bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2, help="ranks, one stage each")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8, help="at least --stages")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=32, help="divides --batch")
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare", type=names_among(COMPARED, "system to compare with"), default=[], metavar="torch",
                        help="also run torch.distributed.pipelining's ScheduleGPipe")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.stages < 2 or args.layers < args.stages:
        parser.error("--stages needs 2 or more, and --layers at least as many")
    if min(args.width, args.batch, args.micro_batch, args.batches, args.rounds) < 1 or \
            args.batch % args.micro_batch:
        parser.error("--width, --batch, --micro-batch, --batches and --rounds need 1 or "
                     "more, and --micro-batch must divide --batch")
    if args.worker:
        exit_with_parent()
        run_worker(args)
        return
    if args.compare:
        from ringlib.transport.addresses import free_tcp_ports
        argv += ["--store-port", str(free_tcp_ports(1)[0])]
    results = collect(__spec__.name, argv, args.stages, "pipeline")
    print(report(results[-1], args))


if __name__ == "__main__":
    main()
