"""Slow, readable float64 NumPy batch normalization that every fastbn result is compared to.

Everything here is written the way the textbook (and PyTorch's documentation) states it, with
no attempt at speed: move the channel axis to position 1, reduce over every other axis, apply
the formula. All arithmetic is float64 whatever the input dtype, so for float32 input the
reference is the exact answer for the values the fast code actually saw.

Semantics (PyTorch's):
- batch statistics normalize when ``training or not track_running_stats``, running ones
  otherwise;
- normalization uses the biased variance, the running_var update the unbiased one;
- ``running = (1 - momentum) * running + momentum * batch``; momentum=None is a cumulative
  average with factor ``1 / num_batches_tracked``;
- ``invstd = 1 / sqrt(var + eps)``, defined as 0 where ``var + eps == 0`` (PyTorch's CPU kernel).
"""

import numpy as np

# Relative tolerance per input dtype. float64: the fast kernels accumulate in float64 in another
# order than NumPy, and a few hundred ulps (eps64 = 2.2e-16) of the operands' magnitude covers
# that for the sizes tested. float32: outputs, coefficients and the shifted differences are
# rounded to float32 (eps32 = 1.2e-7) a handful of times; 1e-5 is ~80 ulps of the magnitude.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def rtol(dtype):
    return RTOL[np.dtype(dtype)]


def assert_close(actual, expected, dtype, scale=None, what="result"):
    """Assert |actual - expected| <= rtol(dtype) * scale elementwise.

    ``scale`` is the magnitude of the quantities that enter the computation (a scalar or an
    array broadcastable to expected); by default the largest |expected|, at least 1e-300 so an
    all-zero expectation demands zeros. The check always runs: shapes must match exactly.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0)
    scale = np.maximum(np.asarray(scale, dtype=np.float64), 1e-300)
    error = np.abs(actual.astype(np.float64) - expected)
    bound = rtol(dtype) * scale
    ok = error <= bound
    if not np.all(ok):
        worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.ndim else ()
        raise AssertionError(
            f"{what} ({np.dtype(dtype)}): {np.count_nonzero(~ok)} of {error.size} values off; "
            f"worst at {worst}: got {actual[worst]!r}, expected {expected[worst]!r}, "
            f"|error| {error[worst]:.3g} > bound {np.broadcast_to(bound, error.shape)[worst]:.3g}")


# ----------------------------------------------------------------------------- layout

def channels_first(x, channels_last):
    """x as a float64 (N, C, *spatial) array."""
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, -1, 1) if channels_last and x.ndim > 2 else x


def restore_layout(x_cf, channels_last):
    """Inverse of channels_first."""
    return np.moveaxis(x_cf, 1, -1) if channels_last and x_cf.ndim > 2 else x_cf


def _reduce_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def _per_channel(v, ndim):
    """A (C,) vector shaped to broadcast against (N, C, *spatial)."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def values_per_channel(x, channels_last):
    x = channels_first(x, channels_last)
    return x.size // x.shape[1]


# ----------------------------------------------------------------------------- statistics

def channel_moments(x, channels_last):
    """Per-channel (count, mean, m2) in float64."""
    xc = channels_first(x, channels_last)
    axes = _reduce_axes(xc.ndim)
    n = xc.size // xc.shape[1]
    mean = xc.mean(axis=axes)
    m2 = ((xc - _per_channel(mean, xc.ndim)) ** 2).sum(axis=axes)
    return np.full(xc.shape[1], float(n)), mean, m2


def batch_mean_var(x, channels_last):
    """Per-channel (mean, biased var, unbiased var) of x in float64."""
    count, mean, m2 = channel_moments(x, channels_last)
    n = count[0]
    var_unbiased = m2 / (n - 1) if n > 1 else np.full_like(m2, np.nan)
    return mean, m2 / n, var_unbiased


def inverse_std(var, eps):
    """1 / sqrt(var + eps), and 0 where var + eps == 0, in float64."""
    total = np.asarray(var, dtype=np.float64) + eps
    safe = np.where(total == 0.0, 1.0, total)
    return np.where(total == 0.0, 0.0, 1.0 / np.sqrt(safe))


