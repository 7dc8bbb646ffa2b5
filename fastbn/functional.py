"""Batch normalization as functions on NumPy arrays, with PyTorch's semantics.

This layer validates (with the checks in _validate), builds kernel views and dispatches; the
kernels do the arithmetic. Everything is checked before the first kernel runs, so a call that
raises changes nothing.

Statistics are float64 for every input dtype. Saved statistics (``save_mean``,
``save_invstd``) are float64 arrays of shape (C,).

Inputs may be float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``, the ``lowp``
extra). The 16-bit formats are storage only, as in PyTorch's mixed precision: the kernels read
and write their bits and compute in float32, y and dx keep the input's dtype, and weight, bias
and the running buffers are float32 (or float64), as are grad_weight and grad_bias.
"""

import numba
import numpy as np

from .kernels import nchw as planes
from .kernels import nchw_short as short
from .kernels import nhwc as rows
from .kernels.moments import finish_merged_moments
from ._layout import plan_for, storage_format, workspace_for
from ._validate import (as_float_array, channel_vector, check_batch_size, check_channels,
                        check_eps, check_momentum, check_no_overlap, checked_output,
                        contiguous, new_or_checked_output, parameter_dtype)

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "channel_moments",
           "merge_moments", "batch_norm_merged_stats", "batch_norm_normalize",
           "batch_norm_grad_sums", "batch_norm_grad_input", "batch_norm_relu",
           "batch_norm_relu_forward", "batch_norm_relu_backward"]

_ones = {}
_zeros = {}


def _params(weight, bias, n_channels, dtype):
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


def running_invstd(running_var, eps):
    """float64 1/sqrt(running_var + eps), with PyTorch's 0 where both are 0."""
    var = running_var.astype(np.float64) + eps
    with np.errstate(divide="ignore"):
        return np.where(var == 0.0, 0.0, 1.0 / np.sqrt(var))


def _schedule_by_channel(plan):
    # Whole channels per thread pay off when there are enough of them to balance the load.
    return plan.n_channels >= 4 * numba.get_num_threads()


def _planes_kernel(by_channel, by_block, plan, size):
    """The NCHW twin to run; both schedules give identical bits, so only speed decides."""
    kernel = by_block.select(size)
    if kernel is by_block.serial or not _schedule_by_channel(plan):
        return kernel
    return by_channel.select(size)


# ----------------------------------------------------------------------------- forward

def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, *, running_mean=None,
                       running_var=None, momentum=0.1, channels_last=False, out=None):
    """Training-mode forward: normalize x with its own batch statistics.

    Returns ``(y, save_mean, save_invstd)``; the saved float64 statistics are what
    :func:`batch_norm_backward` takes. When ``running_mean`` and ``running_var`` are given they
    are updated in place: ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased batch variance for ``running_var``, as PyTorch does.

    An empty batch (any zero-size dimension) gives an empty y and leaves the running buffers
    untouched, as ``torch.nn.functional.batch_norm`` does; its saved statistics are NaN.
    """
    return _checked_train_forward(x, weight, bias, eps, running_mean, running_var, momentum,
                                  channels_last, out, relu=False)


def batch_norm_relu_forward(x, weight=None, bias=None, eps=1e-5, *, running_mean=None,
                            running_var=None, momentum=0.1, channels_last=False, out=None):
    """:func:`batch_norm_forward` followed by ReLU, in the same single normalize pass.

    Returns ``(y, save_mean, save_invstd)`` with ``y = max(0, batch_norm(x))`` (NaN stays NaN,
    as in torch.relu); the statistics and the running update are batch_norm_forward's.
    :func:`batch_norm_relu_backward` recomputes the ReLU mask from x and the saved
    statistics, so nothing but those is kept for the backward.
    """
    return _checked_train_forward(x, weight, bias, eps, running_mean, running_var, momentum,
                                  channels_last, out, relu=True)


def _checked_train_forward(x, weight, bias, eps, running_mean, running_var, momentum,
                           channels_last, out, relu):
    x = as_float_array(x)
    n_channels = x.shape[-1 if channels_last else 1] if x.ndim >= 2 else 0
    check_channels(x, n_channels, channels_last)
    weight = channel_vector(weight, n_channels, "weight")
    bias = channel_vector(bias, n_channels, "bias")
    update = running_mean is not None or running_var is not None
    if update:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given together")
        running_mean = channel_vector(running_mean, n_channels, "running_mean", writeable=True)
        running_var = channel_vector(running_var, n_channels, "running_var", writeable=True)
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    return _batch_stats_forward(x, channels_last, weight, bias, eps, momentum,
                                running_mean if update else None, running_var, out, relu)


