"""Batch norm cut into phases: per-channel moments, their merge, and the split training step a
cross-process SyncBatchNorm runs around its exchanges. Part of the functional layer: every
public function validates (with the checks in _validate) before any kernel runs, then plans
and dispatches; the private ``_`` twins take already validated arrays.
"""

import numpy as np

from .kernels import nchw as planes
from .kernels import nchw_short as short
from .kernels import nhwc as rows
from .kernels.moments import finish_merged_moments
from ._layout import params_or_defaults, plan_channel_map, plan_for, storage_format, workspace_for
from ._validate import (as_float_array, channel_vector, check_channels, check_eps,
                        check_momentum, check_no_overlap, checked_output, contiguous)

__all__ = ["channel_moments", "merge_moments", "batch_norm_merged_stats", "batch_norm_normalize",
           "batch_norm_grad_sums", "batch_norm_grad_input"]


# ----------------------------------------------------------------------------- moments

def channel_moments(x, *, channels_last=False):
    """Per-channel ``(count, mean, m2)`` of x in float64, ``m2 = sum((x - mean)**2)``.

    These are the mergeable partials a cross-process SyncBatchNorm exchanges; combine them with
    :func:`merge_moments`. ``count`` is an array of shape (C,) like the others.
    """
    x = as_float_array(x)
    n_channels = x.shape[-1 if channels_last else 1] if x.ndim >= 2 else 0
    check_channels(x, n_channels, channels_last)
    if x.size == 0:
        raise ValueError(f"cannot compute moments of an empty batch, shape {x.shape}")
    return _channel_moments(x, channels_last)


def _channel_moments(x, channels_last):
    """channel_moments of a validated, non-empty x."""
    n_channels = x.shape[-1 if channels_last else 1]
    plan = plan_for(x.shape, channels_last)
    x = contiguous(x)
    count = np.empty(n_channels, np.float64)
    mean = np.empty(n_channels, np.float64)
    m2 = np.empty(n_channels, np.float64)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        short.moments_nchw_short.select(x.size)(fmt, plan.view(x), plan.sample_block,
                                                plan.channel_block, ws.lanes, count, mean, m2)
    elif plan.kind == "planes":
        planes.moments_nchw.select(x.size)(fmt, plan.view(x), plan.group, plan.chunk, ws.part_a,
                                           ws.part_b, count, mean, m2)
    else:
        rows.moments_nhwc.select(x.size)(fmt, plan.view(x), n_channels, plan.block_rows,
                                         plan.interleave_rows(x.itemsize), ws.lanes, count, mean,
                                         m2)
    return count, mean, m2


def merge_moments(counts, means, m2s):
    """Merge stacked partials of shape (k, C), row 0 first, into one ``(count, mean, m2)``.

    The fixed order makes the result independent of which process computed which row.
    """
    counts = np.asarray(counts, np.float64)
    means = np.asarray(means, np.float64)
    m2s = np.asarray(m2s, np.float64)
    if not (counts.shape == means.shape == m2s.shape) or counts.ndim != 2 or len(counts) == 0:
        raise ValueError("counts, means and m2s must be equal-shaped (k, C) arrays with k >= 1, "
                         f"got {counts.shape}, {means.shape}, {m2s.shape}")
    count, mean, m2 = counts[0].copy(), means[0].copy(), m2s[0].copy()
    for count_b, mean_b, m2_b in zip(counts[1:], means[1:], m2s[1:]):
        total = count + count_b
        delta = mean_b - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            weight_b = np.where(total > 0, count_b / total, 0.0)
        mean = mean + delta * weight_b
        m2 = m2 + m2_b + delta * delta * count * weight_b
        count = total
    return count, mean, m2


# ----------------------------------------------------------------------------- split phases
# A training step cut where a SyncBatchNorm combines partials across processes:
#   forward:  channel_moments (local) -> merge_moments (all ranks) -> batch_norm_normalize
#   backward: batch_norm_grad_sums (local) -> sum over ranks -> batch_norm_grad_input
# With a single process the pieces give what batch_norm_forward and batch_norm_backward give.

def _stats_vector(v, n_channels, name):
    return channel_vector(v, n_channels, name).astype(np.float64, copy=False)