def update_running(running, batch_value, momentum):
    """(1 - momentum) * running + momentum * batch_value, in float64."""
    return (1.0 - momentum) * np.asarray(running, np.float64) + momentum * np.asarray(
        batch_value, np.float64)


# ----------------------------------------------------------------------------- forward

def normalize(x, mean, invstd, weight, bias, channels_last):
    """(x - mean) * invstd * weight + bias per channel, float64, in x's layout."""
    xc = channels_first(x, channels_last)
    n_channels = xc.shape[1]
    weight = np.ones(n_channels) if weight is None else weight
    bias = np.zeros(n_channels) if bias is None else bias
    nd = xc.ndim
    y = ((xc - _per_channel(mean, nd)) * _per_channel(invstd, nd) * _per_channel(weight, nd)
         + _per_channel(bias, nd))
    return restore_layout(y, channels_last)


def forward_train(x, weight=None, bias=None, eps=1e-5, channels_last=False):
    """(y, mean, invstd, var_unbiased) normalizing x with its own batch statistics."""
    mean, var, var_unbiased = batch_mean_var(x, channels_last)
    invstd = inverse_std(var, eps)
    return normalize(x, mean, invstd, weight, bias, channels_last), mean, invstd, var_unbiased


def forward_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5,
                 channels_last=False):
    """y normalizing x with the given running statistics."""
    return normalize(x, running_mean, inverse_std(running_var, eps), weight, bias,
                     channels_last)


# ----------------------------------------------------------------------------- backward

def _backward_inputs(dy, x, weight, channels_last):
    """x and dy channels-first in float64, their rank, the reduced axes, and weight (ones when
    None) in float64."""
    xc = channels_first(x, channels_last)
    dyc = channels_first(dy, channels_last)
    weight = np.ones(xc.shape[1]) if weight is None else np.asarray(weight, np.float64)
    return xc, dyc, xc.ndim, _reduce_axes(xc.ndim), weight


