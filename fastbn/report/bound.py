"""The one-pass bound of the report: the op's unavoidable traffic as one plain streaming pass.

Every batch norm implementation moves at least this much memory:

- forwards (train and eval): read x, write y, as ``y = a * x + b`` with per-channel a, b;
- backward: read dy and x, write dx, as ``dx = a * dy + b * x + c`` with per-channel a, b, c.

Statistics need more passes over the data than that; only cache reuse can hide them. So the
time of this pass, on the same buffers, in the same process, with the same threads, measured
beside fastbn's own call, is the yardstick that drifts with the machine exactly as fastbn does,
where a bandwidth figure from a separate buffer does not.

The pass is a good streaming loop, laid out like the data:

- channel planes of L >= ``PLANE_VALUES`` values (NCHW): one coefficient per plane, a
  contiguous run of L values per (sample, channel);
- everything else, rows of W values with the coefficients expanded to a row of W: a (N, C)
  or channels-last tensor takes W = C * reps (reps rows per step, so narrow C still fills the
  vector registers), short NCHW planes take W = C * L, one whole sample per row.

The pass is compiled as a parallel and a serial twin like fastbn's kernels and picks one per
call by the same rule (``KernelPair.select``): the serial twin for tensors too small to pay for
a parallel-region launch and on a machine whose cores are busy with other work, so that the
bound and fastbn always run on the same threads. Compilation happens on the first call.
float16 and bfloat16 data is read and written through the kernels' own 16-bit conversions
(kernels/lowp.py), with float32 coefficients, as fastbn's passes do.
"""

import numpy as np
from numba import prange

from .._layout import coefficient_dtype, storage_format
from ..kernels.jit import parallel_kernel
from ..kernels.lowp import decode, encode

# NCHW planes shorter than this are streamed as whole-sample rows: a per-plane loop of a few
# dozen values spends more on loop overhead than on moving data.
PLANE_VALUES = 1024
# Widest expanded coefficient row, in bytes per coefficient array: the two or three rows of a
# pass then stay in the 1-2 MB L2 beside the data streaming through it.
ROW_BYTES = 128 << 10
# Rows of a (rows, C) tensor are grouped so that W = C * reps reaches this many values.
ROW_VALUES = 1024



@parallel_kernel
def affine_rows(fmt, x, a, b, y):
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            y[r, j] = encode(fmt, a[j] * decode(fmt, x[r, j]) + b[j])


@parallel_kernel
def affine_planes(fmt, x, a, b, y):
    n_channels = x.shape[1]
    for p in prange(x.shape[0] * n_channels):
        i, k = p // n_channels, p % n_channels
        ak, bk = a[k], b[k]
        for j in range(x.shape[2]):
            y[i, k, j] = encode(fmt, ak * decode(fmt, x[i, k, j]) + bk)


@parallel_kernel
def affine2_rows(fmt, dy, x, a, b, c, dx):
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            dx[r, j] = encode(fmt, a[j] * decode(fmt, dy[r, j]) + b[j] * decode(fmt, x[r, j])
                              + c[j])


@parallel_kernel
def affine2_planes(fmt, dy, x, a, b, c, dx):
    n_channels = x.shape[1]
    for p in prange(x.shape[0] * n_channels):
        i, k = p // n_channels, p % n_channels
        ak, bk, ck = a[k], b[k], c[k]
        for j in range(x.shape[2]):
            dx[i, k, j] = encode(fmt, ak * decode(fmt, dy[i, k, j]) + bk * decode(fmt, x[i, k, j])
                                 + ck)


_KERNELS = {"affine_rows": affine_rows, "affine_planes": affine_planes,
            "affine2_rows": affine2_rows, "affine2_planes": affine2_planes}


def stream_layout(shape, layout):
    """('planes', (N, C, L)) or ('rows', (R, W), reps): how the pass walks an (N, C, *spatial)
    problem stored in layout; reps is how often the C coefficients repeat along a row."""
    n_batch, n_channels = shape[0], shape[1]
    length = int(np.prod(shape[2:], dtype=np.int64))
    if layout == "NCHW" and length > 1:
        if length >= PLANE_VALUES:
            return "planes", (n_batch, n_channels, length), 1
        return "rows", (n_batch, n_channels * length), length
    n_rows = n_batch * length
    reps = 1
    for d in range(1, max(1, ROW_VALUES // n_channels) + 1):
        if n_rows % d == 0:
            reps = d
    return "rows", (n_rows // reps, n_channels * reps), reps


def _expand(values, kind, shape, layout, reps):
    """Per-channel coefficients as the pass reads them."""
    if kind == "planes":
        return values
    if layout == "NCHW" and len(shape) > 2:  # one whole sample per row: channel c, L values
        return np.ascontiguousarray(np.repeat(values, reps))
    return np.ascontiguousarray(np.tile(values, reps))  # reps rows of C channels


class OnePass:
    """Callables for the one-pass bound of one (problem, layout), on its own buffers.

    ``forward()`` writes y from x and ``backward()`` writes dx from dy and x, where x, dy, y and
    dx are the arrays passed in (the report passes fastbn's own ``out=`` buffers). Row
    coefficient rows longer than ROW_BYTES fall back to the plane walk for NCHW.
    ``coefficients`` holds the per-channel (a, b, c).
    """

    def __init__(self, shape, layout, x, dy, y, dx):
        kind, view, reps = stream_layout(shape, layout)
        if kind == "rows" and layout == "NCHW" and view[1] * x.itemsize > ROW_BYTES:
            kind, view, reps = "planes", (shape[0], shape[1], view[1] // shape[1]), 1
        self.kind, self.view = kind, view
        n_channels = shape[1]
        rng = np.random.default_rng(1)
        # Coefficients of a normal-sized batch norm: no denormals, no overflow.
        self.coefficients = tuple(rng.uniform(0.5, 1.5, n_channels).astype(
            coefficient_dtype(x.dtype)) for _ in range(3))
        a, b, c = (_expand(v, kind, shape, layout, reps) for v in self.coefficients)
        fwd, bwd, size = _KERNELS["affine_" + kind], _KERNELS["affine2_" + kind], x.size
        fmt = storage_format(x.dtype)
        if x.dtype.itemsize == 2:
            x, dy, y, dx = (arr.view(np.uint16) for arr in (x, dy, y, dx))
        xv, dyv, yv, dxv = (arr.reshape(view) for arr in (x, dy, y, dx))
        self.forward = lambda: fwd.select(size)(fmt, xv, a, b, yv)
        self.backward = lambda: bwd.select(size)(fmt, dyv, xv, a, b, c, dxv)
        self.forward()  # compile (or load from Numba's cache) outside any timing
        self.backward()

    def for_op(self, op):
        return self.backward if op == "backward" else self.forward
