"""A rank that brings up a torch.distributed Gloo group first (env://, from RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as Ray Train's workers have one), then calls
ringlib.init(): the ring forms through that group's store. Prints `RANK ok` when its
all-reduce of random rows drawn from (seed, rank) matches the float64 reference."""

from __future__ import annotations

import sys

import numpy as np
import torch.distributed as dist

import ringlib


def main() -> None:
    seed = int(sys.argv[1])
    dist.init_process_group("gloo")
    with ringlib.init() as ring:
        assert (ring.rank, ring.world_size) == (dist.get_rank(), dist.get_world_size())
        rows = [np.random.default_rng([seed, r]).standard_normal(500).astype(np.float32)
                for r in range(ring.world_size)]
        total = ring.all_reduce(rows[ring.rank].copy())
        ok = np.allclose(total, np.sum(np.array(rows, np.float64), axis=0), rtol=1e-5, atol=1e-5)
        print(ring.rank, "ok" if ok else "WRONG", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
