"""Extreme values: large offsets, huge magnitudes, constant channels, long reductions, NaN/inf.

Every check compares with a float64 NumPy oracle written out below (or with torch where the
question is what torch does). The 1e8-element reduction allocates 400 MB and is marked slow; a
1e7-element version of the same check runs by default.
"""

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

LAYOUTS = [False, True]
EPS = 1e-5


def _rng(*key):
    return np.random.default_rng(list(key) or [0])


def to_layout(x_cf, channels_last):
    """A C-contiguous array in the requested layout from a channels-first one."""
    return np.ascontiguousarray(np.moveaxis(x_cf, 1, -1) if channels_last else x_cf)


def from_layout(x, channels_last):
    return np.moveaxis(x, -1, 1) if channels_last else x


def oracle(x_cf, weight=None, bias=None, eps=EPS):
    """float64 (y, mean, biased var) of a channels-first array."""
    x = x_cf.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.astype(np.float64).reshape(shape) + bias.astype(np.float64).reshape(shape)
    return y, mean, var


def saved_var(save_invstd, eps=EPS):
    return 1.0 / save_invstd**2 - eps


# (N, C, ...) shapes: a matrix, small planes, and one big enough for the parallel kernels.
OFFSET_SHAPES = [(64, 2), (4, 2, 7, 9), (3, 2, 5), (16, 2, 40, 40), (8, 2, 3, 20, 30)]


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("shape", OFFSET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channels_with_large_means(shape, channels_last):
    # Channel 0 has mean 1e4, channel 1 mean 1e6, both with standard deviation 1.
    rng = _rng(1, len(shape), channels_last)
    offsets = np.array([1e4, 1e6]).reshape((1, 2) + (1,) * (len(shape) - 2))
    x_cf = (rng.standard_normal(shape) + offsets).astype(np.float32)
    y_ref, mean_ref, var_ref = oracle(x_cf)
    count = x_cf.size // 2

    module_cls = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                  5: fastbn.BatchNorm3d}[len(shape)]
    bn = module_cls(2, momentum=1.0, channels_last=channels_last)
    y = from_layout(bn(to_layout(x_cf, channels_last)), channels_last)
    _, save_mean, save_invstd = F.batch_norm_forward(to_layout(x_cf, channels_last),
                                                     channels_last=channels_last)

    var_error = np.abs(saved_var(save_invstd) / var_ref - 1)
    assert var_error.max() <= 1e-4, var_error
    running_var_error = np.abs(bn.running_var / (var_ref * count / (count - 1)) - 1)
    assert running_var_error.max() <= 1e-4, running_var_error
    assert np.abs(save_mean / mean_ref - 1).max() <= 1e-12
    output_error = np.abs(y - y_ref).max()
    assert output_error <= 1e-3, output_error


