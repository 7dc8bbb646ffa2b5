"""fastbn's kernels as PyTorch custom operators, with autograd and fake (meta) kernels.

Four ops, each a thin call into :mod:`fastbn.functional` on NumPy views of the tensors:

- ``fastbn::batch_norm_train``: normalize with the batch statistics. It mutates nothing (torch
  2.13's ``register_autograd`` rejects ops that do): it returns the updated running statistics
  as new tensors, and the caller copies them into its buffers.
- ``fastbn::batch_norm_eval``: normalize with the running statistics.
- ``fastbn::batch_norm_backward`` and ``fastbn::batch_norm_eval_backward``: their gradients.

Each takes ``relu`` (default False): with it, the op is batch norm followed by ReLU, fused in
the kernels' passes (fastbn.functional's batch_norm_relu_*), and the backward ops take the
forward's bias, from which the kernels recompute the ReLU mask.

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
from .tensors import (array_in_layout, as_array, empty_in_layout, empty_output,
                      in_kernel_layout)

__all__ = ["batch_norm_train", "batch_norm_eval", "batch_norm_backward",
           "batch_norm_eval_backward", "TrainFunction", "EvalFunction"]


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

@_torch_thread_count
def train_in_place(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """(y, save_mean, save_invstd), updating running_mean and running_var (when not None) in
    place, as torch's own kernel does. Saved statistics are float64. With relu, y is
    max(0, batch norm), in the same pass."""
    x, channels_last = in_kernel_layout(x)
    y = empty_output(x)
    forward = F.batch_norm_relu_forward if relu else F.batch_norm_forward
    _, save_mean, save_invstd = forward(
        as_array(x, channels_last), _array(weight), _array(bias), eps,
        running_mean=_array(running_mean), running_var=_array(running_var), momentum=momentum,
        channels_last=channels_last, out=as_array(y, channels_last))
    return y, torch.from_numpy(save_mean), torch.from_numpy(save_invstd)


def train_kernels(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  momentum: float, eps: float, relu: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd, new_running_mean, new_running_var): the op form, which
    mutates nothing; the new running statistics are empty when running_mean is None."""
    new_mean = _running_out(None, x) if running_mean is None else running_mean.clone()
    new_var = _running_out(None, x) if running_var is None else running_var.clone()
    y, save_mean, save_invstd = train_in_place(
        x, weight, bias, None if running_mean is None else new_mean,
        None if running_var is None else new_var, momentum, eps, relu)
    return y, save_mean, save_invstd, new_mean, new_var


batch_norm_train = torch.library.custom_op("fastbn::batch_norm_train", train_kernels,
                                           mutates_args=(), device_types="cpu")


@batch_norm_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    n_channels = x.shape[1]
    return (_empty_output(x), _stats_like(x, n_channels), _stats_like(x, n_channels),
            _running_out(running_mean, x), _running_out(running_var, x))


def _setup_train(ctx, inputs, output, eager=False):
    x, weight, bias, *_ = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.eps = inputs[6]
    ctx.relu = inputs[7]
    ctx.eager = eager


def _backward_train(ctx, grad_y, *_unused):
    x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, grad_y, x, weight, bias, training=True) + (None,) * 5
    backward = backward_kernels if ctx.eager else batch_norm_backward
    dx, grad_weight, grad_bias = backward(grad_y, x, save_mean, save_invstd, weight, bias,
                                          ctx.relu)
    return (dx, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None, None, None, None)


batch_norm_train.register_autograd(_backward_train, setup_context=_setup_train)


# ----------------------------------------------------------------------------- eval forward

@_torch_thread_count
def eval_kernels(x: Tensor, running_mean: Tensor, running_var: Tensor,
                    weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    relu: bool = False) -> Tensor:
    """y normalized with the running statistics (and its ReLU, with relu)."""
    x, channels_last = in_kernel_layout(x)
    y = empty_output(x)
    evaluate = F.batch_norm_relu if relu else F.batch_norm
    evaluate(as_array(x, channels_last), _array(running_mean), _array(running_var),
             _array(weight), _array(bias), training=False, eps=eps, channels_last=channels_last,
             out=as_array(y, channels_last))
    return y


batch_norm_eval = torch.library.custom_op("fastbn::batch_norm_eval", eval_kernels,
                                          mutates_args=(), device_types="cpu")


@batch_norm_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, relu=False):
    return _empty_output(x)


def _setup_eval(ctx, inputs, output, eager=False):
    x, running_mean, running_var, weight, bias, eps, relu = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight, bias)
    ctx.eps = eps
    ctx.relu = relu
    ctx.eager = eager


