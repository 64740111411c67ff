"""The benchmark's pieces that need no ranks: its correctness check, its memory probe, its
table arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ringlib.bench import memory
from ringlib.bench.systems import Case, check, pattern, reference
from ringlib.bench.table import Row, Table

MIB = 1 << 20


@pytest.mark.parametrize("collective", ["allreduce", "reduce_scatter", "all_gather",
                                        "broadcast", "latency"])
def test_the_reference_is_what_a_correct_collective_leaves_on_each_rank(collective, rng):
    world = int(rng.integers(2, 6))
    count = world * int(rng.integers(1, 50))
    rank = int(rng.integers(0, world))
    case = Case(collective, count, "float32", "sum", rank, world)
    inputs = [pattern(r, count) for r in range(world)]
    assert len({tuple(x) for x in inputs}) == world  # no two ranks' inputs alike
    total = np.sum(inputs, axis=0)
    part = slice(rank * count // world, (rank + 1) * count // world)
    expected = {"allreduce": total, "reduce_scatter": total[part],
                "all_gather": np.concatenate([pattern(r, count // world) for r in range(world)]),
                "broadcast": inputs[0], "latency": inputs[0]}[collective]
    np.testing.assert_array_equal(reference(case), expected)
    check("ringlib", case, expected.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_a_misplaced_chunk_or_a_wrong_shape_fails_the_check_naming_system_and_rank(dtype):
    case = Case("allreduce", 10, dtype, "sum", 1, 2)
    good = reference(case)
    swapped = np.concatenate([good[5:], good[:5]])  # both halves, each in the other's place
    as_buffer = (lambda a: torch.from_numpy(a).to(torch.bfloat16)) if dtype == "bfloat16" \
        else (lambda a: a.astype(dtype))
    check("gloo", case, as_buffer(good))
    with pytest.raises(AssertionError, match="rank 1: gloo allreduce sum of 10 .*wrong elements"):
        check("gloo", case, as_buffer(swapped))
    with pytest.raises(AssertionError, match="got \\(9,\\), expected \\(10,\\)"):
        check("gloo", case, as_buffer(good[:9]))


@pytest.mark.parametrize("op", ["prod", "mean", "min", "max"])
def test_every_op_has_a_reference_that_a_wrong_value_fails(op):
    case = Case("allreduce", 1000, "float16", op, 0, 4)
    exact = reference(case)
    inputs = np.stack([pattern(r, 1000, op) for r in range(4)])
    np.testing.assert_allclose(exact, getattr(inputs, op)(axis=0))
    check("mpi", case, exact.astype(np.float16))  # rounded to float16: within the tolerance
    with pytest.raises(AssertionError):
        check("mpi", case, (exact * (1 + 2.0 ** -5)).astype(np.float16))


@pytest.mark.skipif(not memory.supported(), reason="needs Linux's /proc/self/clear_refs")
async def test_peak_growth_sees_what_a_call_holds_for_a_moment_and_not_what_it_does_not():
    async def holds_32_mib() -> None:
        np.ones(32 * MIB, np.uint8)  # touched, then freed at once

    async def holds_nothing() -> None:
        pass

    grown = await memory.peak_growth(holds_32_mib)
    assert 31 * MIB <= grown < 40 * MIB  # a few pages may have been resident already
    assert await memory.peak_growth(holds_nothing) < 4 * MIB
    # Freed memory the allocator kept is trimmed first, so reusing it still counts.
    kept = [np.ones(MIB // 2, np.uint8) for _ in range(64)]
    del kept
    assert await memory.peak_growth(holds_32_mib) >= 31 * MIB


def test_the_table_gives_nccl_bandwidths_and_ringlibs_time_over_each_others():
    table = Table("allreduce", "float32", 4, ["ringlib", "gloo", "mpi"])
    row = Row.from_message({
        "bytes": 16 * MIB, "count": 4 * MIB, "iters": 7, "algo": "ring", "results": [
            {"label": "ringlib", "p50": 0.01, "p99": 0.02, "peak_bytes": 3 * MIB},
            {"label": "gloo", "p50": 0.02, "p99": 0.03, "peak_bytes": None}]})
    cells = table.line(row).split()
    algbw = 16 * MIB / 0.01 / 1e9
    assert cells[:4] == ["16", "MiB", "4194304", "float32"]
    assert cells[5:11] == ["10000.0", "20000.0", f"{algbw:.3f}", f"{algbw * 1.5:.3f}", "3.0",
                           "ring"]
    assert cells[11:] == ["20000.0", "0.50", "-", "-"]  # gloo took twice as long; no mpi
    assert "ringlib/gloo" in table.header() and "ringlib/mpi" in table.header()
