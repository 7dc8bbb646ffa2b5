"""fastbn's kernels as PyTorch custom operators, with autograd and fake (meta) kernels.

Four ops, each a thin call into :mod:`fastbn.functional` on NumPy views of the tensors:

- ``fastbn::batch_norm_train``: normalize with the batch statistics. It mutates nothing (torch
  2.13's ``register_autograd`` rejects ops that do): it returns the updated running statistics
  as new tensors, and the caller copies them into its buffers.
- ``fastbn::batch_norm_eval``: normalize with the running statistics.
- ``fastbn::batch_norm_backward`` and ``fastbn::batch_norm_eval_backward``: their gradients.

Validation is the functional layer's; a bad call raises its ValueError or TypeError before any
kernel runs. Double backward (``create_graph=True``) differentiates a torch-ops formulation of
the same function, so second-order gradients are exact rather than silently truncated.
"""

import functools
from typing import Optional

import numba
import numpy as np
import torch
from torch import Tensor

from .. import functional as F
from ..kernels.jit import num_threads
from .tensors import array_in_layout, as_array, empty_in_layout, in_kernel_layout

__all__ = ["batch_norm_train", "batch_norm_eval", "batch_norm_backward",
           "batch_norm_eval_backward"]


def _torch_thread_count(kernel_call):
    """Run the kernels with torch's thread count (torch.set_num_threads), capped by Numba's
    pool size: a model limited to one thread, as in data-loader workers or one process per
    core, keeps its batch norms on one thread too."""
    @functools.wraps(kernel_call)
    def call(*args, **kwargs):
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if threads == numba.get_num_threads():
            return kernel_call(*args, **kwargs)
        with num_threads(threads):
            return kernel_call(*args, **kwargs)
    return call


def _empty_output(x):
    """The output a kernel writes for input x: what the real ops allocate, for fake tensors."""
    return empty_in_layout(*in_kernel_layout(x))


def _array(t, channels_last=False):
    return None if t is None else as_array(t, channels_last)


def _stats_like(x, n_channels):
    return x.new_empty((n_channels,), dtype=torch.float64)


def _running_out(buffer, x):
    """The new-running-statistic output: like the buffer, or empty when there is none."""
    return x.new_empty((0,)) if buffer is None else torch.empty_like(buffer)


# ----------------------------------------------------------------------------- training forward

