"""Storage formats: how a kernel reads a value from its data arrays and writes one back.

Numba has no float16 arithmetic on the CPU, and no bfloat16 type at all, so low-precision
tensors reach the kernels as uint16 views of their bits. Every kernel takes a storage format
argument, `fmt`, and loads with ``decode(fmt, v)`` and stores with ``encode(fmt, v)``:

- NATIVE (float32, float64): both are the identity, so the kernels compile to what they were;
- BFLOAT16: decode is a 16-bit shift, encode rounds a float32 to nearest even;
- FLOAT16: full IEEE binary16 conversion, subnormals, infinities and NaN included.

Each format is a value of its own Numba type (see NATIVE), so one kernel source compiles once
per format, and all arithmetic between load and store happens in float32 (float64 for the sums),
as in PyTorch's reduced-precision CPU kernels. The conversions are branch-free LLVM IR with
32-bit integer arithmetic, so the loops around them still vectorize.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import errors
from numba.extending import intrinsic, overload

__all__ = ["NATIVE", "BFLOAT16", "FLOAT16", "decode", "deviation", "encode"]


# Each format is a NumPy scalar of a dtype of its own, whose Numba type stands for the
# format: one kernel source compiles once per format. A NumPy scalar because Numba's dispatcher
# types those in C, while an object of a class registered with typeof_impl costs a Python-level
# typeof on every call: 1.5 us against 0.2 us per kernel call, a third of a (2, 4, 8, 8)
# module call. The values are never read.
NATIVE = np.int8(0)
BFLOAT16 = np.int16(0)
FLOAT16 = np.int32(0)
_TYPES = {"native": types.int8, "bfloat16": types.int16, "float16": types.int32}


# ----------------------------------------------------------------------------- bit patterns

_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _i32(value):
    return ir.Constant(_I32, value)


def _check_bits(bits):
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        raise errors.TypingError(f"expected 16-bit integer bits, got {bits}")


def _check_float32(value):
    if value != types.float32:
        # A float64 value would be rounded twice (to float32, then to 16 bits); the kernels
        # compute in float32 for low-precision formats, so this is a bug where it happens.
        raise errors.TypingError(f"expected a float32 value to encode, got {value}")


@intrinsic
def bfloat16_bits_to_float32(typingctx, bits):
    """The float32 with the same value: bfloat16 is float32's upper half."""
    _check_bits(bits)

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], _I32)
        return builder.bitcast(builder.shl(wide, _i32(16)), _F32)

    return types.float32(bits), codegen


@intrinsic
def float32_to_bfloat16_bits(typingctx, value):
    """bfloat16 bits of a float32, rounded to nearest, ties to even; a NaN stays a quiet NaN
    of the same sign, and values beyond the largest bfloat16 round to infinity."""
    _check_float32(value)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        upper = builder.lshr(bits, _i32(16))
        # Adding 0x7FFF plus the kept part's lowest bit carries into the kept part exactly
        # when the dropped half is above one half, or equal to it with an odd kept part.
        lowest = builder.and_(upper, _i32(1))
        rounded = builder.lshr(builder.add(builder.add(bits, _i32(0x7FFF)), lowest), _i32(16))
        # Rounding could carry a NaN's payload into the sign or clear it to an infinity.
        quiet_nan = builder.or_(upper, _i32(0x0040))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), _I16)

    return types.uint16(value), codegen


@intrinsic
def float16_bits_to_float32(typingctx, bits):
    """The float32 with the same value as IEEE binary16 bits (every half value is exact in
    float32); a NaN keeps its payload."""
    _check_bits(bits)

    def codegen(context, builder, signature, args):
        half = builder.zext(args[0], _I32)
        sign = builder.shl(builder.and_(half, _i32(0x8000)), _i32(16))
        magnitude = builder.and_(half, _i32(0x7FFF))
        shifted = builder.shl(magnitude, _i32(13))
        # Normal numbers: move the exponent from bias 15 to bias 127.
        normal = builder.add(shifted, _i32((127 - 15) << 23))
        # Infinity and NaN: the maximal exponent, the mantissa (payload) unchanged.
        special = builder.or_(shifted, _i32(0x7F800000))
        # Subnormals (and zero) are magnitude * 2**-24, computed exactly in float32.
        scaled = builder.fmul(builder.uitofp(magnitude, _F32), ir.Constant(_F32, 2.0 ** -24))
        subnormal = builder.bitcast(scaled, _I32)
        is_special = builder.icmp_unsigned(">=", magnitude, _i32(0x7C00))
        is_subnormal = builder.icmp_unsigned("<", magnitude, _i32(0x0400))
        result = builder.select(is_special, special,
                                builder.select(is_subnormal, subnormal, normal))
        return builder.bitcast(builder.or_(result, sign), _F32)

    return types.float32(bits), codegen


