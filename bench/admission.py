"""Growing a ring: what admit() costs when nobody waits, and how long admitting one
newcomer takes, on this host.

    ringlib bench admission [-n 3] [--trials 5] [--calls 2000] [--json out.json]

Each trial starts -n members (`ringlib launch`) and then one newcomer (`ringlib launch
--join`), once the members are done with their first part: they time admit() with nobody waiting against a
plain 8-byte all-reduce, in alternating blocks of 100 calls of each, through the blocking
API a training loop calls; then they wait until the newcomer has asked, and SETTLE_S more
(so that its own start-up is over), and time from admit() to the end of the grown
ring's first collective (an 8-byte all-reduce). Rank 0
prints its figures as a JSON line; this process prints medians over the trials.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .results import write_json

BLOCK = 100  # calls of each kind in a row, taking turns
SETTLE_S = 3.0  # how long the newcomer waits, once it asked, before the members admit it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlib bench admission", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=3, help="members (default 3)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000,
                   help="timed calls of admit() and of the all-reduce, each, per trial")
    p.add_argument("--json", type=Path, help="write the figures there")
    p.add_argument("--worker", choices=("member", "newcomer"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p


def member(args: argparse.Namespace) -> None:
    import ringlib
    ring = ringlib.init()
    x = np.ones(2, np.float32)
    times: dict[str, list[float]] = {"admit": [], "all_reduce": []}
    calls = {"admit": lambda: ring.admit(), "all_reduce": lambda: ring.all_reduce(x)}
    for _ in range(BLOCK):
        calls["admit"](), calls["all_reduce"]()
    for block in range(2 * max(1, args.calls // BLOCK)):
        kind = ("admit", "all_reduce")[block % 2]
        call = calls[kind]
        for _ in range(BLOCK):
            start = time.perf_counter()
            call()
            times[kind].append(time.perf_counter() - start)
    if ring.rank == 0:  # the newcomer starts now: none may ask while admit() is timed
        Path(args.dir, "address.tmp").write_text(ring.address)
        os.rename(Path(args.dir, "address.tmp"), Path(args.dir, "address"))
    while ring.all_reduce(np.array([ring.waiting()], np.int64), op="sum")[0] < 1:
        time.sleep(0.01)
    time.sleep(SETTLE_S)  # the newcomer's own start-up (imports, kernels) is not admission
    ring.barrier()
    start = time.perf_counter()
    joined = ring.admit()
    admitted = time.perf_counter()
    ring.all_reduce(x)
    first = time.perf_counter()
    assert joined == 1 and ring.world_size == args.ranks + 1
    if ring.rank == 0:
        print(json.dumps({"admit_idle_us": np.median(times["admit"]) * 1e6,
                          "all_reduce_us": np.median(times["all_reduce"]) * 1e6,
                          "admit_ms": (admitted - start) * 1e3,
                          "to_first_collective_ms": (first - start) * 1e3}), flush=True)
    ring.close()


def newcomer(args: argparse.Namespace) -> None:
    import ringlib
    ring = ringlib.init()
    ring.all_reduce(np.ones(2, np.float32))
    ring.close()


def trial(args: argparse.Namespace) -> dict[str, Any]:
    """One ring of members and one newcomer; rank 0's figures."""
    launch = [sys.executable, "-m", "ringlib", "launch", "--timeout", "120"]
    worker = [sys.executable, "-m", "ringlib.bench.admission", "--calls", str(args.calls),
              "-n", str(args.ranks)]
    with tempfile.TemporaryDirectory(prefix="ringlib-admission-") as directory:
        members = subprocess.Popen([*launch, "-n", str(args.ranks), "--", *worker,
                                    "--worker", "member", "--dir", directory],
                                   stdout=subprocess.PIPE, text=True)
        address = Path(directory, "address")
        while not address.exists() and members.poll() is None:
            time.sleep(0.05)
        joining = subprocess.Popen([*launch, "--join", address.read_text(), "-n", "1", "--",
                                    *worker, "--worker", "newcomer"])
        out, _ = members.communicate(timeout=600)
        joining.wait(timeout=60)
    if members.returncode or joining.returncode:
        raise SystemExit(f"a trial failed: members exited {members.returncode}, the "
                         f"newcomer {joining.returncode}")
    return json.loads(out.strip().splitlines()[-1].split("] ", 1)[-1])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        (member if args.worker == "member" else newcomer)(args)
        return 0
    if args.ranks < 2 or args.trials < 1 or args.calls < BLOCK:
        parser().error(f"-n must be 2 or more, --trials 1 or more, --calls {BLOCK} or more")
    results = [trial(args) for _ in range(args.trials)]
    median = {k: float(np.median([r[k] for r in results])) for k in results[0]}
    ratios = [r["admit_idle_us"] / r["all_reduce_us"] for r in results]
    print(f"{args.ranks} members, {args.trials} trials (medians over trials; rank 0's "
          "medians per call within each)")
    print(f"  admit() with nobody waiting   {median['admit_idle_us']:8.1f} us")
    print(f"  8-byte all_reduce             {median['all_reduce_us']:8.1f} us")
    print(f"  admit()/all_reduce            {np.median(ratios):8.2f}  "
          f"({min(ratios):.2f}..{max(ratios):.2f}, each in one run)")
    print(f"  admitting one newcomer        {median['admit_ms']:8.1f} ms  (admit() returns)")
    print(f"  ... to the grown ring's first collective {median['to_first_collective_ms']:.1f} ms "
          f"({min(r['to_first_collective_ms'] for r in results):.1f}.."
          f"{max(r['to_first_collective_ms'] for r in results):.1f})")
    print(f"command: ringlib bench admission -n {args.ranks} --trials {args.trials} "
          f"--calls {args.calls}")
    if args.json:
        write_json(args.json, {"benchmark": "admission", "ranks": args.ranks,
                               "trials": results, "median": median,
                               "admit_over_all_reduce": float(np.median(ratios))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
