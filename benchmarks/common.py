"""Shared parameters, data and peers for the asv suites.

asv runs these files from the current checkout against the package installed at *each*
benchmarked commit, so they use only fastbn's public API (nothing private, which an older
commit may lack) and carry their own copy of the NumPy reference.
"""

import os

import numpy as np

# (batch, channels, *spatial) as strings, so asv's result keys read like the README's table.
# A ResNet stage, a many-channel late stage, a 1-D (N, C) batch, a 3-D volume, and a tiny
# tensor that measures per-call overhead. The out-of-cache 205 MB tensor is left to
# `python -m fastbn`: filling it in every asv process would dominate the suite's run time.
SHAPES = ["32x64x56x56", "256x512x7x7", "128x1024", "16x32x8x32x32", "2x4x8x8"]
LAYOUTS = ["NCHW", "NHWC"]
# float16 and bfloat16 are storage formats with float32 parameters (torch's mixed precision);
# commits before they existed show n/a for them.
DTYPES = ["float32", "float64", "float16", "bfloat16"]
# CI's smoke run (.ci/asv-smoke) only checks that every benchmark still runs: one 4-D and one
# 2-D shape in float32 and bfloat16 exercise the plane and the row kernels, and the 16-bit
# loads and stores, in a fraction of the time.
# Results recorded this way have other parameters, so never publish them.
SMOKE = bool(os.environ.get("FASTBN_ASV_SMOKE"))
if SMOKE:
    SHAPES = ["8x16x32x32", "128x1024"]
    DTYPES = ["float32", "bfloat16"]
# A history over many commits on a 2-core machine: the full grid takes about an hour per
# commit with proper repeats, so FASTBN_ASV_GRID=history keeps one streamed 4-D shape, the
# (N, C) matrix and the tiny tensor, in float32. Its results share keys with the full grid's,
# so both kinds can live in one results directory and one dashboard.
if os.environ.get("FASTBN_ASV_GRID") == "history":
    SHAPES = ["32x64x56x56", "128x1024", "2x4x8x8"]
    DTYPES = ["float32"]
PARAMS = [SHAPES, LAYOUTS, DTYPES]
PARAM_NAMES = ["shape", "layout", "dtype"]
EPS = 1e-5
MOMENTUM = 0.1


def parse_shape(label):
    return tuple(int(d) for d in label.split("x"))


def layout_shape(shape, layout):
    """Array shape of an (N, C, *spatial) problem stored as NCHW or NHWC."""
    if layout == "NHWC" and len(shape) > 2:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


def channel_axis(ndim, layout):
    return ndim - 1 if layout == "NHWC" else 1


def reduce_axes(ndim, layout):
    axis = channel_axis(ndim, layout)
    return tuple(a for a in range(ndim) if a != axis)


