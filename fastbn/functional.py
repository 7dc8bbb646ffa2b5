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

The moment and split-phase functions (channel_moments, merge_moments and the phases a
SyncBatchNorm runs around its exchanges) live in :mod:`fastbn.phases` and are re-exported here.
"""

import numba
import numpy as np

from .kernels import nchw as planes
from .kernels import nchw_short as short
from .kernels import nhwc as rows
from ._layout import params_or_defaults, plan_channel_map, plan_for, storage_format, workspace_for
from .phases import (batch_norm_grad_input, batch_norm_grad_sums, batch_norm_merged_stats,  # noqa: F401
                     batch_norm_normalize, channel_moments, merge_moments)
from ._validate import (as_float_array, channel_vector, check_batch_size, check_channels,
                        check_eps, check_momentum, check_no_overlap, checked_output,
                        contiguous, new_or_checked_output, parameter_dtype)

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward", "channel_moments",
           "merge_moments", "batch_norm_merged_stats", "batch_norm_normalize",
           "batch_norm_grad_sums", "batch_norm_grad_input", "batch_norm_relu",
           "batch_norm_relu_forward", "batch_norm_relu_backward"]

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
    weight, bias = params_or_defaults(weight, bias, n_channels, x.dtype)
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
    x, y, plan, weight, bias, ws, fmt = plan_channel_map(x, weight, bias, channels_last, out)
    if plan is None:
        return y
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
    weight, bias = params_or_defaults(weight, bias, n_channels, x.dtype)
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
