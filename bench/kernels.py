"""Reduce-into throughput of the compiled core against numpy and torch, side by side.

    ringlib bench kernels [--sizes 1KiB,1MiB,64MiB] [--no-cold-start]

Each row times ringlib.reduce_into and its baseline alternately in one run (medians),
so the ratio holds on a noisy machine: numpy's in-place ufunc for the numpy dtypes,
torch's in-place op for float16 and bfloat16. GB/s counts the bytes of dst and src read
and dst written. The cold-start line times the first reduce_into in fresh processes
after Numba's on-disk cache is warm.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

import ringlib
from ringlib.dtypes import lookup

from .timing import format_size, interleaved_medians, parse_size, repeat_for

NUMPY_UFUNCS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}
TORCH_DTYPES = ("float16", "bfloat16")  # numpy has no bfloat16: compare these with torch
DEFAULT_CASES = [(d, "sum") for d in ("float32", "float64", "int8", "uint8", "int32", "int64",
                                       "float16", "bfloat16")]
DEFAULT_CASES += [("float32", op) for op in ("prod", "min", "max")]


@dataclass
class Row:
    dtype: str
    op: str
    nbytes: int
    ringlib_s: float
    baseline: str
    baseline_s: float

    @property
    def ratio(self) -> float:
        """How many times faster ringlib is than the baseline (>1: ringlib is faster)."""
        return self.baseline_s / self.ringlib_s

    def gbps(self, seconds: float) -> float:
        return 3 * self.nbytes / seconds / 1e9


def _operands(dtype: str, nbytes: int, rng: np.random.Generator):
    n = nbytes // _itemsize(dtype)
    if dtype in TORCH_DTYPES:
        import torch

        make = lambda: torch.from_numpy(rng.standard_normal(n, np.float32)).to(getattr(torch, dtype))
        return make(), make()
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    info = np.iinfo(dtype)
    return tuple(rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True) for _ in "ab")


def _itemsize(dtype: str) -> int:
    return lookup(dtype).itemsize


def _baseline(dtype: str, op: str, dst, src) -> tuple[str, Callable[[], object]]:
    if dtype in TORCH_DTYPES:
        import torch

        torch_ops = {"sum": torch.Tensor.add_, "prod": torch.Tensor.mul_,
                     "min": lambda a, b: torch.minimum(a, b, out=a),
                     "max": lambda a, b: torch.maximum(a, b, out=a)}
        return f"torch ({torch.get_num_threads()} thr)", lambda: torch_ops[op](dst, src)
    ufunc = NUMPY_UFUNCS[op]
    return "numpy", lambda: ufunc(dst, src, out=dst)


def measure(dtype: str, op: str, nbytes: int, rng: np.random.Generator) -> Row:
    """Time reduce_into against its baseline on fresh random operands of `nbytes` each."""
    dst, src = _operands(dtype, nbytes, rng)
    name, baseline = _baseline(dtype, op, dst, src)
    ours = lambda: ringlib.reduce_into(dst, src, op)
    ours_s, base_s = interleaved_medians([ours, baseline], repeat_for(nbytes))
    return Row(dtype, op, nbytes, ours_s, name, base_s)


def cold_start_ms(runs: int = 5) -> tuple[float, float]:
    """Median (import ms, first-call ms) of a float32 reduce_into in fresh processes."""
    probe = ("import time; t0 = time.perf_counter(); import numpy as np, ringlib; "
             "t1 = time.perf_counter(); a = np.ones(1024, np.float32); "
             "ringlib.reduce_into(a, a.copy()); t2 = time.perf_counter(); "
             "print((t1 - t0) * 1e3, (t2 - t1) * 1e3)")
    samples = []
    for _ in range(runs + 1):  # the first run fills the cache if it is cold
        out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                             text=True).stdout.split()
        samples.append((float(out[0]), float(out[1])))
    imports, firsts = zip(*samples[1:])
    return statistics.median(imports), statistics.median(firsts)


def format_table(rows: list[Row]) -> str:
    head = (f"{'dtype':>9} {'op':>5} {'size':>8} {'ringlib us':>11} {'GB/s':>6} "
            f"{'baseline':>15} {'base us':>10} {'GB/s':>6} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.dtype:>9} {r.op:>5} {format_size(r.nbytes):>8} "
                     f"{r.ringlib_s * 1e6:>11.1f} {r.gbps(r.ringlib_s):>6.1f} {r.baseline:>15} "
                     f"{r.baseline_s * 1e6:>10.1f} {r.gbps(r.baseline_s):>6.1f} {r.ratio:>5.2f}x")
    return "\n".join(lines)


def run(sizes: list[int], cases: list[tuple[str, str]], seed: int, progress: bool = True) -> list[Row]:
    """Measure every (dtype, op) case at every size; rows in case-major order."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    grid = [(d, op, s) for d, op in cases for s in sizes]
    return [measure(d, op, s, rng) for d, op, s in tqdm(grid, disable=not progress,
                                                        desc="reduce_into", file=sys.stderr)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ringlib bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1KiB,1MiB,64MiB",
                        help="comma-separated buffer sizes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="operand seed (default: fresh)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch's intra-op threads for its baseline (default: torch's own)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip timing the first call in fresh processes")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(format_table(run(sizes, DEFAULT_CASES, seed)))
    print(f"seed {seed}; ratio = baseline time / ringlib time (>1: ringlib faster)")
    if not args.no_cold_start:
        import_ms, first_ms = cold_start_ms()
        print(f"cold start, cache warm (median of 5 fresh processes): import ringlib "
              f"{import_ms:.0f} ms, first reduce_into {first_ms:.1f} ms")


if __name__ == "__main__":
    main()
