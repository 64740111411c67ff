"""Unmodified DistributedDataParallel on the ringlib backend against the same on Gloo.

    ringlib bench ddp [-n 2] [--steps 12] [--batch 64] [--threads 1] [--only local|tcp]

Each rank trains an MLP of 9.4M float32 parameters (bench/trainer.py's) on its own batch,
in two DDP replicas of one model: one on a ringlib group, one on a Gloo group, both
made with torch.distributed in the same processes (DDP's defaults: 25 MB buckets). Three
kinds of step take turns, a few at a time, so that machine noise hits all of them:
  gloo       forward, backward (DDP's bucket all-reduces on Gloo), optimizer step
  ringlib    the same on the ringlib group
  compute    the ringlib replica inside no_sync(): no communication at all
Rank 0 reports medians of wall time and of its CPU time (all its threads: the ring's and
Gloo's included), twice: with shared memory between the ranks (one host), and over tcp
only (RINGLIB_SHM_BYTES=0). Targets: ringlib at most 0.75x Gloo's step and
1.15x compute alone on one host, at most 0.9x Gloo over tcp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

from .ranks import collect, exit_with_parent
from .trainer import build, take_turns

TARGETS = {"local": {"gloo": 0.75, "compute": 1.15}, "tcp": {"gloo": 0.9}}


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ringlib.torch  # noqa: F401  (registers the backend)

    rank, world = int(os.environ["RINGLIB_RANK"]), int(os.environ["RINGLIB_WORLD_SIZE"])
    dist.init_process_group("ringlib", init_method=f"tcp://127.0.0.1:{args.store_port}",
                            rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")
    replicas = {"gloo": DDP(build(args.threads), process_group=gloo),
                "ringlib": DDP(build(args.threads))}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in replicas.items()}
    x = torch.randn(args.batch, 1024)
    y = torch.randint(0, 10, (args.batch,))

    def step(kind: str, sync: bool = True) -> None:
        model = replicas[kind]
        with contextlib.nullcontext() if sync else model.no_sync():
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=False)

    kinds = {"gloo": lambda: step("gloo"), "ringlib": lambda: step("ringlib"),
             "compute": lambda: step("ringlib", sync=False)}
    times = take_turns(kinds, args.steps, dist.barrier)
    if rank == 0:
        print(json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)
    dist.destroy_process_group()


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"DDP, 9.4M float32 parameters, 25 MB buckets, {args.ranks} ranks, batch "
             f"{args.batch} per rank, torch threads {args.threads}; median step (ms)",
             f"  {'path':<22} {'Gloo':>8} {'ringlib':>8} {'compute':>8} {'vs Gloo':>8} "
             f"{'vs compute':>10}   {'CPU ms: Gloo / ringlib / compute':<34} targets"]
    for path, result in results.items():
        gloo, ring, compute = result["gloo"], result["ringlib"], result["compute"]
        targets = ", ".join(f"<= {limit}x {anchor}" for anchor, limit in TARGETS[path].items())
        name = "one host (shm)" if path == "local" else "tcp only (shm off)"
        cpu = " / ".join(f"{result[f'{kind} cpu'] * 1e3:.1f}"
                         for kind in ("gloo", "ringlib", "compute"))
        lines.append(f"  {name:<22} {gloo * 1e3:>8.1f} {ring * 1e3:>8.1f} {compute * 1e3:>8.1f} "
                     f"{ring / gloo:>7.2f}x {ring / compute:>9.2f}x   {cpu:<34} {targets}")
    lines.append(f"command: ringlib bench ddp -n {args.ranks} --steps {args.steps} "
                 f"--batch {args.batch} --threads {args.threads}"
                 + (f" --only {args.only}" if args.only else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringlib bench ddp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--only", choices=sorted(TARGETS), help="run one path, not both")
    parser.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.worker:
        exit_with_parent()
        run_worker(args)
        return
    if args.ranks < 2 or args.steps < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--ranks needs 2 or more; --steps, --batch and --threads 1 or more")
    from ringlib.transport.addresses import free_tcp_ports

    results, shm = {}, os.environ.get("RINGLIB_SHM_BYTES")
    for path in [args.only] if args.only else list(TARGETS):
        if path == "tcp":
            os.environ["RINGLIB_SHM_BYTES"] = "0"
        elif shm is not None:
            os.environ["RINGLIB_SHM_BYTES"] = shm
        port = free_tcp_ports(1)[0]
        results[path] = collect(__spec__.name, [*argv, "--store-port", str(port)],
                                args.ranks, "ddp")[-1]
    print(report(results, args))


if __name__ == "__main__":
    main()