@torch.library.custom_op("fastbn::batch_norm_train", mutates_args=(), device_types="cpu")
@_torch_thread_count
def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     momentum: float, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd, new_running_mean, new_running_var); the last two are empty
    when running_mean is None. Saved statistics are float64."""
    x, channels_last = in_kernel_layout(x)
    y = empty_in_layout(x, channels_last)
    new_mean = None if running_mean is None else running_mean.clone()
    new_var = None if running_var is None else running_var.clone()
    _, save_mean, save_invstd = F.batch_norm_forward(
        as_array(x, channels_last), _array(weight), _array(bias), eps,
        running_mean=_array(new_mean), running_var=_array(new_var), momentum=momentum,
        channels_last=channels_last, out=as_array(y, channels_last))
    return (y, torch.from_numpy(save_mean), torch.from_numpy(save_invstd),
            _running_out(None, x) if new_mean is None else new_mean,
            _running_out(None, x) if new_var is None else new_var)


@batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    n_channels = x.shape[1]
    return (_empty_output(x), _stats_like(x, n_channels), _stats_like(x, n_channels),
            _running_out(running_mean, x), _running_out(running_var, x))


def _setup_train(ctx, inputs, output):
    x, weight, bias, *_ = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.eps = inputs[6]


def _backward_train(ctx, grad_y, *_unused):
    x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, grad_y, x, weight, bias, training=True) + (None,) * 4
    dx, grad_weight, grad_bias = batch_norm_backward(grad_y, x, save_mean, save_invstd, weight)
    return (dx, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None, None, None)


batch_norm_train.register_autograd(_backward_train, setup_context=_setup_train)


# ----------------------------------------------------------------------------- eval forward

@torch.library.custom_op("fastbn::batch_norm_eval", mutates_args=(), device_types="cpu")
@_torch_thread_count
def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """y normalized with the running statistics."""
    x, channels_last = in_kernel_layout(x)
    y = empty_in_layout(x, channels_last)
    F.batch_norm(as_array(x, channels_last), _array(running_mean), _array(running_var),
                 _array(weight), _array(bias), training=False, eps=eps,
                 channels_last=channels_last, out=as_array(y, channels_last))
    return y


@batch_norm_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps):
    return _empty_output(x)


def _setup_eval(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight, bias)
    ctx.eps = eps


def _backward_eval(ctx, grad_y):
    x, running_mean, running_var, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx, grad_weight, grad_bias = _differentiable_backward(
            ctx, grad_y, x, weight, bias, training=False, running=(running_mean, running_var))
    else:
        dx, grad_weight, grad_bias = batch_norm_eval_backward(grad_y, x, running_mean,
                                                              running_var, weight, ctx.eps)
    # Running statistics are buffers: torch gives them no gradient either.
    return (dx, None, None, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None)


batch_norm_eval.register_autograd(_backward_eval, setup_context=_setup_eval)


# ----------------------------------------------------------------------------- backward ops

def _grad_like(weight, x, n_channels):
    dtype = x.dtype if weight is None else weight.dtype
    return x.new_empty((n_channels,), dtype=dtype)


def _run_backward(grad_y, x, mean, invstd, weight, training):
    x, channels_last = in_kernel_layout(x)
    dx = empty_in_layout(x, channels_last)
    _, grad_weight, grad_bias = F.batch_norm_backward(
        array_in_layout(grad_y, channels_last), as_array(x, channels_last), mean, invstd,
        _array(weight), training=training, channels_last=channels_last,
        out=as_array(dx, channels_last))
    return dx, torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=(), device_types="cpu")
@_torch_thread_count
def batch_norm_backward(grad_y: Tensor, x: Tensor, save_mean: Tensor, save_invstd: Tensor,
                        weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias) of a training forward, through the batch statistics."""
    return _run_backward(grad_y, x, save_mean.numpy(), save_invstd.numpy(), weight, True)


@batch_norm_backward.register_fake
def _(grad_y, x, save_mean, save_invstd, weight):
    n_channels = x.shape[1]
    return (_empty_output(x), _grad_like(weight, x, n_channels),
            _grad_like(weight, x, n_channels))


@torch.library.custom_op("fastbn::batch_norm_eval_backward", mutates_args=(),
                         device_types="cpu")
@_torch_thread_count
def batch_norm_eval_backward(grad_y: Tensor, x: Tensor, running_mean: Tensor,
                             running_var: Tensor, weight: Optional[Tensor], eps: float
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias) of an eval forward: a fixed per-channel affine map."""
    mean = as_array(running_mean).astype(np.float64)
    invstd = F.running_invstd(as_array(running_var), eps)
    return _run_backward(grad_y, x, mean, invstd, weight, False)


@batch_norm_eval_backward.register_fake
def _(grad_y, x, running_mean, running_var, weight, eps):
    n_channels = x.shape[1]
    return (_empty_output(x), _grad_like(weight, x, n_channels),
            _grad_like(weight, x, n_channels))


# ----------------------------------------------------------------------------- double backward

def _differentiable_backward(ctx, grad_y, x, weight, bias, training, running=None):
    """First-order gradients built from torch ops, so that autograd can differentiate them
    again (``create_graph=True``). The kernels' backward treats the batch statistics as
    constants of the second pass; dropping their dependence on x here would give a wrong
    second derivative, so the statistics are recomputed from x inside the graph."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    with torch.enable_grad():
        inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
        if training:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
        else:
            mean = running[0].reshape(shape)
            var = running[1].reshape(shape)
        y = (x - mean) * torch.rsqrt(var + ctx.eps)
        if weight is not None:
            y = y * weight.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True,
                                         allow_unused=True) if inputs else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None
                 for t in (x, weight, bias))
