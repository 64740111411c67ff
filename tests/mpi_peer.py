"""One rank under a real mpirun: join the ring with no MASTER_ADDR, sum a random vector
drawn from (seed, rank), check it against the float64 reference, and write
`RANK ok ADDRESS_OF_RANK_0 DERIVED_SEED` (the seed the job id alone would give) to the
file named RANK in the directory given (mpirun interleaves the ranks' own output)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import ringlib
from ringlib.runtime.environment import placement


def main() -> None:
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    with ringlib.init() as ring:
        mine = np.random.default_rng([seed, ring.rank]).standard_normal(1000).astype(np.float32)
        total = ring.all_reduce(mine.copy())
        rows = [np.random.default_rng([seed, r]).standard_normal(1000).astype(np.float32)
                for r in range(ring.world_size)]
        reference = np.sum(np.array(rows, np.float64), axis=0)
        ok = np.allclose(total, reference, rtol=1e-5, atol=1e-5)
        (out / str(ring.rank)).write_text(f"{ring.rank} {'ok' if ok else 'WRONG'} {ring.peers[0]} "
                                          f"{placement(env=os.environ).seed}\n")


if __name__ == "__main__":
    main()
