"""The 16-bit conversions the kernels load and store through (fastbn/kernels/lowp.py).

Decoding is checked on all 65,536 bit patterns against ml_dtypes and NumPy, bit for bit (NaN
payloads included). Encoding is checked bit for bit against the same casts on every 16-bit
value's float32 image, on every rounding tie and its two neighbours, around overflow and the
subnormal boundaries, and on a sweep through the whole float32 range; a NaN must stay a NaN of
the same sign. The conversions run inside compiled loops, as in the kernels.
"""

import numpy as np
import pytest
from numba import njit

from fastbn.kernels.lowp import BFLOAT16, FLOAT16, NATIVE, decode, encode

ml_dtypes = pytest.importorskip("ml_dtypes")

ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@njit
def decode_all(fmt, bits, out):
    for i in range(bits.size):
        out[i] = decode(fmt, bits[i])


@njit
def encode_all(fmt, values, out):
    for i in range(values.size):
        out[i] = encode(fmt, values[i])


def decoded(fmt, bits):
    out = np.empty(bits.size, np.float32)
    decode_all(fmt, bits, out)
    return out


def encoded(fmt, values):
    out = np.empty(values.size, np.uint16)
    encode_all(fmt, values, out)
    return out


def float32_from_bits(bits):
    return np.asarray(bits, np.uint64).astype(np.uint32).view(np.float32)


def reference_encode(dtype, values):
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype).view(np.uint16)


def assert_encodes_like(fmt, dtype, values):
    got = encoded(fmt, values)
    want = reference_encode(dtype, values)
    nan = np.isnan(values)
    mismatch = np.flatnonzero((got != want) & ~nan)
    assert mismatch.size == 0, (
        f"{mismatch.size} values encode differently, first: float32 bits "
        f"{values[mismatch[:5]].view(np.uint32)} -> {got[mismatch[:5]]}, want {want[mismatch[:5]]}")
    # NaN stays NaN, with its sign.
    got_nan = got[nan].view(dtype).astype(np.float32)
    assert np.isnan(got_nan).all()
    np.testing.assert_array_equal(np.signbit(got_nan), np.signbit(values[nan]))


def ties_and_neighbours(float32_images, dropped_bits):
    """float32 values halfway between consecutive 16-bit values, and one float32 ulp either
    side, for values whose float32 image drops `dropped_bits` low bits."""
    base = float32_images.view(np.uint32).astype(np.int64)
    half = 1 << (dropped_bits - 1)
    bits = np.concatenate([base + half - 1, base + half, base + half + 1, base - 1, base + 1])
    return float32_from_bits(bits[(bits >= 0) & (bits < 1 << 32)])


def sweep():
    """Every 4099th float32 bit pattern (a prime stride, so every exponent and many mantissa
    residues appear), both signs."""
    return float32_from_bits(np.arange(0, 1 << 32, 4099, dtype=np.uint64))


# ----------------------------------------------------------------------------- decode

def test_bfloat16_decode_is_exact_on_every_pattern():
    want = ALL_BITS.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(decoded(BFLOAT16, ALL_BITS).view(np.uint32),
                                  want.view(np.uint32))


def test_float16_decode_is_exact_on_every_pattern():
    want = ALL_BITS.view(np.float16).astype(np.float32)
    got = decoded(FLOAT16, ALL_BITS)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # Spot checks that do not lean on NumPy: the smallest subnormal, the largest finite
    # value, infinity, and a NaN's payload moved up by 13 bits.
    assert got[0x0001] == 2.0 ** -24 and got[0x8001] == -(2.0 ** -24)
    assert got[0x7BFF] == 65504.0 and got[0x7C00] == np.inf and got[0xFC00] == -np.inf
    assert got[0x7D23].view(np.uint32) == 0x7F800000 | (0x123 << 13)


# ----------------------------------------------------------------------------- encode

@pytest.mark.parametrize("fmt, dtype", [(BFLOAT16, ml_dtypes.bfloat16), (FLOAT16, np.float16)],
                         ids=["bfloat16", "float16"])
def test_every_16_bit_value_round_trips(fmt, dtype):
    images = ALL_BITS.view(dtype).astype(np.float32)
    finite_or_inf = ~np.isnan(images)
    np.testing.assert_array_equal(encoded(fmt, images)[finite_or_inf], ALL_BITS[finite_or_inf])
    assert_encodes_like(fmt, dtype, images)


