"""A rank's program for the launcher tests: `python launch_job.py MODE [ARGS]`.

sum          all-reduce rank+1 and print the sum (and whether CurveZMQ is on)
fail R CODE  after an all-reduce, rank R exits with CODE; the others sleep
kill R       after an all-reduce, rank R kills itself with SIGKILL; the others sleep
survive R    after an all-reduce, rank R kills itself with SIGKILL; the others meet
             PeerLost, re-form and all-reduce again
sleep        print "ready", then sleep
orphans      as sleep, but each rank first starts a child of its own and offers a
             shared-memory segment nobody takes: what a launcher killed outright leaves
chatter N    print N long lines of the rank's digit to stdout and to stderr, interleaved
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np

import ringlib


def main(mode: str, args: list[str]) -> int:
    if mode == "chatter":
        rank = os.environ["RINGLIB_RANK"]
        for i in range(int(args[0])):
            stream = sys.stdout if i % 2 else sys.stderr
            stream.write(rank * 5000 + "\n")
        return 0
    with ringlib.init() as ring:
        x = np.full(3, ring.rank + 1.0)
        ring.all_reduce(x)
        curve = "on" if ring.ring.endpoint.keys else "off"
        print(f"rank {ring.rank} of {ring.world_size} sum {x[0]:g} pid {os.getpid()} "
              f"curve {curve} at {ring.address}", flush=True)
        if mode == "fail" and ring.rank == int(args[0]):
            print(f"rank {ring.rank} gives up", file=sys.stderr, flush=True)
            return int(args[1])
        if mode in ("kill", "survive") and ring.rank == int(args[0]):
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "survive":
            try:
                ring.all_reduce(x)
            except ringlib.PeerLost:
                ring.reform()
            x = np.full(3, ring.rank + 1.0)
            ring.all_reduce(x)
            print(f"re-formed: rank {ring.rank} of {ring.world_size} sum {x[0]:g}", flush=True)
        if mode == "orphans":
            from ringlib.transport import segment_names, shared

            subprocess.Popen(["sleep", "300"])
            ring.offer = shared.Writer(os.environ[segment_names.JOB_VARIABLE], ring.rank, 99,
                                       4096)
        if mode in ("fail", "kill", "sleep", "orphans"):
            print("ready", flush=True)
            time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
