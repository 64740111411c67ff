"""A rank under `torchrun --max-restarts 1` whose first try fails: rank 1 exits before it
joins the ring, while rank 0 already waits in the agent's store, and torchrun starts both
again. The second try must form a ring of its own, whatever the first left in the store.
Prints `RANK RESTART SUM` (SUM 3.0 for 2 ranks)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import ringlib


def main() -> None:
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
        time.sleep(1.5)  # rank 0 is waiting in the store by now
        sys.exit(3)
    with ringlib.init(timeout=30) as ring:
        total = ring.all_reduce(np.full(4, ring.rank + 1.0, np.float32))
        restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
        sys.stdout.write(f"{ring.rank} {restart} {total[0]}\n")  # one write: lines stay whole
        sys.stdout.flush()


if __name__ == "__main__":
    main()