def backward_train(dy, x, weight=None, eps=1e-5, channels_last=False):
    """(dx, grad_weight, grad_bias) through the batch statistics.

    With xhat = (x - mean) * invstd and n values per channel,
    dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    xc, dyc, nd, axes, weight = _backward_inputs(dy, x, weight, channels_last)
    mean, var, _ = batch_mean_var(x, channels_last)
    invstd = inverse_std(var, eps)
    xhat = (xc - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    grad_bias = dyc.sum(axis=axes)
    grad_weight = (dyc * xhat).sum(axis=axes)
    dx = _per_channel(weight * invstd, nd) * (
        dyc - _per_channel(dyc.mean(axis=axes), nd)
        - xhat * _per_channel((dyc * xhat).mean(axis=axes), nd))
    return restore_layout(dx, channels_last), grad_weight, grad_bias


def backward_eval(dy, x, running_mean, running_var, weight=None, eps=1e-5, channels_last=False):
    """(dx, grad_weight, grad_bias) of the fixed affine map that eval mode applies."""
    xc, dyc, nd, axes, weight = _backward_inputs(dy, x, weight, channels_last)
    invstd = inverse_std(running_var, eps)
    xhat = (xc - _per_channel(running_mean, nd)) * _per_channel(invstd, nd)
    dx = dyc * _per_channel(weight * invstd, nd)
    return restore_layout(dx, channels_last), (dyc * xhat).sum(axis=axes), dyc.sum(axis=axes)


def backward_scales(dy, x, mean, invstd, weight=None, channels_last=False, training=True):
    """Tolerance scales (dx, grad_weight, grad_bias): the magnitudes of the terms summed.

    Training: dx = w*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)), so the scale is
    |w*invstd| * (max|dy| + |mean(dy)| + max|xhat| * |mean(dy*xhat)|) per channel; eval:
    dx = dy*w*invstd, so |w*invstd| * max|dy|. grad_weight = sum(dy*xhat) and grad_bias =
    sum(dy) are scaled by sum|dy*xhat| and sum|dy| per channel. mean and invstd are the
    statistics the forward normalized with (batch in training, running in eval).
    """
    xc = channels_first(x, channels_last)
    dyc = channels_first(dy, channels_last)
    nd = xc.ndim
    axes = _reduce_axes(nd)
    w = np.ones(xc.shape[1]) if weight is None else np.abs(np.asarray(weight, np.float64))
    invstd = np.asarray(invstd, np.float64)
    xhat = (xc - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    term = np.max(np.abs(dyc), axis=axes)
    if training:
        term = term + np.abs(dyc.mean(axis=axes)) + (np.max(np.abs(xhat), axis=axes)
                                                     * np.abs((dyc * xhat).mean(axis=axes)))
    dx_scale = np.max(w * invstd * term)
    return dx_scale, np.abs(dyc * xhat).sum(axis=axes), np.abs(dyc).sum(axis=axes)


# ----------------------------------------------------------------------------- ReLU

def relu(y):
    """max(y, 0) with NaN kept, as torch.relu."""
    y = np.asarray(y, np.float64)
    return np.where(y <= 0.0, 0.0, y)


def relu_mask(pre):
    """Where ReLU passes the gradient: above 0 or NaN; 0 exactly is masked (torch.relu)."""
    return ~(np.asarray(pre, np.float64) <= 0.0)


def relu_backward_train(dy, x, weight=None, bias=None, eps=1e-5, channels_last=False):
    """(dx, grad_weight, grad_bias) of relu(batch norm) through the batch statistics: the
    batch-norm gradient of dy masked where the float64 pre-activation is not above 0."""
    pre = forward_train(x, weight, bias, eps, channels_last)[0]
    masked = np.where(relu_mask(pre), np.asarray(dy, np.float64), 0.0)
    return backward_train(masked, x, weight, eps, channels_last)


def relu_backward_eval(dy, x, running_mean, running_var, weight=None, bias=None, eps=1e-5,
                       channels_last=False):
    """(dx, grad_weight, grad_bias) of relu of the eval-mode affine map."""
    pre = forward_eval(x, running_mean, running_var, weight, bias, eps, channels_last)
    masked = np.where(relu_mask(pre), np.asarray(dy, np.float64), 0.0)
    return backward_eval(masked, x, running_mean, running_var, weight, eps, channels_last)


# ----------------------------------------------------------------------------- module

class ReferenceBatchNorm:
    """torch.nn.BatchNorm semantics in float64: the state machine the modules must follow."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, channels_last=False):
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.channels_last = channels_last
        self.training = True
        self.weight = np.ones(num_features) if affine else None
        self.bias = np.zeros(num_features) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None
        # Largest magnitudes that have entered the buffers: each buffer is a convex combination
        # of its initial value and the batch statistics, so these scale its rounding error.
        self.mean_scale = 0.0
        self.var_scale = 1.0

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            y, mean, _, var_unbiased = forward_train(x, self.weight, self.bias, self.eps,
                                                     self.channels_last)
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                factor = (1.0 / self.num_batches_tracked if self.momentum is None
                          else self.momentum)
                self.running_mean = update_running(self.running_mean, mean, factor)
                self.running_var = update_running(self.running_var, var_unbiased, factor)
                self.mean_scale = max(self.mean_scale, float(np.max(np.abs(mean))))
                self.var_scale = max(self.var_scale, float(np.max(var_unbiased)))
        else:
            y = forward_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps, self.channels_last)
        if use_batch_stats:
            mean, var, _ = batch_mean_var(x, self.channels_last)
        else:
            mean, var = self.running_mean.copy(), self.running_var.copy()
        self._saved = (np.asarray(x, np.float64), use_batch_stats, mean, var)
        return y

    def backward(self, dy):
        """(dx, grad_weight, grad_bias) for the last forward."""
        x, use_batch_stats, mean, var = self._saved
        if use_batch_stats:
            return backward_train(dy, x, self.weight, self.eps, self.channels_last)
        return backward_eval(dy, x, mean, var, self.weight, self.eps, self.channels_last)

    def backward_scales(self, dy):
        """Tolerance scales for the last backward; see :func:`backward_scales`."""
        x, use_batch_stats, mean, var = self._saved
        return backward_scales(dy, x, mean, inverse_std(var, self.eps), self.weight,
                               self.channels_last, use_batch_stats)
