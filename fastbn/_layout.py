"""How a tensor is cut into kernel work, and the reusable buffers that work needs.

A channels-first tensor (N, C, *spatial) becomes an (N, C, L) view for the plane kernels. A
channels-last tensor (N, *spatial, C), and any tensor with one value per channel per sample,
becomes a flat (rows * C,) view for the row kernels. Both are views: contiguous input is never
copied; float16 and bfloat16 tensors are seen through uint16 views of their bits, which the
kernels decode as their storage format says (see kernels/lowp.py). A Plan records the
partition, which depends on the shape alone (never on the thread count), so results are
bitwise reproducible.
"""

import threading
from collections import OrderedDict
from math import gcd

import numpy as np

from .kernels.lowp import BFLOAT16, FLOAT16, NATIVE
from ._validate import contiguous, new_or_checked_output, parameter_dtype

# Values per work item. Each item is reduced in one pass, so the size only trades the cost of
# merging items (done serially, per channel) against load balance and the shifted-sum error
# bound of about n * 1e-16 for n values of a channel per item (see kernels/moments.py).
ITEM_VALUES = 16384
ROW_BLOCK_VALUES = 65536
# Lanes per row-kernel vector step: a multiple of 16 keeps AVX-512 registers full of float32
# for any C (and AVX2 ones, at 8). With 8, channels-last (8, 3, 224, 224) ran 24-lane groups,
# one full vector and a half one; with 16 (48 lanes) its float32 module calls took 5-23% less
# time (eval 91-93 -> 71-82 us, train 144 -> 123-137 us, backward 202-220 -> 174-210 us;
# python -m fastbn --quick --no-torch --shapes 8x3x224x224 64x3x112x112, two runs each).
SIMD_LANES = 16
# See Plan.interleave_rows: tensors at least this large are read from memory rather than from
# the last-level cache (32 MiB on the reference machine, shared with the output).
STREAMED_BYTES = 16 << 20
_WORKSPACES_PER_THREAD = 16