def numpy_dtype(name):
    """The NumPy dtype of a DTYPES entry; NotImplementedError (asv: n/a) for bfloat16 without
    ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("bfloat16 needs ml_dtypes (the lowp extra)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_arrays(shape_label, layout, dtype, seed=0):
    """Filled inputs: every page is touched here, so no page fault lands in a timing. 16-bit
    inputs come with float32 parameters and buffers."""
    shape = layout_shape(parse_shape(shape_label), layout)
    n_channels = shape[channel_axis(len(shape), layout)]
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(dtype)
    param_dtype = np.float32 if dtype.itemsize == 2 else dtype
    # Scaled in float32 and rounded once: NumPy has no bfloat16 arithmetic of its own.
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
    return {
        "x": x,
        "dy": rng.standard_normal(shape, dtype=np.float32).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, n_channels).astype(param_dtype),
        "bias": rng.uniform(-0.5, 0.5, n_channels).astype(param_dtype),
        "running_mean": rng.uniform(-0.1, 0.1, n_channels).astype(param_dtype),
        "running_var": rng.uniform(0.5, 2.0, n_channels).astype(param_dtype),
    }


def require_dtype_support(fastbn, dtype):
    """NotImplementedError (asv: n/a) when the benchmarked fastbn predates 16-bit input."""
    if numpy_dtype(dtype).itemsize != 2:
        return
    try:
        fastbn.channel_moments(np.zeros((2, 1), numpy_dtype(dtype)))
    except TypeError:
        raise NotImplementedError(f"this fastbn has no {dtype} input") from None


def numba_threads():
    """The thread count fastbn runs with; the peers get the same."""
    import numba

    return numba.get_num_threads()


# ----------------------------------------------------------------------------- NumPy reference

class NumpyBatchNorm:
    """Straightforward vectorized NumPy batch norm at the input dtype: the baseline that
    speedups are quoted against (the same formulas as fastbn.report.ops.numpy_ops)."""

    def __init__(self, arrays, layout):
        x = arrays["x"]
        self.x, self.dy = x, arrays["dy"]
        self.axes = reduce_axes(x.ndim, layout)
        self.count = x.size // x.shape[channel_axis(x.ndim, layout)]
        bshape = [1] * x.ndim
        bshape[channel_axis(x.ndim, layout)] = -1
        self.w = arrays["weight"].reshape(bshape)
        self.b = arrays["bias"].reshape(bshape)
        self.rm = arrays["running_mean"].copy()
        self.rv = arrays["running_var"].copy()
        self.rm_b, self.rv_b = self.rm.reshape(bshape), self.rv.reshape(bshape)
        self.eps = x.dtype.type(EPS)
        self.mean, _, self.invstd = self.stats()

    def stats(self):
        mean = self.x.mean(axis=self.axes, keepdims=True)
        var = self.x.var(axis=self.axes, keepdims=True)
        return mean, var, 1.0 / np.sqrt(var + self.eps)

    def train_forward(self):
        mean, var, invstd = self.stats()
        self.rm[...] = (1 - MOMENTUM) * self.rm + MOMENTUM * mean.ravel()
        self.rv[...] = ((1 - MOMENTUM) * self.rv
                        + MOMENTUM * var.ravel() * self.count / (self.count - 1))
        return (self.x - mean) * invstd * self.w + self.b

    def eval_forward(self):
        return (self.x - self.rm_b) / np.sqrt(self.rv_b + self.eps) * self.w + self.b

    def backward(self):
        xhat = (self.x - self.mean) * self.invstd
        grad_bias = self.dy.sum(axis=self.axes, keepdims=True)
        grad_weight = (self.dy * xhat).sum(axis=self.axes, keepdims=True)
        n = self.count
        return (self.w * self.invstd / n) * (n * self.dy - grad_bias - xhat * grad_weight)


# ----------------------------------------------------------------------------- torch peer

def import_torch():
    """torch, or NotImplementedError: asv then shows the torch suite as skipped (n/a)."""
    if os.environ.get("FASTBN_BENCH_NO_TORCH"):
        raise NotImplementedError("torch benchmarks disabled by FASTBN_BENCH_NO_TORCH")
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed in this environment") from None
    return torch


def torch_view(torch, array, layout):
    """The (N, C, *spatial) tensor of an array, sharing its memory. An NHWC array becomes
    torch's channels_last (4-D) or channels_last_3d (5-D) tensor; torch has no channels-last
    format for 3-D, so (N, L, C) is a strided (N, C, L) view; 2-D is one layout in both."""
    if array.dtype.itemsize == 2:  # torch.from_numpy knows no bfloat16: share the bits
        bits = torch.from_numpy(array.view(np.int16))
        tensor = bits.view(torch.float16 if array.dtype == np.float16 else torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    if layout == "NHWC" and array.ndim > 2:
        return tensor.permute(0, array.ndim - 1, *range(1, array.ndim - 1))
    return tensor


# ----------------------------------------------------------------------------- separate ReLU

_relu_passes = None


def relu_passes(bits=False):
    """(relu_inplace, relu_mask_inplace): a ReLU as passes of its own, the baseline that
    fastbn's fused BatchNorm + ReLU is measured against. They are as fast as a separate pass
    can be: Numba-parallel, vectorized, in place (no new buffer to fault in), over flat
    contiguous arrays. relu_inplace(y) sets y = max(y, 0); relu_mask_inplace(dz, z) zeroes dz
    where z (the ReLU's output) is not above 0, which is torch's threshold_backward."""
    global _relu_passes
    if _relu_passes is None:
        from numba import njit, prange

        @njit(parallel=True, cache=True)
        def relu_inplace(y):
            for i in prange(y.size):
                v = y[i]
                y[i] = v if v > 0 else 0

        @njit(parallel=True, cache=True)
        def relu_mask_inplace(dz, z):
            for i in prange(dz.size):
                g = dz[i]
                dz[i] = g if z[i] > 0 else 0

        # float16 and bfloat16 (NumPy arrays Numba cannot compute with) through their bits:
        # a set sign bit (negative, -0.0) gives +0.0, as max(y, 0) does for all but negative
        # NaNs; z > 0 is a clear sign bit on a nonzero pattern. Same bytes moved.
        @njit(parallel=True, cache=True)
        def relu_bits_inplace(y):
            for i in prange(y.size):
                v = y[i]
                y[i] = v if v < 0x8000 else 0

        @njit(parallel=True, cache=True)
        def relu_mask_bits_inplace(dz, z):
            for i in prange(dz.size):
                g = dz[i]
                dz[i] = g if 0 < z[i] < 0x8000 else 0

        _relu_passes = relu_inplace, relu_mask_inplace, relu_bits_inplace, relu_mask_bits_inplace
    return _relu_passes[2:] if bits else _relu_passes[:2]
