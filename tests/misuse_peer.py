"""One rank of a test of how users trip up (test_misuse.py): `python misuse_peer.py SCENARIO SEED`.

threads  two threads call all_reduce on one blocking ring at once; every result must be
         right or an error: prints a JSON count of right, wrong and each error
fresh    all_reduce from a new thread each time, one call at a time, with default thread
         names whose counters differ between the ranks; every result must be right
reopen   init(), an all-reduce, close(), three times over with the same addresses, as a
         notebook or a test harness does
noclose  init() and an all-reduce, and the script ends without close()
raise    as noclose, but rank 1 raises the user's own error
"""

from __future__ import annotations

import collections
import json
import sys
import threading

import numpy as np

import ringlib

CALLS = 60  # per thread


def threads(seed: int) -> None:
    with ringlib.init(collective_timeout=5) as ring:
        counts: collections.Counter = collections.Counter()

        def work(thread: int) -> None:
            for i in range(CALLS):
                value = ring.rank * 1000 + thread * 100 + i + seed % 7
                x = np.full(4, value, np.float64)
                try:
                    ring.all_reduce(x)
                except ringlib.RingError as exc:  # as a program would: it stops
                    closed = isinstance(exc, ringlib.PeerLost) and "closed its ring" in str(exc)
                    counts["PeerClosed" if closed else type(exc).__name__] += 1
                    return
                expected = sum(r * 1000 + thread * 100 + i + seed % 7
                               for r in range(ring.world_size))
                counts["right" if (x == expected).all() else "wrong"] += 1

        workers = [threading.Thread(target=work, args=(t,), name=f"worker {'ab'[t]}")
                   for t in (0, 1)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        print(json.dumps(counts), flush=True)


def fresh(seed: int) -> None:
    with ringlib.init(collective_timeout=20) as ring:
        for _ in range(ring.rank * 3):  # so that threads are counted differently on each rank
            threading.Thread(target=lambda: None).start()
        for i in range(20):
            x = np.full(4, ring.rank + i + seed % 7, np.float64)
            caller = threading.Thread(target=ring.all_reduce, args=(x,))  # 'Thread-N (...)'
            caller.start()
            caller.join()
            expected = sum(r + i + seed % 7 for r in range(ring.world_size))
            assert (x == expected).all(), f"call {i}: {x} != {expected}"
        print("fresh ok", flush=True)


def reopen(seed: int) -> None:
    for round_ in range(3):
        ring = ringlib.init(timeout=20)
        x = np.full(4, ring.rank + seed % 5, np.float32)
        ring.all_reduce(x)
        expected = sum(r + seed % 5 for r in range(ring.world_size))
        assert (x == expected).all(), f"round {round_}: {x} != {expected}"
        print(f"round {round_} ok", flush=True)
        ring.close()


def noclose(raises: bool) -> None:
    ring = ringlib.init()
    ring.all_reduce(np.ones(3))
    if raises and ring.rank == 1:
        raise ValueError("the user's own error")


if __name__ == "__main__":
    scenario, seed_arg = sys.argv[1], int(sys.argv[2])
    if scenario in ("noclose", "raise"):
        noclose(scenario == "raise")
    else:
        {"threads": threads, "fresh": fresh, "reopen": reopen}[scenario](seed_arg)