@pytest.mark.parametrize("channels_last", LAYOUTS)
def test_large_means_backward(channels_last):
    rng = _rng(2, channels_last)
    offsets = np.array([1e4, 1e6]).reshape(1, 2, 1, 1)
    x_cf = (rng.standard_normal((8, 2, 9, 10)) + offsets).astype(np.float32)
    dy_cf = rng.standard_normal(x_cf.shape).astype(np.float32)
    _, mean, var = oracle(x_cf)
    xhat = (x_cf - mean.reshape(1, 2, 1, 1)) / np.sqrt(var.reshape(1, 2, 1, 1) + EPS)
    invstd = 1 / np.sqrt(var + EPS)
    dy64 = dy_cf.astype(np.float64)
    axes = (0, 2, 3)
    dx_ref = invstd.reshape(1, 2, 1, 1) * (
        dy64 - dy64.mean(axes, keepdims=True)
        - xhat * (dy64 * xhat).mean(axes, keepdims=True))
    bn = fastbn.BatchNorm2d(2, channels_last=channels_last)
    bn(to_layout(x_cf, channels_last))
    dx = from_layout(bn.backward(to_layout(dy_cf, channels_last)), channels_last)
    assert np.abs(dx - dx_ref).max() <= 1e-3
    np.testing.assert_allclose(bn.grad_weight, (dy64 * xhat).sum(axes), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("shape", [(16, 3, 20, 20), (64, 3, 32, 32)],
                         ids=["small", "parallel"])
def test_magnitudes_near_1e30(dtype, channels_last, shape):
    rng = _rng(3, channels_last, shape[0])
    z = rng.standard_normal(shape)
    # Spread 1e30 around 0; 1e30 +- 1e27; all negative around -2.4e30.
    x_cf = np.stack([1e30 * z[:, 0], 1e30 + 1e27 * z[:, 1], -3e30 * np.abs(z[:, 2])],
                    axis=1).astype(dtype)
    y_ref, mean_ref, var_ref = oracle(x_cf)
    count = x_cf.size // 3
    x = to_layout(x_cf, channels_last)

    y, save_mean, save_invstd = F.batch_norm_forward(x, channels_last=channels_last)
    assert np.isfinite(y).all() and np.isfinite(save_mean).all()
    var = saved_var(save_invstd)
    assert np.isfinite(var).all() and np.abs(var / var_ref - 1).max() <= 1e-12
    assert np.abs(save_mean / mean_ref - 1).max() <= 1e-12
    assert np.abs(from_layout(y, channels_last) - y_ref).max() <= (1e-5 if dtype == np.float32
                                                                   else 1e-10)

    bn = fastbn.BatchNorm2d(3, momentum=1.0, channels_last=channels_last, dtype=dtype)
    bn(x)
    assert np.isfinite(bn.running_mean).all()
    running_var_ref = var_ref * count / (count - 1)
    if dtype == np.float64:
        assert np.abs(bn.running_var / running_var_ref - 1).max() <= 1e-12
    else:
        # A variance of ~1e54..1e60 has no float32 representation: the float32 buffer holds inf
        # exactly where the float64 value exceeds float32's range, as torch's does.
        too_big = running_var_ref > np.finfo(np.float32).max
        assert np.array_equal(np.isinf(bn.running_var), too_big)

    dy_cf = rng.standard_normal(shape).astype(dtype)
    dx = bn.backward(to_layout(dy_cf, channels_last))
    assert np.isfinite(dx).all()
    assert np.isfinite(bn.grad_weight).all() and np.isfinite(bn.grad_bias).all()


CONSTANTS = {
    np.float32: [0.0, -0.0, 1e-30, -1e-38, 1e-45, 1.0, -7.5, 1e4, 1e6, 1.2345678e7, 3.3e30,
                 -3e38, float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny),
                 0.1, 16777217.0],
    np.float64: [0.0, -0.0, 1e-300, 5e-324, 1.0, -7.5, 1e6, 3.3e30, -1e300,
                 float(np.finfo(np.float64).max), 0.1, 1.0 / 3.0],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("length", [7, 3000], ids=["small", "parallel"])
def test_constant_channels_give_exactly_beta(dtype, channels_last, length):
    values = np.array(CONSTANTS[dtype], dtype)
    n_channels = len(values)
    x_cf = np.ascontiguousarray(np.broadcast_to(values[None, :, None], (5, n_channels, length)))
    weight = np.linspace(0.5, 3.0, n_channels).astype(dtype)
    bias = np.linspace(-1.0, 1.0, n_channels).astype(dtype)
    expected = np.broadcast_to(bias[None, :, None], x_cf.shape)
    x = to_layout(x_cf, channels_last)

    y = F.batch_norm_forward(x, weight, bias, channels_last=channels_last)[0]
    assert np.array_equal(from_layout(y, channels_last), expected)

    bn = fastbn.BatchNorm1d(n_channels, channels_last=channels_last, dtype=dtype)
    bn.weight[...] = weight
    bn.bias[...] = bias
    assert np.array_equal(from_layout(bn(x), channels_last), expected)
    # In eval, a channel equal to its running mean is constant too.
    bn.load_state_dict(dict(bn.state_dict(), running_mean=values,
                            running_var=np.full(n_channels, 2.0, dtype)))
    bn.eval()
    assert np.array_equal(from_layout(bn(x), channels_last), expected)


def _long_channel(n_values, seed):
    """(N, 1, 10**4) float32 with mean ~3 and std 1, filled in slices to cap temporaries."""
    rng = _rng(seed)
    rows = n_values // 10**4
    x = np.empty((rows, 1, 10**4), np.float32)
    for start in range(0, rows, 500):
        stop = min(rows, start + 500)
        x[start:stop] = 3.0 + rng.standard_normal((stop - start, 1, 10**4), dtype=np.float32)
    return x


def _check_long_reduction(x):
    n = x.size
    # Pairwise float64 sums over slices: ~1e-16 relative, far below the bound tested.
    mean_ref = sum(float(x[i:i + 500].sum(dtype=np.float64))
                   for i in range(0, len(x), 500)) / n
    for channels_last, xin in ((False, x), (True, x.reshape(n, 1))):
        count, mean, m2 = F.channel_moments(xin, channels_last=channels_last)
        assert count[0] == n
        assert abs(mean[0] / mean_ref - 1) <= 1e-6
        _, save_mean, save_invstd = F.batch_norm_forward(xin, channels_last=channels_last,
                                                         out=np.empty_like(xin))
        assert abs(save_mean[0] / mean_ref - 1) <= 1e-6
        assert abs(saved_var(save_invstd[0]) - 1.0) <= 1e-3


def test_long_reduction_1e7():
    _check_long_reduction(_long_channel(10**7, 5))


@pytest.mark.slow
def test_long_reduction_1e8():
    _check_long_reduction(_long_channel(10**8, 6))


# ----------------------------------------------------------------------------- NaN and inf

def _poisoned(rng, shape, n_bad):
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    for index in rng.choice(flat.size, n_bad, replace=False):
        flat[index] = rng.choice([np.nan, np.inf, -np.inf])
    return x


def _same_kind(actual, expected):
    """Same NaN / +inf / -inf pattern, and finite values close."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    for test in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(test(actual), test(expected)):
            return False
    finite = np.isfinite(expected)
    return np.allclose(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3), (2, 3, 40, 40)],
                         ids=["planes", "matrix", "parallel"])
def test_nan_and_inf_propagate_like_torch(shape, channels_last):
    torch = pytest.importorskip("torch")
    rng = _rng(7, len(shape), shape[-1], channels_last)
    module_cls = fastbn.BatchNorm1d if len(shape) == 2 else fastbn.BatchNorm2d
    torch_cls = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
    weight = np.array([1.5, -2.0, 0.5], np.float32)
    bias = np.array([0.1, 0.2, 0.3], np.float32)
    for trial in range(40):
        training = trial % 4 != 0
        x_cf = _poisoned(rng, shape, 1 + trial % 3)
        if trial % 5 == 0:  # a channel of only +inf, or of +inf and finite values
            x_cf[:, trial % 3] = np.inf
        dy_cf = rng.standard_normal(shape).astype(np.float32)

        tb = torch_cls(3).train(training)
        with torch.no_grad():
            tb.weight.copy_(torch.from_numpy(weight))
            tb.bias.copy_(torch.from_numpy(bias))
            tb.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            tb.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
        xt = torch.from_numpy(x_cf.copy()).requires_grad_()
        yt = tb(xt)
        yt.backward(torch.from_numpy(dy_cf))

        fb = module_cls(3, channels_last=channels_last).train(training)
        fb.load_state_dict({key: value.detach().numpy().copy()
                            for key, value in tb.state_dict().items()})
        fb.num_batches_tracked = 0
        fb.load_state_dict(dict(fb.state_dict(),
                                running_mean=np.array([0.1, -0.2, 0.3], np.float32),
                                running_var=np.array([2.0, 0.5, 1.0], np.float32)))
        y = from_layout(fb(to_layout(x_cf, channels_last)), channels_last)
        dx = from_layout(fb.backward(to_layout(dy_cf, channels_last)), channels_last)

        what = f"trial {trial}, training={training}"
        assert _same_kind(y, yt.detach().numpy()), what
        assert _same_kind(dx, xt.grad.numpy()), what
        assert _same_kind(fb.running_mean, tb.running_mean.numpy()), what
        assert _same_kind(fb.running_var, tb.running_var.numpy()), what
        assert _same_kind(fb.grad_weight, tb.weight.grad.numpy()), what
        assert _same_kind(fb.grad_bias, tb.bias.grad.numpy()), what


@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 4, 5, 5), (8, 4, 64, 32)], ids=["small", "parallel"])
def test_bad_values_leave_other_channels_alone(shape, training, channels_last):
    rng = _rng(8, shape[0], training, channels_last)
    clean = rng.standard_normal(shape).astype(np.float32)
    dy = to_layout(rng.standard_normal(shape).astype(np.float32), channels_last)
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = clean.copy()
        poisoned[1, 2, 3, 4] = bad  # channel 2 only
        results = []
        for x_cf in (clean, poisoned):
            bn = fastbn.BatchNorm2d(4, channels_last=channels_last).train(training)
            bn.running_mean[...] = 0.25
            y = from_layout(bn(to_layout(x_cf, channels_last)), channels_last)
            dx = from_layout(bn.backward(dy), channels_last)
            results.append((y, dx, bn.running_mean.copy(), bn.running_var.copy(),
                            bn.grad_weight.copy(), bn.grad_bias.copy()))
        others = [0, 1, 3]
        for clean_result, poisoned_result in zip(*results):
            assert np.array_equal(clean_result[..., others] if clean_result.ndim == 1
                                  else clean_result[:, others],
                                  poisoned_result[..., others] if poisoned_result.ndim == 1
                                  else poisoned_result[:, others])
        y = results[1][0]
        if training:
            # The batch statistics of channel 2 are NaN, so all of its outputs are.
            assert np.isnan(y[:, 2]).all()
        else:
            # The running statistics are finite, so only the bad element is affected.
            expected = np.isnan(poisoned[:, 2]) | np.isinf(poisoned[:, 2])
            assert np.array_equal(~np.isfinite(y[:, 2]), expected)