def _batch_stats_forward(x, channels_last, weight, bias, eps, momentum, running_mean,
                         running_var, out, relu=False):
    """batch_norm_forward (batch_norm_relu_forward with relu) after validation; running
    buffers are updated unless None."""
    n_channels = x.shape[-1 if channels_last else 1]
    if x.size == 0:
        y = checked_output(out, x)
        nan = np.full(n_channels, np.nan)
        return y, nan, nan.copy()
    plan = plan_for(x.shape, channels_last)
    check_batch_size(x, plan)
    x = contiguous(x)
    y = new_or_checked_output(out, x, allow_same=True)
    weight, bias = _params(weight, bias, n_channels, x.dtype)
    update = running_mean is not None
    if not update:
        running_mean = running_var = weight  # never written: the kernel's update flag is off
    saved = np.empty((2, n_channels), np.float64)
    save_mean, save_invstd = saved[0], saved[1]
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        short.train_forward_nchw_short.select(x.size)(
            fmt, plan.view(x), weight, bias, eps, momentum, update, running_mean, running_var,
            plan.sample_block, plan.channel_block, ws.lanes, save_mean, save_invstd, ws.coef,
            relu, plan.view(y))
    elif plan.kind == "planes":
        kernel = _planes_kernel(planes.train_forward_nchw_by_channel,
                                planes.train_forward_nchw_by_block, plan, x.size)
        kernel(fmt, plan.view(x), weight, bias, eps, momentum, update, running_mean, running_var,
               plan.group, plan.chunk, ws.part_a, ws.part_b, save_mean, save_invstd, ws.coef,
               relu, plan.view(y))
    else:
        rows.train_forward_nhwc.select(x.size)(
            fmt, plan.view(x), n_channels, weight, bias, eps, momentum, update, running_mean,
            running_var, plan.block_rows, plan.interleave_rows(x.itemsize), ws.lanes, save_mean,
            save_invstd, ws.coef, ws.coef_lanes, relu, plan.view(y))
    return y, save_mean, save_invstd


def _eval_forward(x, running_mean, running_var, weight, bias, eps, channels_last, out,
                  relu=False):
    x = contiguous(x)
    y = new_or_checked_output(out, x, allow_same=True)
    if x.size == 0:
        return y
    plan = plan_for(x.shape, channels_last)
    weight, bias = _params(weight, bias, plan.n_channels, x.dtype)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        short.eval_forward_nchw_short.select(x.size)(
            fmt, plan.view(x), running_mean, running_var, weight, bias, eps, plan.sample_block,
            plan.channel_block, ws.coef, relu, plan.view(y))
    elif plan.kind == "planes":
        planes.eval_forward_nchw.select(x.size)(fmt, plan.view(x), running_mean, running_var,
                                                weight, bias, eps, plan.group, plan.chunk,
                                                ws.coef, relu, plan.view(y))
    else:
        rows.eval_forward_nhwc.select(x.size)(fmt, plan.view(x), plan.n_channels, running_mean,
                                              running_var, weight, bias, eps, plan.block_rows,
                                              ws.coef, ws.coef_lanes[:3], relu, plan.view(y))
    return y


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, channels_last=False, out=None):
    """Mirror of ``torch.nn.functional.batch_norm`` for NumPy arrays.

    With ``training=True`` the batch statistics normalize x and the running buffers (when not
    None) are updated in place. With ``training=False`` the running statistics normalize x.
    """
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       channels_last, out, relu=False)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, channels_last=False, out=None):
    """:func:`batch_norm` followed by ReLU, in the same single normalize pass:
    ``max(0, batch_norm(...))``, as ``torch.relu(F.batch_norm(...))``."""
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       channels_last, out, relu=True)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                channels_last, out, relu):
    if training:
        return _checked_train_forward(x, weight, bias, eps, running_mean, running_var,
                                      momentum, channels_last, out, relu)[0]
    x = as_float_array(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    n_channels = x.shape[-1 if channels_last else 1]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    running_mean = channel_vector(running_mean, n_channels, "running_mean")
    running_var = channel_vector(running_var, n_channels, "running_var")
    weight = channel_vector(weight, n_channels, "weight")
    bias = channel_vector(bias, n_channels, "bias")
    return _eval_forward(x, running_mean, running_var, weight, bias, check_eps(eps),
                         channels_last, out, relu)


# ----------------------------------------------------------------------------- backward

def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channels_last=False,
                        out=None):
    """Gradients of batch normalization: ``(dx, grad_weight, grad_bias)``.

    With ``training=True``, ``mean`` and ``invstd`` are the ``save_mean`` / ``save_invstd`` of
    :func:`batch_norm_forward` and dx flows through the batch statistics. With
    ``training=False`` they are the running mean and ``1 / sqrt(running_var + eps)`` and dx is
    the gradient of a fixed affine map. grad_weight is ``sum(dy * (x - mean)) * invstd`` and
    grad_bias is ``sum(dy)``, both per channel; they have weight's dtype (x's if weight is None).
    """
    return _backward(dy, x, mean, invstd, weight, None, training, channels_last, out,
                     relu=False)


