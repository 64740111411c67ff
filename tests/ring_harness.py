"""Run a ring of real processes on free ports or private ipc paths, and clean up after it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ringlib.runtime import processes
from ringlib.runtime.environment import without_placement
from ringlib.transport.addresses import local_addresses

PEER = Path(__file__).with_name("ring_peer.py")


@dataclass
class Finished:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def ringlib_env(rank: int, world: int, peers: list[str]) -> dict[str, str]:
    return {"RINGLIB_RANK": str(rank), "RINGLIB_WORLD_SIZE": str(world),
            "RINGLIB_PEERS": ",".join(peers)}


def run_ranks(args: list[str] | list[list[str]], envs: list[dict[str, str]],
              timeout: float = 180, expendable: frozenset[int] = frozenset()
              ) -> list[Finished]:
    """Start one process per env (added to a clean copy of os.environ), each running
    python with `args` (or with its own, given a list of them), wait for all but
    the `expendable` ranks (killed or stopped on purpose), and kill every one still
    running once those are done, or if one fails or the time runs out."""
    # Tuning variables of the caller's (RINGLIB_SEGMENT_BYTES, ...) stay out too: a test
    # passes the ones it means in `envs`.
    base = {k: v for k, v in without_placement(os.environ).items()
            if not k.startswith("RINGLIB_")}
    argvs = args if args and isinstance(args[0], list) else [args] * len(envs)
    procs = [processes.start([sys.executable, *argv], {**base, **env}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv, env in zip(argvs, envs)]
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for i, p in enumerate(procs) if i not in expendable]
            if None not in codes or any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        processes.stop(procs, grace=0)
        outs = [p.communicate() for p in procs]
    return [Finished(i, p.returncode, *out) for i, (p, out) in enumerate(zip(procs, outs))]


def run_ring(scenario: str, world: int, transport: str, seed: int,
             extra_env: dict[str, str] | None = None, timeout: float = 180,
             peer: Path = PEER, expendable: frozenset[int] = frozenset(),
             hosts: int = 1) -> list[Finished]:
    """Run `peer` SCENARIO SEED (ring_peer.py) on `world` ranks wired by RINGLIB_PEERS.
    With `hosts` (tcp), the ranks are that many hosts' worth, contiguous, each host at a
    loopback address of its own (127.0.0.1, 127.0.0.2, ...), as far as the ranks' table
    says: they still share this host's memory."""
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc_dir:  # short: ipc paths cap at 107
        peers = [address.replace("127.0.0.1", f"127.0.0.{1 + r * hosts // world}")
                 for r, address in enumerate(local_addresses(world, transport, ipc_dir))]
        envs = [{**ringlib_env(r, world, peers), **(extra_env or {})} for r in range(world)]
        finished = run_ranks([str(peer), scenario, str(seed)], envs, timeout, expendable)
        leftovers = os.listdir(ipc_dir)
    assert not leftovers, f"ipc socket files left behind: {leftovers}"
    return finished


def assert_all_agree(finished: list[Finished]) -> str:
    """Every rank exited 0 and printed the same digest; return that digest."""
    report = "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                       for f in finished)
    assert all(f.returncode == 0 for f in finished), report
    digests = {f.stdout.split()[-1] for f in finished}
    assert len(digests) == 1, f"ranks disagree:\n{report}"
    return digests.pop()