def test_bfloat16_ties_round_to_even():
    images = ALL_BITS.view(ml_dtypes.bfloat16).astype(np.float32)
    values = ties_and_neighbours(images[~np.isnan(images)], 16)
    assert_encodes_like(BFLOAT16, ml_dtypes.bfloat16, values)
    # 1 + 2**-8 is halfway between 1 and 1 + 2**-7: the even neighbour is 1.
    assert encoded(BFLOAT16, np.array([1 + 2.0 ** -8], np.float32))[0] == 0x3F80
    assert encoded(BFLOAT16, np.array([1 + 3 * 2.0 ** -8], np.float32))[0] == 0x3F82


def test_float16_ties_round_to_even_in_normal_and_subnormal_range():
    images = ALL_BITS.view(np.float16).astype(np.float32)
    finite = images[np.isfinite(images)]
    normal = finite[np.abs(finite) >= 2.0 ** -14]
    # Between subnormals the tie is half of 2**-24, not a fixed count of float32 bits.
    steps = np.arange(0, 1025, dtype=np.float64)
    subnormal_ties = np.concatenate([(steps + 0.5) * 2.0 ** -24, -(steps + 0.5) * 2.0 ** -24])
    subnormal_ties = subnormal_ties.astype(np.float32)
    tie_bits = subnormal_ties.view(np.uint32).astype(np.int64)
    values = np.concatenate([ties_and_neighbours(normal, 13), subnormal_ties,
                             float32_from_bits(tie_bits - 1), float32_from_bits(tie_bits + 1)])
    assert_encodes_like(FLOAT16, np.float16, values)
    # 2**-25 is halfway between 0 and the smallest subnormal: it rounds to (even) zero.
    assert encoded(FLOAT16, np.array([2.0 ** -25, 3 * 2.0 ** -25], np.float32)).tolist() == [
        0x0000, 0x0002]


@pytest.mark.parametrize("fmt, dtype", [(BFLOAT16, ml_dtypes.bfloat16), (FLOAT16, np.float16)],
                         ids=["bfloat16", "float16"])
def test_overflow_boundaries_and_specials(fmt, dtype):
    f32 = np.finfo(np.float32)
    edges = [65504.0, 65519.996, 65520.0, 65536.0, 1e38, f32.max, np.inf, 2.0 ** -14,
             2.0 ** -14 * (1 - 2.0 ** -11), 2.0 ** -24, 2.0 ** -25, 2.0 ** -26, f32.tiny,
             f32.smallest_subnormal, 0.0, 3.3895314e38, 3.3961776e38]
    values = np.array(edges + [-v for v in edges], np.float32)
    nan_bits = [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFC00000, 0xFF800001,
                0xFFFFFFFF, 0x7F80FFFF]
    values = np.concatenate([values, float32_from_bits(nan_bits)])
    assert_encodes_like(fmt, dtype, values)
    # NaNs whose payload lies only in the dropped bits must not become infinities.
    got = encoded(fmt, float32_from_bits([0x7F800001, 0xFF800001]))
    assert np.isnan(got.view(dtype).astype(np.float32)).all()


@pytest.mark.parametrize("fmt, dtype", [(BFLOAT16, ml_dtypes.bfloat16), (FLOAT16, np.float16)],
                         ids=["bfloat16", "float16"])
def test_encode_sweep_through_float32(fmt, dtype):
    assert_encodes_like(fmt, dtype, sweep())


def test_float16_boundary_neighbourhoods():
    """Every float32 within 4096 ulps of the float16 overflow threshold and of the normal and
    subnormal boundaries, both signs."""
    centres = np.array([65520.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25], np.float32)
    offsets = np.arange(-4096, 4097, dtype=np.int64)
    bits = (centres.view(np.uint32).astype(np.int64)[:, None] + offsets).ravel()
    values = float32_from_bits(bits)
    assert_encodes_like(FLOAT16, np.float16, np.concatenate([values, -values]))


def test_native_format_is_the_identity():
    values = sweep()[:1000]
    out = np.empty_like(values)
    encode_all(NATIVE, values, out)
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))
    decode_all(NATIVE, values, out)
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))
