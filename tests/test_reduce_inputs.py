"""reduce_into's inputs: numpy, torch and raw byte buffers, zero-copy reads, bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import zmq

import ringlib
from ringlib.dtypes import lookup, raw_storage


def test_numpy_arrays_of_any_shape_are_reduced_in_place_and_returned(rng):
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((3, 4, 5)).astype(np.float32)
    expected = a + b
    out = ringlib.reduce_into(a, b)
    assert out is a
    np.testing.assert_array_equal(a, expected)


def test_torch_tensors_including_ones_that_require_grad(rng):
    weight = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32)))
    before = weight.detach().clone()
    src = torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32))
    ringlib.reduce_into(weight.data, src, "max")
    assert torch.equal(weight.detach(), torch.maximum(before, src))


def test_a_bytes_source_is_read_as_the_destination_dtype(rng):
    a = rng.standard_normal(1001)
    b = rng.standard_normal(1001)
    expected = np.minimum(a, b)
    ringlib.reduce_into(a, b.tobytes(), "min")
    np.testing.assert_array_equal(a, expected)


def test_a_received_zmq_frame_is_reduced_straight_from_its_buffer(rng):
    """A real zmq frame, received without copying, is the source: no intermediate copy."""
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        rx.bind("inproc://reduce-frame")
        tx.connect("inproc://reduce-frame")
        payload = rng.standard_normal(100_000).astype(np.float32)
        tx.send(payload, copy=False)
        frame = rx.recv(copy=False)
        dst = rng.standard_normal(100_000).astype(np.float32)
        expected = dst.astype(np.float64) + payload
        ringlib.reduce_into(dst, frame)
        np.testing.assert_array_equal(dst, expected.astype(np.float32))
        view = raw_storage(frame, lookup("float32"))
        assert view.ctypes.data == np.frombuffer(frame.buffer, np.uint8).ctypes.data
    finally:
        tx.close(linger=0)
        rx.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reducing_from_bytes_allocates_no_copy_of_the_source(dtype):
    n = 4 << 20
    dst = torch.ones(n, dtype=torch.bfloat16) if dtype == "bfloat16" else np.ones(n, np.float32)
    src = bytes(n * lookup(dtype).itemsize)  # zeros
    ringlib.reduce_into(dst[:16], src[: 16 * lookup(dtype).itemsize])  # load the kernels first
    tracemalloc.start()
    try:
        ringlib.reduce_into(dst, src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, f"reduce_into allocated {peak} bytes for a {len(src)}-byte source"


@pytest.mark.parametrize(
    "dst, src, error, words",
    [
        (np.ones(4, np.complex64), np.ones(4, np.complex64), TypeError, "complex64 is not supported"),
        (np.ones(4, np.int16), np.ones(4, np.int16), TypeError, "int16 is not supported"),
        (np.ones(4, bool), np.ones(4, bool), TypeError, "bool is not supported"),
        (np.ones(8, np.float32)[::2], np.ones(4, np.float32), ValueError, "not C-contiguous"),
        (np.ones(4, np.float32), np.ones(8, np.float32)[::2], ValueError, "not C-contiguous"),
        (np.ones(4, np.float32), np.ones(5, np.float32), ValueError, "src has 5 elements but dst has 4"),
        (np.ones(4, np.float32), np.ones(4, np.float64), TypeError, "src dtype float64 differs"),
        (np.ones(4, np.float32), b"\0" * 15, ValueError, "15 bytes"),
        (np.ones(4, np.float32), "abcd", TypeError, "bytes-like"),
        ([1.0, 2.0], np.ones(2), TypeError, "numpy array or torch tensor"),
        (torch.ones(4, 4).t(), torch.ones(4, 4), ValueError, "not contiguous"),
        (torch.ones(4, dtype=torch.complex64), torch.ones(4), TypeError, "complex64 is not supported"),
        (np.arange(5, dtype=">f4"), np.ones(5, np.float32), TypeError, "dst is float32 in non-native"),
        (np.ones(5, np.float32), np.arange(5, dtype=">f4"), TypeError, "src is float32 in non-native"),
        (np.ones(3, ">i8"), np.ones(3, ">i8"), TypeError, r"non-native byte order \('>i8'\)"),
    ],
)
def test_bad_buffers_raise_before_any_work(dst, src, error, words):
    before = dst.copy() if isinstance(dst, np.ndarray) else None
    with pytest.raises(error, match=words) as info:
        ringlib.reduce_into(dst, src)
    assert isinstance(info.value, ringlib.RingError)
    if before is not None:
        np.testing.assert_array_equal(dst, before)


def test_a_read_only_destination_is_refused():
    dst = np.zeros(4, np.float32)
    dst.flags.writeable = False
    with pytest.raises(ringlib.InvalidBuffer, match="read-only"):
        ringlib.reduce_into(dst, np.ones(4, np.float32))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64"])
def test_integer_mean_is_a_clear_error(dtype):
    with pytest.raises(ringlib.UnsupportedOp, match=f"mean is undefined for integer dtype {dtype}"):
        ringlib.reduce_into(np.ones(3, dtype), np.ones(3, dtype), "mean")


@pytest.mark.parametrize("op", ["avg", "SUM", None, 3])
def test_unknown_ops_name_the_valid_ones(op):
    with pytest.raises(ringlib.UnsupportedOp, match="expected one of 'sum', 'mean'"):
        ringlib.reduce_into(np.ones(3), np.ones(3), op)


@pytest.mark.parametrize("count", [0, -2, 1.5])
def test_mean_needs_a_positive_whole_count(count):
    with pytest.raises(ringlib.UnsupportedOp, match="positive whole count"):
        ringlib.reduce_into(np.ones(3), np.ones(3), "mean", count=count)


def test_op_enum_members_and_names_are_interchangeable():
    a = np.array([1.0, 5.0])
    ringlib.reduce_into(a, np.array([3.0, 2.0]), ringlib.Op.MAX)
    np.testing.assert_array_equal(a, [3.0, 5.0])
    assert ringlib.Op.parse("prod") is ringlib.Op.PROD


def test_empty_buffers_are_fine():
    a = np.empty(0, np.float32)
    assert ringlib.reduce_into(a, b"") is a
