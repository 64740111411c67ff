"""Two hosts of several ranks each, built on this machine: ringlib's hierarchical all-reduce
against its flat ring and Gloo's, with the bytes that cross between the hosts.

Each host is a network namespace with a mount namespace of its own (so a /dev/shm of its
own: its ranks share memory with each other and not with the other host's), and the two
are joined by a veth pair named `data0` at each end. Every system runs the same float32
sum, through the API a training loop calls (ringlib.init()'s blocking ring; torch's
all_reduce on Gloo, GLOO_SOCKET_IFNAME=data0), in rounds that take turns: ringlib
hierarchical, ringlib flat (RINGLIB_HIERARCHICAL=0), Gloo. Bytes between the hosts are
the veth's own transmit counters (both directions), read before and after each run;
+mem is rank 0's peak resident growth over two more calls (bench/memory.py), the most of
any round. Needs root and iproute2 (`ip netns`) and util-linux (`unshare`).

    ringlib bench hosts [--ranks-per-host 2] [--size 16MiB] [--iters 20] [--rounds 3]
                        [--timeline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from ringlib.runtime import processes

from . import memory
from .timing import format_size, parse_size

SYSTEMS = ("hierarchical", "flat", "gloo")
RUN_S = 300  # the most one system's run may take before its ranks are killed
DEVICE = "data0"


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@contextmanager
def two_hosts() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces joined by veth `data0`: [(namespace, address)]; deleted after."""
    tag = secrets.token_hex(3)
    names = [f"rlh{tag}a", f"rlh{tag}b"]
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", f"h{tag}a", "type", "veth", "peer", "name", f"h{tag}b")
        hosts = []
        for end, name in zip("ab", names):
            address = f"10.214.0.{1 + (end == 'b')}"
            _ip("link", "set", f"h{tag}{end}", "netns", name)
            _ip("-n", name, "link", "set", f"h{tag}{end}", "name", DEVICE)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", DEVICE)
            _ip("-n", name, "link", "set", DEVICE, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            hosts.append((name, address))
        yield hosts
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def crossed(hosts: list[tuple[str, str]]) -> int:
    """Bytes sent on the veth so far, both directions."""
    total = 0
    for name, _ in hosts:
        stats = json.loads(_ip("-n", name, "-s", "-j", "link", "show", DEVICE))[0]
        total += stats["stats64"]["tx"]["bytes"]
    return total


def run(system: str, hosts: list[tuple[str, str]], per_host: int, size: int,
        iters: int, timeline: str | None = None) -> dict:
    """One system's run on both hosts: rank 0's JSON, with the bytes that crossed."""
    world = per_host * len(hosts)
    port = 29000 + secrets.randbelow(20000)
    peers = [f"tcp://{hosts[r // per_host][1]}:{port + r}" for r in range(world)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGLIB_", "MASTER_"))}
    env.update(RINGLIB_PEERS=",".join(peers), RINGLIB_WORLD_SIZE=str(world),
               RINGLIB_HIERARCHICAL="0" if system == "flat" else "1",
               MASTER_ADDR=hosts[0][1], MASTER_PORT=str(port + world),
               GLOO_SOCKET_IFNAME=DEVICE)
    if timeline and system != "gloo":
        env["RINGLIB_TIMELINE"] = os.path.join(timeline, system, "trace-{rank}.json")
    worker = [sys.executable, "-m", "ringlib.bench.hosts", "--worker", system, str(size),
              str(iters)]
    before = crossed(hosts)
    procs = []
    for h, (name, _) in enumerate(hosts):
        ranks = " & ".join(f"RINGLIB_RANK={r} RINGLIB_LOCAL_RANK={r % per_host} \"$@\""
                           for r in range(h * per_host, (h + 1) * per_host)) + " & wait"
        script = f"mount -t tmpfs tmpfs /dev/shm && {ranks}"
        procs.append(processes.start(
            ["ip", "netns", "exec", name, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", *worker], env, stdout=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=RUN_S)[0] for p in procs]
    finally:
        processes.stop(procs, grace=0)  # each host's whole group: its shell and its ranks
    if any(p.returncode for p in procs):
        raise SystemExit(f"{system}: a host's ranks failed (exit codes "
                         f"{[p.returncode for p in procs]})")
    result = json.loads(outs[0].strip().splitlines()[-1])
    result["crossed_per_call"] = (crossed(hosts) - before) / (iters + result["warmup"])
    return result


def worker(system: str, size: int, iters: int) -> None:
    """One rank: `iters` timed all-reduces after a warm-up; rank 0 prints its JSON line."""
    x = np.ones(size // 4, np.float32)
    warmup = 3
    if system == "gloo":
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["RINGLIB_RANK"]), int(os.environ["RINGLIB_WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        t = torch.from_numpy(x)
        call, algorithm = (lambda: dist.all_reduce(t)), "gloo ring"
    else:
        import ringlib

        ring = ringlib.init()
        rank, world = ring.rank, ring.world_size
        call, algorithm = (lambda: ring.all_reduce(x)), ring.ring.plan("all_reduce", size).algorithm
    call()
    if not (x == world).all():
        raise SystemExit(f"{system}: rank {rank} got a wrong sum ({x[:4]}..., not {world})")
    times = []
    for i in range(warmup - 1 + iters):
        x[:] = 1  # outside the timing: sums stay small and finite
        start = time.perf_counter()
        call()
        if i >= warmup - 1:
            times.append(time.perf_counter() - start)
    grown = None
    if memory.supported():
        with memory.peak_above_now() as peak:
            for _ in range(2):
                call()
            grown = peak()
    if rank == 0:
        print(json.dumps({"system": system, "algorithm": algorithm, "p50": statistics.median(times),
                          "warmup": warmup + 2, "world": world, "grown": grown}), flush=True)
    if system == "gloo":
        dist.destroy_process_group()
    else:
        ring.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1], int(argv[2]), int(argv[3]))
    p = argparse.ArgumentParser(prog="ringlib bench hosts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--size", type=parse_size, default=parse_size("16MiB"))
    p.add_argument("--iters", type=int, default=20, help="timed calls per run (default: 20)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each system (default: 3)")
    p.add_argument("--timeline", metavar="DIR",
                   help="ringlib's ranks write their timelines to DIR/SYSTEM/trace-RANK.json "
                        "(the last round's; see `ringlib trace`)")
    args = p.parse_args(argv)
    if args.ranks_per_host < 1 or args.iters < 1 or args.rounds < 1:
        p.error("--ranks-per-host, --iters and --rounds must be 1 or more")
    results: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    try:
        with processes.sigterm_as_interrupt(), two_hosts() as hosts:
            for _ in range(args.rounds):
                for system in SYSTEMS:
                    results[system].append(run(system, hosts, args.ranks_per_host, args.size,
                                               args.iters, args.timeline))
    except KeyboardInterrupt:
        raise SystemExit("bench hosts interrupted; ranks stopped, namespaces deleted") from None
    world = 2 * args.ranks_per_host
    gloo = statistics.median(r["p50"] for r in results["gloo"])
    print(f"all_reduce float32 sum of {format_size(args.size)}, 2 hosts x "
          f"{args.ranks_per_host} ranks (network + mount namespaces, veth), blocking API")
    print(f"{'system':>13} {'algorithm':>13} {'p50 ms (each round)':>26} {'busbw GB/s':>11} "
          f"{'time/gloo':>10} {'MiB crossing/call':>18} {'+mem MiB':>9}")
    for system in SYSTEMS:
        rounds = results[system]
        p50 = statistics.median(r["p50"] for r in rounds)
        busbw = args.size / p50 * 2 * (world - 1) / world / 1e9
        each = "/".join(f"{r['p50'] * 1e3:.1f}" for r in rounds)
        mib = statistics.median(r["crossed_per_call"] for r in rounds) / 2**20
        grown = [r["grown"] for r in rounds if r["grown"] is not None]
        mem = f"{max(grown) / 2**20:.1f}" if grown else "-"
        print(f"{system:>13} {rounds[0]['algorithm']:>13} {each:>26} {busbw:>11.3f} "
              f"{p50 / gloo:>10.2f} {mib:>18.1f} {mem:>9}")
    print("command: ringlib bench hosts " + " ".join(argv))


if __name__ == "__main__":
    main()
