"""Shared cases for the fastbn.torch suites: tensors in every memory format the bridge routes,
and the tolerance scales of tests/reference.py applied to torch tensors."""

import copy

import numpy as np
import pytest
import torch

import reference as ref
from conftest import make_input, make_params

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
TORCH_BATCHNORM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                   5: torch.nn.BatchNorm3d}

# How a (N, C, ...) tensor's memory is laid out; each takes a different route in the bridge:
# contiguous -> channels-first kernels, channels_last (4-D, 5-D) -> channels-last kernels on the
# permuted view, strided (and 3-D (N, L, C) memory) -> copied to contiguous once.
MEMORY_FORMATS = {2: ["contiguous"], 3: ["contiguous", "channels_last", "strided"],  # 3-D: copied
                  4: ["contiguous", "channels_last", "strided"],
                  5: ["contiguous", "channels_last"]}


def in_format(t, memory_format):
    """t's values with the given memory layout."""
    if memory_format == "contiguous":
        return t.contiguous()
    if memory_format == "channels_last":
        out = t.movedim(1, -1).contiguous().movedim(-1, 1)
        assert not out.is_contiguous() or min(t.shape[1], t[0, 0].numel()) == 1
        return out
    if memory_format == "strided":
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(memory_format)


def random_tensor(rng, shape, dtype, memory_format="contiguous"):
    """Per-channel offset and spread (see conftest.make_input), in the given memory format."""
    return in_format(torch.from_numpy(make_input(rng, shape, dtype)), memory_format)


def random_params(rng, n_channels, dtype):
    weight, bias = make_params(rng, n_channels, dtype)
    return torch.from_numpy(weight), torch.from_numpy(bias)


def as_float64(t):
    return t.detach().to(torch.float64).contiguous().numpy()


def forward_scale(x, mean, var, weight, bias, eps):
    """max over channels of |x| * |alpha| + |mean| * |alpha| + 2|b|, alpha = w * invstd:
    the magnitudes torch's float32 y = x * alpha + beta rounds (see test_torch_parity)."""
    xc = as_float64(x)
    axes = (0,) + tuple(range(2, xc.ndim))
    n_channels = xc.shape[1]
    w = np.ones(n_channels) if weight is None else np.abs(as_float64(weight))
    b = np.zeros(n_channels) if bias is None else np.abs(as_float64(bias))
    alpha = w * ref.inverse_std(np.asarray(var, np.float64), eps)
    return np.max(np.max(np.abs(xc), axis=axes) * alpha + np.abs(mean) * alpha + 2 * b)


def batch_stats(x):
    """float64 (mean, biased var, unbiased var) of a channels-first tensor."""
    return ref.batch_mean_var(as_float64(x), False)


def backward_scales(dy, x, mean, var, eps, weight, training):
    return ref.backward_scales(as_float64(dy), as_float64(x), mean,
                               ref.inverse_std(np.asarray(var, np.float64), eps),
                               None if weight is None else as_float64(weight), False, training)


def compiled_copy(model, warmup):
    """torch.compile of a copy of model, run once on warmup; skips the test, with the reason,
    on a machine where torch.compile cannot build its C++ kernels."""
    try:
        compiled = torch.compile(copy.deepcopy(model))
        compiled(warmup)
    except Exception as error:  # noqa: BLE001 - a machine without a working compiler
        if "compiler" in str(error).lower() or "cpp" in str(error).lower():
            pytest.skip(f"torch.compile cannot run here: {error}")
        raise
    return compiled


def assert_same_step(expected, actual, x, output_tol, grad_tol):
    """expected(x) and actual(x) agree, and so do the input gradients of sum(y ** 2), each
    model run on its own copy of x; tolerances are (rtol, atol) pairs."""
    x_expected, x_actual = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_expected, y_actual = expected(x_expected), actual(x_actual)
    torch.testing.assert_close(y_actual, y_expected, rtol=output_tol[0], atol=output_tol[1])
    y_expected.square().sum().backward()
    y_actual.square().sum().backward()
    torch.testing.assert_close(x_actual.grad, x_expected.grad, rtol=grad_tol[0],
                               atol=grad_tol[1])