def batch_norm_merged_stats(count, mean, m2, eps=1e-5, *, running_mean=None, running_var=None,
                            momentum=0.1):
    """invstd of merged moments (``1 / sqrt(m2 / count + eps)``, float64), updating
    running_mean and running_var in place when given, with the unbiased variance, exactly as
    batch_norm_forward does. count is the batch's values per channel (a number, > 1 for an
    update)."""
    count = float(count)
    n_channels = np.shape(mean)[0] if np.ndim(mean) == 1 else -1
    mean = _stats_vector(mean, n_channels, "mean")
    m2 = _stats_vector(m2, n_channels, "m2")
    update = running_mean is not None or running_var is not None
    if update:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given together")
        running_mean = channel_vector(running_mean, n_channels, "running_mean", writeable=True)
        running_var = channel_vector(running_var, n_channels, "running_var", writeable=True)
    if not count > (1.0 if update else 0.0):
        raise ValueError(f"count must be above {1 if update else 0} here, got {count}")
    return _merged_stats(count, mean, m2, check_eps(eps), check_momentum(momentum),
                         running_mean, running_var)


def _merged_stats(count, mean, m2, eps, momentum, running_mean, running_var):
    """batch_norm_merged_stats after validation; running buffers are updated unless None."""
    invstd = np.empty(mean.shape[0], np.float64)
    update = running_mean is not None
    if not update:
        running_mean = running_var = invstd  # never written: the update flag is off
    finish_merged_moments.serial(count, mean, m2, eps, momentum, update, running_mean,
                                 running_var, invstd)
    return invstd


def batch_norm_normalize(x, mean, invstd, weight=None, bias=None, *, channels_last=False,
                         out=None):
    """``y = (x - mean) * invstd * weight + bias`` per channel, with given statistics.

    mean and invstd are (C,) arrays (used in float64), for example merged batch statistics and
    ``1 / sqrt(var + eps)``. out may be x itself.
    """
    x = as_float_array(x)
    n_channels = x.shape[-1 if channels_last else 1] if x.ndim >= 2 else 0
    check_channels(x, n_channels, channels_last)
    mean = _stats_vector(mean, n_channels, "mean")
    invstd = _stats_vector(invstd, n_channels, "invstd")
    weight = channel_vector(weight, n_channels, "weight")
    bias = channel_vector(bias, n_channels, "bias")
    return _normalize(x, mean, invstd, weight, bias, channels_last, out)


def _normalize(x, mean, invstd, weight, bias, channels_last, out):
    """batch_norm_normalize after validation; mean and invstd are float64."""
    x, y, plan, weight, bias, ws, fmt = plan_channel_map(x, weight, bias, channels_last, out)
    if plan is None:
        return y
    if plan.kind == "short":
        short.normalize_nchw_short.select(x.size)(fmt, plan.view(x), mean, invstd, weight, bias,
                                                  plan.sample_block, plan.channel_block,
                                                  ws.coef, plan.view(y))
    elif plan.kind == "planes":
        planes.normalize_nchw.select(x.size)(fmt, plan.view(x), mean, invstd, weight, bias,
                                             plan.group, plan.chunk, ws.coef, plan.view(y))
    else:
        rows.normalize_nhwc.select(x.size)(fmt, plan.view(x), plan.n_channels, mean, invstd, weight,
                                           bias, plan.block_rows, ws.coef, ws.coef_lanes[:3],
                                           plan.view(y))
    return y


def gradient_args(dy, x, channels_last):
    """Validated (dy, x) for the backward phases: float arrays of one shape and dtype."""
    x = as_float_array(x)
    dy = as_float_array(dy, "dy")
    n_channels = x.shape[-1 if channels_last else 1] if x.ndim >= 2 else 0
    check_channels(x, n_channels, channels_last)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x, {x.dtype}, got {dy.dtype}")
    return dy, x


def gradient_output(out, dy, x):
    """out checked for dx: shaped like x, not overlapping x; it may be dy itself."""
    if out is None:
        return None
    dx = checked_output(out, x)
    check_no_overlap(dx, x, "out", "x")
    check_no_overlap(dx, dy, "out", "dy", allow_same=True)
    return dx