def batch_norm_relu_backward(dy, x, mean, invstd, weight=None, bias=None, *, training=True,
                             channels_last=False, out=None):
    """Gradients of ``max(0, batch_norm(x))``: ``(dx, grad_weight, grad_bias)``.

    As :func:`batch_norm_backward` for dy masked by the ReLU, with the mask recomputed from x,
    ``mean``, ``invstd``, ``weight`` and ``bias`` inside the backward's own two passes; pass
    the forward's bias (None if it had none). The gradient is 0 where the normalized value is
    exactly 0, as torch.relu's. The recomputed values are the forward's to the bit when
    ``mean`` and ``invstd`` are what it normalized with: its ``save_mean`` and
    ``save_invstd`` in training, and in eval the running mean as float64 and
    :func:`running_invstd` of the running variance.
    """
    return _backward(dy, x, mean, invstd, weight, bias, training, channels_last, out,
                     relu=True)


def _backward(dy, x, mean, invstd, weight, bias, training, channels_last, out, relu):
    x = as_float_array(x)
    dy = as_float_array(dy, "dy")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    n_channels = x.shape[-1 if channels_last else 1]
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x, {x.dtype}, got {dy.dtype}")
    mean = channel_vector(mean, n_channels, "mean")
    invstd = channel_vector(invstd, n_channels, "invstd")
    weight = channel_vector(weight, n_channels, "weight")
    bias = channel_vector(bias, n_channels, "bias")
    param_dtype = weight.dtype if weight is not None else parameter_dtype(x.dtype)
    x = contiguous(x)
    dy = contiguous(dy)
    if out is None:
        dx = np.empty(x.shape, x.dtype)
    else:
        dx = checked_output(out, x)
        check_no_overlap(dx, x, "out", "x")
        check_no_overlap(dx, dy, "out", "dy", allow_same=True)
    grads = np.zeros((2, n_channels), param_dtype)
    grad_weight, grad_bias = grads[0], grads[1]
    if x.size == 0:
        return dx, grad_weight, grad_bias
    plan = plan_for(x.shape, channels_last)
    weight, bias = _params(weight, bias, n_channels, x.dtype)
    mean = mean.astype(np.float64, copy=False)
    invstd = invstd.astype(np.float64, copy=False)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
    if plan.kind == "short":
        pair = short.train_backward_nchw_short if training else short.eval_backward_nchw_short
        pair.select(x.size)(fmt, plan.view(dy), plan.view(x), mean, invstd, weight, bias,
                            plan.sample_block, plan.channel_block, ws.lanes, ws.coef,
                            grad_weight, grad_bias, relu, plan.view(dx))
    elif plan.kind == "planes":
        if training:
            kernel = _planes_kernel(planes.train_backward_nchw_by_channel,
                                    planes.train_backward_nchw_by_block, plan, x.size)
        else:
            kernel = planes.eval_backward_nchw.select(x.size)
        kernel(fmt, plan.view(dy), plan.view(x), mean, invstd, weight, bias, plan.group,
               plan.chunk, ws.part_a, ws.part_b, ws.coef, grad_weight, grad_bias, relu,
               plan.view(dx))
    else:
        if training:
            rows.train_backward_nhwc.select(x.size)(
                fmt, plan.view(dy), plan.view(x), n_channels, mean, invstd, weight, bias,
                plan.block_rows, plan.interleave_rows(x.itemsize, n_inputs=2), ws.lanes, ws.coef,
                ws.coef_lanes, grad_weight, grad_bias, relu, plan.view(dx))
        else:
            rows.eval_backward_nhwc.select(x.size)(
                fmt, plan.view(dy), plan.view(x), n_channels, mean, invstd, weight, bias,
                plan.block_rows, ws.lanes, ws.coef, ws.coef_lanes, grad_weight, grad_bias, relu,
                plan.view(dx))
    return dx, grad_weight, grad_bias


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
    x = contiguous(x)
    y = new_or_checked_output(out, x, allow_same=True)
    if x.size == 0:
        return y
    plan = plan_for(x.shape, channels_last)
    weight, bias = _params(weight, bias, plan.n_channels, x.dtype)
    ws = workspace_for(plan, x.dtype)
    fmt = storage_format(x.dtype)
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
    weight, _ = _params(weight, None, plan.n_channels, x.dtype)
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
