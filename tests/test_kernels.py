"""The compiled core against a float64 reference: every op x dtype on random sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ringlib
from references import DTYPES, FLOATS, INTS, OPS, as_float64, operand, reference, rounded_like, ulp

PRIMES = [2, 3, 5, 7, 31, 127, 8191, 65521, 1_048_573]
SIZES = st.one_of(
    st.sampled_from([0, 1] + PRIMES + [(1 << 20) + 1, 1_300_021]),
    st.integers(0, 5000),
)


def check(op: str, dtype: str, n: int, seed: int, count: int, specials: bool) -> None:
    rng = np.random.default_rng(seed)
    a, b = operand(dtype, n, rng, specials), operand(dtype, n, rng, specials)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, overflow: part of the data
        expected = reference(op, a, b, count)
    result = ringlib.reduce_into(a.clone() if isinstance(a, torch.Tensor) else a.copy(), b, op,
                                 count=count)
    got = as_float64(result)
    if dtype in INTS:
        np.testing.assert_array_equal(result, expected.astype(dtype))
    elif op == "mean":
        # (a + b) / count rounds twice: the sum by at most 1/2 ulp of the sum, which the
        # division shrinks to at most 1 ulp of the quotient (ulp(s / count) >= ulp(s) /
        # (2 count)), then the quotient by 1/2 ulp: within 1.5 ulp of the dtype in all.
        with np.errstate(invalid="ignore"):
            close = np.abs(got - expected) <= 1.5 * ulp(expected, a)
        same_special = (np.isnan(got) & np.isnan(expected)) | (got == expected)
        assert np.all(close | same_special), f"mean off by more than 1.5 ulp for {dtype}"
    else:
        # One operation, computed exactly then rounded once: equal to the rounded reference.
        np.testing.assert_array_equal(got, rounded_like(expected, a))


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), dtype=st.sampled_from(DTYPES), n=SIZES,
       seed=st.integers(0, 2**32 - 1), count=st.integers(1, 8), specials=st.booleans())
def test_every_op_and_dtype_matches_the_float64_reference(op, dtype, n, seed, count, specials):
    if op == "mean" and dtype in INTS:
        return  # integer mean is an error, tested below
    check(op, dtype, n, seed, count, specials and dtype in FLOATS)


# Integer mean is an error, tested in test_reduce_inputs.
DEFINED = [(op, d) for op in OPS for d in DTYPES if not (op == "mean" and d in INTS)]


@pytest.mark.parametrize("op, dtype", DEFINED)
def test_each_op_dtype_pair_on_a_large_prime_size(op, dtype, seed):
    check(op, dtype, 1_048_573, seed, count=3, specials=dtype in FLOATS)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_types_are_bit_exact_with_torch_rounding_of_the_float32_result(op, half, rng):
    n = int(rng.integers(1, 300_000))
    a = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 100).to(half)
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 100).to(half)
    a[:: max(1, n // 7)] = float("inf")
    b[:: max(1, n // 11)] = float("nan")
    x, y = a.float(), b.float()
    float32_result = {"sum": x + y, "prod": x * y, "min": torch.minimum(x, y),
                      "max": torch.maximum(x, y), "mean": (x + y) / 3}[op]
    expected = float32_result.to(half)
    got = ringlib.reduce_into(a.clone(), b, op, count=3)
    nan = torch.isnan(expected)
    # torch writes NaN as 0x7FC0 or 0xFFFF depending on its code path: compare NaN-ness.
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