def batch_norm_grad_sums(dy, x, mean, *, channels_last=False):
    """Per-channel float64 ``(sum(dy), sum(dy * (x - mean)))`` as a (2, C) array.

    Sums of several shards add up to the sums of their concatenation; they are what
    :func:`batch_norm_grad_input` takes. An empty x gives zeros.
    """
    dy, x = gradient_args(dy, x, channels_last)
    mean = _stats_vector(mean, x.shape[-1 if channels_last else 1], "mean")
    return _grad_sums(dy, x, mean, channels_last)


def _grad_sums(dy, x, mean, channels_last):
    """batch_norm_grad_sums after validation; mean is float64."""
    n_channels = x.shape[-1 if channels_last else 1]
    sums = np.zeros((2, n_channels), np.float64)
    if x.size == 0:
        return sums
    x = contiguous(x)
    dy = contiguous(dy)
    plan = plan_for(x.shape, channels_last)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        short.grad_sums_nchw_short.select(x.size)(fmt, plan.view(dy), plan.view(x), mean,
                                                  plan.sample_block, plan.channel_block,
                                                  ws.lanes, ws.coef, sums)
    elif plan.kind == "planes":
        planes.grad_sums_nchw.select(x.size)(fmt, plan.view(dy), plan.view(x), mean, plan.group,
                                             plan.chunk, ws.part_a, ws.part_b, ws.coef, sums)
    else:
        rows.grad_sums_nhwc.select(x.size)(fmt, plan.view(dy), plan.view(x), n_channels, mean,
                                           plan.block_rows,
                                           plan.interleave_rows(x.itemsize, n_inputs=2),
                                           ws.lanes, ws.coef, ws.coef_lanes[:1], sums)
    return sums


def batch_norm_grad_input(dy, x, mean, invstd, grad_sums, count, weight=None, *,
                          channels_last=False, out=None):
    """Training-mode dx of the shard x, from sums over the whole batch.

    ``grad_sums`` is the (2, C) :func:`batch_norm_grad_sums` of the whole batch (the sum of
    every shard's), ``count`` the batch's values per channel, and mean, invstd the statistics
    the forward normalized with ``dx = w * invstd * (dy - sum(dy) / count - (x - mean) *
    invstd**2 * sum(dy * (x - mean)) / count)``.
    """
    dy, x = gradient_args(dy, x, channels_last)
    n_channels = x.shape[-1 if channels_last else 1]
    mean = _stats_vector(mean, n_channels, "mean")
    invstd = _stats_vector(invstd, n_channels, "invstd")
    grad_sums = np.asarray(grad_sums, np.float64)
    if grad_sums.shape != (2, n_channels):
        raise ValueError(f"grad_sums must have shape (2, {n_channels}), got {grad_sums.shape}")
    count = float(count)
    if not count >= x.size // max(n_channels, 1) or count <= 0:
        raise ValueError(f"count must be positive and at least x's values per channel, "
                         f"got {count}")
    weight = channel_vector(weight, n_channels, "weight")
    return _grad_input(dy, x, mean, invstd, weight, grad_sums, count, channels_last,
                       gradient_output(out, dy, x))


def _grad_input(dy, x, mean, invstd, weight, grad_sums, count, channels_last, out):
    """batch_norm_grad_input after validation."""
    x = contiguous(x)
    dy = contiguous(dy)
    dx = np.empty(x.shape, x.dtype) if out is None else out
    if x.size == 0:
        return dx
    plan = plan_for(x.shape, channels_last)
    weight, _ = params_or_defaults(weight, None, plan.n_channels, x.dtype)
    grad_sums = np.ascontiguousarray(grad_sums, np.float64)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        short.grad_input_nchw_short.select(x.size)(fmt, plan.view(dy), plan.view(x), mean, invstd,
                                                   weight, count, grad_sums, plan.sample_block,
                                                   plan.channel_block, ws.coef, plan.view(dx))
    elif plan.kind == "planes":
        planes.grad_input_nchw.select(x.size)(fmt, plan.view(dy), plan.view(x), mean, invstd,
                                              weight, count, grad_sums, plan.group, plan.chunk,
                                              ws.coef, plan.view(dx))
    else:
        rows.grad_input_nhwc.select(x.size)(fmt, plan.view(dy), plan.view(x), plan.n_channels, mean,
                                            invstd, weight, count, grad_sums, plan.block_rows,
                                            ws.coef, ws.coef_lanes, plan.view(dx))
    return dx