class Plan:
    """The work partition of one (shape, channels_last) pair."""

    __slots__ = ("kind", "n_channels", "count", "n_batch", "length", "chunk", "group",
                 "items_per_channel", "sample_block", "channel_block", "n_sample_blocks",
                 "n_rows", "width", "block_rows", "n_blocks", "key")

    def __init__(self, shape, channels_last):
        n_batch = shape[0]
        self.n_batch = n_batch
        if channels_last:
            n_channels = shape[-1]
            length = int(np.prod(shape[1:-1], dtype=np.int64))
        else:
            n_channels = shape[1]
            length = int(np.prod(shape[2:], dtype=np.int64))
        self.n_channels = n_channels
        self.length = length
        self.count = n_batch * length
        # One value per channel per sample is the same (rows, C) matrix in either layout.
        if channels_last or length == 1:
            self.kind = "rows"
        elif length < ITEM_VALUES:
            self.kind = "short"
        else:
            self.kind = "planes"
        self.chunk = self.group = self.items_per_channel = 0
        self.sample_block = self.channel_block = self.n_sample_blocks = 0
        self.n_rows = self.width = self.block_rows = self.n_blocks = 0
        if self.kind == "planes":
            n_chunks = -(-length // ITEM_VALUES)
            self.group = 1
            self.chunk = -(-length // n_chunks)
            self.items_per_channel = n_batch * n_chunks
        elif self.kind == "short":
            # Items of about ITEM_VALUES values: several whole samples, or a run of channels
            # of one sample when a sample alone is larger.
            sample_values = n_channels * max(length, 1)
            if sample_values >= ITEM_VALUES:
                self.sample_block = 1
                self.channel_block = max(1, ITEM_VALUES // max(length, 1))
            else:
                self.sample_block = ITEM_VALUES // sample_values
                self.channel_block = n_channels
            self.n_sample_blocks = max(1, -(-n_batch // self.sample_block))
        else:
            self.n_rows = n_batch * length
            # reps rows per lane group make W = C * reps a multiple of the SIMD width; reps
            # also divides the row count, so every block is a whole number of lane groups.
            reps = gcd(SIMD_LANES // gcd(n_channels, SIMD_LANES), max(self.n_rows, 1))
            self.width = n_channels * reps
            self.block_rows = max(reps, (ROW_BLOCK_VALUES // self.width) * reps)
            self.n_blocks = max(1, -(-self.n_rows // self.block_rows))
        self.key = (self.kind, n_batch, n_channels, length)

    def interleave_rows(self, itemsize, n_inputs=1):
        """Whether a row kernel's lane sums over n_inputs arrays take four lane groups per step.

        Four per step load and store the float64 lane accumulators once instead of four times,
        which is 1.3-1.7x faster wherever the inputs come from cache. Streaming from memory,
        four groups per step read four interleaved streams per input, which the hardware
        prefetcher follows badly. On the reference machine (AMD EPYC, AVX-512), one group per
        step, in memory order, was 1.3-2x faster there for groups of 512 B to 2 KB (four groups
        share each 4 KB page), and for groups of 256 B or more once two inputs are read (the
        backward's dy and x). With one input, groups of 256 B or less, or of 4 KB or more,
        stayed faster four at a time; with two, groups of 128 B or less (C = 16 or 32 in
        float32): the backward of (16, 32, 8, 32, 32), (64, 16, 56, 56) and (64, 32, 56, 56)
        float32 took 0.82, 0.75 and 0.94 of its one-group time, and of (16, 16, 8, 32, 32) and
        (32, 16, 56, 56) float64 0.91 and 0.89 (medians of 60-80 alternating pairs in one
        process). The additions happen in the same order either way, so this choice never
        changes a result.
        """
        if n_inputs * self.n_rows * self.n_channels * itemsize < STREAMED_BYTES:
            return True
        group_bytes = self.width * itemsize
        if n_inputs > 1:
            return group_bytes <= 128
        return group_bytes <= 256 or group_bytes >= 4096

    def view(self, x):
        """The kernel view of a C-contiguous x."""
        if x.dtype.itemsize == 2:
            x = x.view(np.uint16)
        if self.kind == "rows":
            return x.reshape(-1)
        return x.reshape(self.n_batch, self.n_channels, self.length)


def storage_format(dtype):
    """The kernels' storage format for data of a validated dtype."""
    if dtype.itemsize != 2:
        return NATIVE
    return FLOAT16 if dtype == np.float16 else BFLOAT16


def coefficient_dtype(dtype):
    """The dtype of the per-channel coefficients the normalize passes use: the data's own, or
    float32 for 16-bit data, whose arithmetic is float32 as in PyTorch's CPU kernels."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


class Workspace:
    """Scratch buffers for one plan and data dtype; reused across calls by one thread."""

    __slots__ = ("part_a", "part_b", "lanes", "coef", "coef_lanes")

    def __init__(self, plan, dtype):
        dtype = coefficient_dtype(dtype)
        if plan.kind == "planes":
            self.part_a = np.empty((plan.n_channels, plan.items_per_channel), np.float64)
            self.part_b = np.empty((plan.n_channels, plan.items_per_channel), np.float64)
            self.lanes = None
            self.coef_lanes = None
        elif plan.kind == "short":
            self.part_a = self.part_b = self.coef_lanes = None
            self.lanes = np.empty((plan.n_sample_blocks, 2, plan.n_channels), np.float64)
        else:
            self.part_a = self.part_b = None
            self.lanes = np.empty((plan.n_blocks, 2, plan.width), np.float64)
            self.coef_lanes = np.empty((6, plan.width), dtype)
        # Rows: the forward's (shift, alpha, beta), or the backward's (shift, k_dy, k_x, k_0)
        # and, for the fused ReLU backward, the forward's alpha and beta in rows 4 and 5.
        self.coef = np.empty((6, plan.n_channels), dtype)


_plans = {}
_local = threading.local()


def plan_for(shape, channels_last):
    key = (shape, channels_last)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 256:
            _plans.clear()
        plan = _plans[key] = Plan(shape, channels_last)
    return plan


def workspace_for(plan, dtype):
    """This thread's workspace for plan: threads never share scratch, so concurrent calls
    from several Python threads cannot corrupt each other."""
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = OrderedDict()
    key = (plan.key, dtype)
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = Workspace(plan, dtype)
        if len(cache) > _WORKSPACES_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return ws


_ones = {}
_zeros = {}


def params_or_defaults(weight, bias, n_channels, dtype):
    """weight and bias, or cached ones and zeros in the parameter dtype for input of dtype
    where they are None (the kernels always take both)."""
    dtype = parameter_dtype(dtype)
    if weight is None:
        weight = _ones.get((n_channels, dtype))
        if weight is None:
            weight = _ones[(n_channels, dtype)] = np.ones(n_channels, dtype)
    if bias is None:
        bias = _zeros.get((n_channels, dtype))
        if bias is None:
            bias = _zeros[(n_channels, dtype)] = np.zeros(n_channels, dtype)
    return weight, bias


def plan_channel_map(x, weight, bias, channels_last, out):
    """Everything a pass that maps x to y channel by channel needs, planned once:
    (x, y, plan, weight, bias, workspace, storage format), with x contiguous, y the checked out
    or a new array, and weight and bias defaulted. plan is None for an empty x."""
    x = contiguous(x)
    y = new_or_checked_output(out, x, allow_same=True)
    if x.size == 0:
        return x, y, None, weight, bias, None, None
    plan = plan_for(x.shape, channels_last)
    weight, bias = params_or_defaults(weight, bias, plan.n_channels, x.dtype)
    return x, y, plan, weight, bias, workspace_for(plan, x.dtype), storage_format(x.dtype)