@intrinsic
def float32_to_float16_bits(typingctx, value):
    """IEEE binary16 bits of a float32, rounded to nearest, ties to even: subnormal results
    included, overflow to infinity (from 65520 up), a NaN to a quiet NaN of the same sign."""
    _check_float32(value)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], _I32)
        sign = builder.and_(builder.lshr(bits, _i32(16)), _i32(0x8000))
        magnitude = builder.and_(bits, _i32(0x7FFFFFFF))
        # At or above 2**16 (float32 bits 0x47800000) every finite value rounds to infinity.
        is_nan = builder.icmp_unsigned(">", magnitude, _i32(0x7F800000))
        huge = builder.select(is_nan, _i32(0x7E00), _i32(0x7C00))
        # Normal results: rebias the exponent and round the 13 dropped bits to nearest even
        # (as for bfloat16); a carry out of the mantissa correctly bumps the exponent, up to
        # infinity for 65520 <= |x| < 65536.
        odd = builder.and_(builder.lshr(magnitude, _i32(13)), _i32(1))
        rebiased = builder.add(magnitude, _i32(((15 - 127) << 23) + 0xFFF))
        normal = builder.lshr(builder.add(rebiased, odd), _i32(13))
        # Below 2**-14 the result is subnormal or zero, a multiple of 2**-24. Adding 0.5,
        # whose float32 ulp is 2**-24, lets the FPU round to that multiple (to nearest even);
        # the count of 2**-24 steps is then the low bits (1024 is the smallest normal).
        absolute = builder.bitcast(magnitude, _F32)
        with_half = builder.bitcast(builder.fadd(absolute, ir.Constant(_F32, 0.5)), _I32)
        subnormal = builder.sub(with_half, _i32(0x3F000000))
        is_huge = builder.icmp_unsigned(">=", magnitude, _i32(0x47800000))
        is_subnormal = builder.icmp_unsigned("<", magnitude, _i32(0x38800000))
        result = builder.select(is_huge, huge, builder.select(is_subnormal, subnormal, normal))
        return builder.trunc(builder.or_(result, sign), _I16)

    return types.uint16(value), codegen


# ----------------------------------------------------------------------------- dispatch

def decode(fmt, value):
    """A stored value as a number the kernel computes with (only callable from kernels)."""
    raise NotImplementedError("decode is only available inside Numba kernels")


def encode(fmt, value):
    """A computed number as the value to store (only callable from kernels)."""
    raise NotImplementedError("encode is only available inside Numba kernels")


@overload(decode, inline="always")
def _decode(fmt, value):
    if fmt == _TYPES["native"]:
        return lambda fmt, value: value
    if fmt == _TYPES["bfloat16"]:
        return lambda fmt, value: bfloat16_bits_to_float32(value)
    if fmt == _TYPES["float16"]:
        return lambda fmt, value: float16_bits_to_float32(value)
    return None


@overload(encode, inline="always")
def _encode(fmt, value):
    if fmt == _TYPES["native"]:
        return lambda fmt, value: value
    if fmt == _TYPES["bfloat16"]:
        return lambda fmt, value: float32_to_bfloat16_bits(value)
    if fmt == _TYPES["float16"]:
        return lambda fmt, value: float32_to_float16_bits(value)
    return None


def deviation(fmt, stored, shift):
    """stored - shift as a float64, for the gradient sums (only callable from kernels)."""
    raise NotImplementedError("deviation is only available inside Numba kernels")


@overload(deviation, inline="always")
def _deviation(fmt, stored, shift):
    # Native data subtracts in its own dtype: exact near the mean, and twice as many lanes as
    # float64. A 16-bit value minus the float32 shift is exact in float64 (at most 8 or 11
    # significant bits against 24), and the value is widened anyway, so 16-bit formats
    # subtract in float64 for free; their gradient sums are then exact up to the sums' own
    # rounding, where a float32 subtraction lost more than torch's float accumulation does.
    if fmt == _TYPES["native"]:
        return lambda fmt, stored, shift: np.float64(stored - shift)
    if fmt in _TYPES.values():
        return lambda fmt, stored, shift: np.float64(decode(fmt, stored)) - np.float64(shift)
    return None