def _backward_eval(ctx, grad_y):
    x, running_mean, running_var, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():
        dx, grad_weight, grad_bias = _differentiable_backward(
            ctx, grad_y, x, weight, bias, training=False, running=(running_mean, running_var))
    else:
        backward = eval_backward_kernels if ctx.eager else batch_norm_eval_backward
        dx, grad_weight, grad_bias = backward(grad_y, x, running_mean, running_var, weight,
                                              ctx.eps, bias, ctx.relu)
    # Running statistics are buffers: torch gives them no gradient either.
    return (dx, None, None, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None)


batch_norm_eval.register_autograd(_backward_eval, setup_context=_setup_eval)


# ----------------------------------------------------------------------------- backward ops

def _grad_like(weight, x, n_channels):
    dtype = x.dtype if weight is None else weight.dtype
    return x.new_empty((n_channels,), dtype=dtype)


def _run_backward(grad_y, x, mean, invstd, weight, training, bias, relu):
    x, channels_last = in_kernel_layout(x)
    dx = empty_output(x)
    grad_y = array_in_layout(grad_y, channels_last)
    if relu:
        _, grad_weight, grad_bias = F.batch_norm_relu_backward(
            grad_y, as_array(x, channels_last), mean, invstd, _array(weight), _array(bias),
            training=training, channels_last=channels_last, out=as_array(dx, channels_last))
    else:
        _, grad_weight, grad_bias = F.batch_norm_backward(
            grad_y, as_array(x, channels_last), mean, invstd, _array(weight),
            training=training, channels_last=channels_last, out=as_array(dx, channels_last))
    return dx, torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)


@_torch_thread_count
def backward_kernels(grad_y: Tensor, x: Tensor, save_mean: Tensor, save_invstd: Tensor,
                        weight: Optional[Tensor], bias: Optional[Tensor] = None,
                        relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias) of a training forward, through the batch statistics (and
    the ReLU, with relu; bias is then the forward's)."""
    return _run_backward(grad_y, x, save_mean.numpy(), save_invstd.numpy(), weight, True, bias,
                         relu)


batch_norm_backward = torch.library.custom_op("fastbn::batch_norm_backward", backward_kernels,
                                              mutates_args=(), device_types="cpu")


@batch_norm_backward.register_fake
def _(grad_y, x, save_mean, save_invstd, weight, bias=None, relu=False):
    n_channels = x.shape[1]
    return (_empty_output(x), _grad_like(weight, x, n_channels),
            _grad_like(weight, x, n_channels))


@_torch_thread_count
def eval_backward_kernels(grad_y: Tensor, x: Tensor, running_mean: Tensor,
                             running_var: Tensor, weight: Optional[Tensor], eps: float,
                             bias: Optional[Tensor] = None, relu: bool = False
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias) of an eval forward: a fixed per-channel affine map (and
    the ReLU, with relu; bias is then the forward's)."""
    mean = as_array(running_mean).astype(np.float64)
    invstd = F.running_invstd(as_array(running_var), eps)
    return _run_backward(grad_y, x, mean, invstd, weight, False, bias, relu)


batch_norm_eval_backward = torch.library.custom_op(
    "fastbn::batch_norm_eval_backward", eval_backward_kernels, mutates_args=(),
    device_types="cpu")


@batch_norm_eval_backward.register_fake
def _(grad_y, x, running_mean, running_var, weight, eps, bias=None, relu=False):
    n_channels = x.shape[1]
    return (_empty_output(x), _grad_like(weight, x, n_channels),
            _grad_like(weight, x, n_channels))


# ----------------------------------------------------------------------------- eager path

class TrainFunction(torch.autograd.Function):
    """The training op's forward and autograd, without the dispatcher: (y, save_mean,
    save_invstd), with the running statistics updated in place.

    A Python custom op pays for its dispatch in every call (schema defaults, redispatch through
    the autograd and CPU keys): about 60 us of a 130 us forward + backward on a (2, 4, 8, 8)
    tensor. Eager calls take this plain autograd.Function over the same kernels and the same
    backward instead; torch.compile, which needs the registered op and its fake kernel, takes
    the op (see fastbn.torch.functional)."""

    # forward takes ctx (the older form): with a separate setup_context, Function.apply binds
    # its arguments through inspect.signature on every call, which cost 40 us here. Outside the
    # dispatcher the running statistics may be updated in place, which saves two clones and
    # two copies per call.
    @staticmethod
    def forward(ctx, *inputs):
        output = train_in_place(*inputs)
        _setup_train(ctx, inputs, output, eager=True)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward_train(ctx, *grads)


class EvalFunction(torch.autograd.Function):
    """The eval op's forward and autograd, without the dispatcher (see TrainFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = eval_kernels(*inputs)
        _setup_eval(ctx, inputs, output, eager=True)
        return output

    @staticmethod
    def backward(ctx, grad_y):
        return _backward_eval(ctx, grad_y)


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
        if ctx.relu:
            y = torch.relu(y)
        grads = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True,
                                         allow_unused=True) if inputs else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None
                 for t in (x, weight, bias))
