"""`ringlib demo`, the job `make demo` runs: the compiled core on real data.

It plays four ranks' gradients for a small convolutional network, averages them with
reduce_into the way a ring's steps do (sum, then a fused mean on the last pass), checks
the result against a float64 reference, and prints the core's throughput beside numpy's.
"""

from __future__ import annotations

import time

import numpy as np

from .partition import chunk_bounds
from .reduce import reduce_into

# Parameter shapes of a small CNN for 28x28 digits: conv 1->16->32, then 1568->128->10.
MODEL_SHAPES = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (128, 1568), (128,), (10, 128), (10,)]
RANKS = 4


def _check_mean(grads: list[list[np.ndarray]]) -> float:
    """Average the ranks' gradients chunk by chunk as ring steps do; return max abs error."""
    worst = 0.0
    for per_rank in zip(*grads):
        acc = per_rank[0].copy()
        flat = acc.reshape(-1)
        bounds = chunk_bounds(flat.size, RANKS)
        for lo, hi in zip(bounds, bounds[1:]):
            for step, g in enumerate(per_rank[1:], start=2):
                op = "mean" if step == RANKS else "sum"
                reduce_into(flat[lo:hi], g.reshape(-1)[lo:hi], op, count=RANKS)
        reference = np.mean([g.astype(np.float64) for g in per_rank], axis=0)
        worst = max(worst, float(np.max(np.abs(acc - reference), initial=0.0)))
    return worst


def run_demo(seed: int | None = None) -> int:
    """Run the demo; return the process exit status (0 when every check passed)."""
    seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in MODEL_SHAPES] for _ in range(RANKS)]
    n_params = sum(int(np.prod(s)) for s in MODEL_SHAPES)
    start = time.perf_counter()
    error = _check_mean(grads)
    elapsed = time.perf_counter() - start
    ok = error <= 1e-6
    print(f"ringlib demo (seed {seed})")
    print(f"  mean of {RANKS} ranks' gradients, {n_params:,} float32 parameters in "
          f"{len(MODEL_SHAPES)} tensors, chunked as a {RANKS}-rank ring: "
          f"max |error| vs float64 {error:.2e} ... {'ok' if ok else 'FAILED'} ({elapsed * 1e3:.0f} ms)")

    from ringlib.bench.kernels import format_table, run

    print("\ncompiled core vs numpy / torch (medians, measured side by side):")
    cases = [("float32", "sum"), ("float32", "max"), ("bfloat16", "sum")]
    print(format_table(run([1 << 10, 1 << 20, 16 << 20], cases, seed, progress=False)))
    return 0 if ok else 1
