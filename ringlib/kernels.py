"""Compiled reduce-into kernels: `out[i] = op(out[i], src[i])` for i < n.

Each kernel is a pure `(out, src, n)` function (mean adds `count`) with no I/O, compiled
by Numba with `nogil=True`, so the ring can run it in a worker thread while the event loop
keeps moving bytes, and with `cache=True`, so a new process loads it instead of compiling.
One kernel per op serves every dtype: Numba specialises it on the storage type, and
`apply` below says how a stored element becomes an arithmetic value and back.

Half-precision values have no Numba type on the CPU, so they travel as integers: int16
storage holds float16 bits, uint16 storage one bfloat16, and uint32 storage two bfloat16
(the fast path; see apply). None of these is a user dtype, so the storage type alone names
the codec. Half types compute in float32 and round back to nearest-even once, as torch does.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_JIT = dict(nogil=True, cache=True, boundscheck=False)
_I16, _I32 = ir.IntType(16), ir.IntType(32)


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """float16 bits (int16) to float32, exactly (fpext; F16C where the CPU has it)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, value):
    """float32 to float16 bits (int16), rounded to nearest-even (fptrunc)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.int16(types.float32), codegen


def _i32(value):
    return ir.Constant(_I32, value)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) to float32: they are the top half of the float32."""

    def codegen(context, builder, signature, args):
        word = builder.shl(builder.zext(args[0], _I32), _i32(16))
        return builder.bitcast(word, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_low_to_f32(typingctx, word):
    """The bfloat16 in the low half of a 32-bit word, as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.shl(args[0], _i32(16)), ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bf16_high_to_f32(typingctx, word):
    """The bfloat16 in the high half of a 32-bit word, as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.and_(args[0], _i32(0xFFFF0000)), ir.FloatType())

    return types.float32(types.uint32), codegen


def _round_bf16_ir(builder, value):
    """IR for a float32 rounded to bfloat16 as torch's c10::BFloat16 does, in the top 16
    bits of an i32: NaN becomes 0x7FC0, anything else rounds to nearest-even by adding
    0x7FFF plus the lowest kept bit before truncation. i32 lanes, so it vectorises."""
    bits = builder.bitcast(value, _I32)
    lowest_kept = builder.and_(builder.lshr(bits, _i32(16)), _i32(1))
    rounded = builder.add(builder.add(bits, _i32(0x7FFF)), lowest_kept)
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.select(is_nan, _i32(0x7FC00000), rounded)


@intrinsic
def _f32_to_bf16(typingctx, value):
    """float32 to bfloat16 bits (uint16), rounded as torch rounds."""

    def codegen(context, builder, signature, args):
        return builder.trunc(builder.lshr(_round_bf16_ir(builder, args[0]), _i32(16)), _I16)

    return types.uint16(types.float32), codegen


@intrinsic
def _f32_pair_to_bf16(typingctx, lo, hi):
    """Two float32 rounded to bfloat16 and packed into one word, `lo` in the low half."""

    def codegen(context, builder, signature, args):
        low = builder.lshr(_round_bf16_ir(builder, args[0]), _i32(16))
        high = builder.and_(_round_bf16_ir(builder, args[1]), _i32(0xFFFF0000))
        return builder.or_(low, high)

    return types.uint32(types.float32, types.float32), codegen


def apply(op, a, b, count):
    """`op` (a literal name) on stored elements `a` and `b`, decoded to arithmetic values
    and encoded back to the storage type; `count` is the divisor of "mean"."""


@overload(apply, prefer_literal=True, jit_options=_JIT)
def _apply(op, a, b, count):
    combine = _COMBINE[op.literal_value]
    if a == types.int16:

        def apply_f16(op, a, b, count):
            return _f32_to_f16_bits(combine(_f16_bits_to_f32(a), _f16_bits_to_f32(b), count))

        return apply_f16
    if a == types.uint16:

        def apply_bf16(op, a, b, count):
            return _f32_to_bf16(combine(_bf16_to_f32(a), _bf16_to_f32(b), count))

        return apply_bf16
    if a == types.uint32:

        def apply_bf16_pair(op, a, b, count):
            # Two bfloat16 in one 32-bit word: element 2k in the low half, 2k+1 in the high
            # half (little-endian). Both lanes decode, compute and round in 32-bit lanes,
            # which AVX2 vectorises without the 32-to-16-bit packing a 16-bit loop needs.
            lo = combine(_bf16_low_to_f32(a), _bf16_low_to_f32(b), count)
            hi = combine(_bf16_high_to_f32(a), _bf16_high_to_f32(b), count)
            return _f32_pair_to_bf16(lo, hi)

        return apply_bf16_pair
    return lambda op, a, b, count: combine(a, b, count)


@njit(inline="always")
def _add(a, b, count):
    return a + b


@njit(inline="always")
def _mul(a, b, count):
    return a * b


def _extremum(kind):
    """An intrinsic for the NaN-propagating min or max (`kind`) of two equal-typed values.

    LLVM's own llvm.minimum/maximum (floats) and llvm.smin/umin/smax/umax (integers):
    a select written in Python lets LLVM turn `out[i] = out[i] if ... else src[i]` into
    masked stores, which are several times slower than numpy on AMD cores.
    """

    @intrinsic
    def extremum(typingctx, a, b):
        if a != b:
            return None

        def codegen(context, builder, signature, args):
            ty = args[0].type
            if isinstance(a, types.Float):
                name = f"llvm.{kind}imum.f{a.bitwidth}"  # NaN-propagating, as numpy's
            else:
                name = f"llvm.{'s' if a.signed else 'u'}{kind}.i{a.bitwidth}"
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]), name)
            return builder.call(fn, args)

        return a(a, b), codegen

    return extremum


_minimum, _maximum = _extremum("min"), _extremum("max")


@njit(inline="always")
def _smaller(a, b, count):
    return _minimum(a, b)


@njit(inline="always")
def _larger(a, b, count):
    return _maximum(a, b)


@njit(inline="always")
def _add_then_divide(a, b, count):
    return (a + b) / count


_COMBINE = {"sum": _add, "prod": _mul, "min": _smaller, "max": _larger, "mean": _add_then_divide}


@njit(**_JIT)
def sum_into(out, src, n):
    """out[:n] += src[:n]."""
    for i in range(n):
        out[i] = apply("sum", out[i], src[i], 1)


@njit(**_JIT)
def prod_into(out, src, n):
    """out[:n] *= src[:n]."""
    for i in range(n):
        out[i] = apply("prod", out[i], src[i], 1)


@njit(**_JIT)
def min_into(out, src, n):
    """out[:n] = minimum(out[:n], src[:n]), NaN-propagating."""
    for i in range(n):
        out[i] = apply("min", out[i], src[i], 1)


@njit(**_JIT)
def max_into(out, src, n):
    """out[:n] = maximum(out[:n], src[:n]), NaN-propagating."""
    for i in range(n):
        out[i] = apply("max", out[i], src[i], 1)


@njit(**_JIT)
def mean_into(out, src, n, count):
    """out[:n] = (out[:n] + src[:n]) / count: the last pass of a sum over `count` ranks,
    with the scaling fused in so the data is read once. `count` has the arithmetic type."""
    for i in range(n):
        out[i] = apply("mean", out[i], src[i], count)
