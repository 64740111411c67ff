"""The soak (bench/soak.py): a shorter run of random collectives across 3 real processes,
up to 4 in flight at once, every result checked and each rank's peak resident growth
bounded; its failures carry the seed; and the check it relies on, on its own, catches
wrong results without false alarms.

The full run (10,000 collectives one at a time) is `make soak`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leftovers import assert_none_left, tagged_env
from ringlib import chunk_bounds
from ringlib.bench.soak_rank import INTS, Collective, combinations, inputs, mismatch, soak_dtypes

COLLECTIVES = 1500  # about 8 s on the 2-core machine, twice that while other runs load it
GROWTH_MB = 20


def soak(tmp_path: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run the soak with a tag in its environment; check that no process outlives it."""
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([sys.executable, "-m", "ringlib.bench.soak", "-n", "3", *args],
                         env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=timeout)
    assert_none_left(tag)
    return run


@pytest.mark.timeout(120)
def test_every_result_is_checked_and_no_rank_grows_by_20_mb(tmp_path, seed):
    out = tmp_path / "soak.json"
    run = soak(tmp_path, "--collectives", str(COLLECTIVES), "--in-flight", "4",
               "--seed", str(seed), "--max-growth-mb", str(GROWTH_MB), "--json", str(out))
    assert run.returncode == 0, f"seed {seed}\n{run.stdout}\n{run.stderr}"
    assert f"seed {seed}" in run.stdout
    result = json.loads(out.read_text())
    ranks = result["per_rank"]
    assert [r["checked"] for r in ranks] == [COLLECTIVES] * 3, f"seed {seed}: {ranks}"
    assert len({r["digest"] for r in ranks}) == 1, f"seed {seed}: ranks disagree: {ranks}"
    growth = [r["growth_bytes"] / 1e6 for r in ranks]
    assert max(growth) < GROWTH_MB, f"seed {seed}: peak RSS growth {growth} MB"
    assert result["problems"] == []


@pytest.mark.timeout(60)
def test_a_failed_run_exits_non_zero_naming_its_seed_and_leaves_no_process(tmp_path, seed):
    run = soak(tmp_path, "--collectives", "20", "--warmup", "10", "--seed", str(seed),
               "--max-growth-mb", "0")  # every rank grows by 0 bytes or more
    assert run.returncode == 1, run.stderr
    assert f"soak failed, seed {seed}" in run.stderr
    assert f"--seed {seed}" in run.stderr  # the command that replays it


def correct(c: Collective, xs: list[np.ndarray], rank: int) -> np.ndarray:
    """Rank's right answer to c: the float64 (int64) reference rounded to the dtype."""
    if c.kind == "all_gather":
        return np.stack(xs)
    if c.kind == "broadcast":
        return xs[c.root].copy()
    wide = np.stack([x.astype(np.int64 if c.dtype in INTS else np.float64) for x in xs])
    full = getattr(wide, c.op)(axis=0).astype(xs[0].dtype)
    lo, hi = chunk_bounds(c.count, len(xs))[rank:rank + 2] if c.kind == "reduce_scatter" \
        else (0, c.count)
    return full[lo:hi]


def spoiled(x: np.ndarray, c: Collective) -> np.ndarray:
    """x with its last element off: by one for integers, by 1000 for floats (far beyond
    any tolerance, even where the inputs cancel)."""
    x = x.copy()
    flat = x.reshape(-1)
    flat[-1] = flat[-1] ^ 1 if c.dtype in INTS else flat[-1] + np.float32(1000)
    return x


@pytest.mark.parametrize("kind, dtype, op", combinations(soak_dtypes()))
def test_the_check_passes_right_results_and_catches_one_wrong_element(kind, dtype, op, seed):
    world = 3
    c = Collective(1, kind, dtype, 1001, op, root=2)
    xs = inputs(seed, c, world)
    for rank in range(world):
        right = correct(c, xs, rank)
        assert mismatch(c, right, xs, rank) is None, f"seed {seed}, {c} on rank {rank}"
        why = mismatch(c, spoiled(right, c), xs, rank)
        assert why is not None and f"{c} on rank {rank}: element {right.size - 1} " in why


def test_the_check_catches_a_misplaced_chunk(seed):
    c = Collective(1, "reduce_scatter", "float32", 1000, "sum")
    xs = inputs(seed, c, 3)
    why = mismatch(c, correct(c, xs, 0)[:-1], xs, 1)  # rank 0's chunk, one shorter, on rank 1
    assert why is not None and "element 0 " in why
