"""The functional layer against the float64 reference: dtypes x ranks x layouts."""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import (LARGE_SHAPES, MEMORY_KINDS, SHAPES, in_memory, make_input, make_params,
                      make_running, physical_shape, shape_id)

shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
large_shapes = pytest.mark.parametrize("shape", LARGE_SHAPES, ids=shape_id)


def forward_scale(y_expected, bias):
    """Magnitudes that enter y = (x - mean) * alpha + beta: |y - bias| and |bias|."""
    bias = 0.0 if bias is None else np.max(np.abs(bias.astype(np.float64)))
    return np.max(np.abs(y_expected)) + 2.0 * bias


def check_train_forward(x, weight, bias, eps, channels_last, momentum=0.1, running=None):
    """Run batch_norm_forward on x and compare everything it returns and updates."""
    dtype = x.dtype
    y_exp, mean_exp, invstd_exp, var_unbiased = ref.forward_train(x, weight, bias, eps,
                                                                  channels_last)
    kwargs = {}
    if running is not None:
        old_mean, old_var = running[0].copy(), running[1].copy()
        kwargs = dict(running_mean=running[0], running_var=running[1], momentum=momentum)
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, weight, bias, eps,
                                                          channels_last=channels_last, **kwargs)
    assert y.dtype == dtype and y.shape == x.shape and y.flags.c_contiguous
    assert save_mean.dtype == np.float64 and save_invstd.dtype == np.float64
    ref.assert_close(y, y_exp, dtype, forward_scale(y_exp, bias), "y")
    # Statistics are accumulated in float64 whatever the input dtype.
    ref.assert_close(save_mean, mean_exp, np.float64, np.max(np.abs(x)), "save_mean")
    ref.assert_close(save_invstd, invstd_exp, np.float64, np.abs(invstd_exp), "save_invstd")
    if running is not None:
        buffer_dtype = running[0].dtype
        exp_mean = ref.update_running(old_mean, mean_exp, momentum)
        exp_var = ref.update_running(old_var, var_unbiased, momentum)
        ref.assert_close(running[0], exp_mean, buffer_dtype,
                         np.abs(old_mean) + np.max(np.abs(x)), "running_mean")
        ref.assert_close(running[1], exp_var, buffer_dtype,
                         np.abs(old_var) + np.abs(var_unbiased), "running_var")
    return y, save_mean, save_invstd


def check_train_backward(dy, x, weight, eps, channels_last, mean, invstd):
    dtype = x.dtype
    dx_exp, gw_exp, gb_exp = ref.backward_train(dy, x, weight, eps, channels_last)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=True,
                                            channels_last=channels_last)
    param_dtype = dtype if weight is None else weight.dtype
    assert dx.dtype == dtype and dx.shape == x.shape
    assert gw.dtype == param_dtype and gb.dtype == param_dtype
    dx_scale, gw_scale, gb_scale = ref.backward_scales(dy, x, mean, invstd, weight,
                                                       channels_last, training=True)
    ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
    ref.assert_close(gw, gw_exp, dtype, gw_scale, "grad_weight")
    ref.assert_close(gb, gb_exp, dtype, gb_scale, "grad_bias")
    return dx, gw, gb


# ----------------------------------------------------------------------------- forward

@shapes
def test_train_forward_matches_reference(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running = make_running(rng, shape[1], dtype)
    check_train_forward(x, weight, bias, 1e-5, channels_last, momentum=0.1, running=running)


@shapes
def test_train_forward_without_affine_or_buffers(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    check_train_forward(x, None, None, 1e-3, channels_last)


@large_shapes
def test_train_forward_large(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running = make_running(rng, shape[1], dtype)
    check_train_forward(x, weight, bias, 1e-5, channels_last, momentum=0.25, running=running)


@shapes
def test_eval_forward_matches_reference(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running_mean, running_var = make_running(rng, shape[1], dtype)
    before = running_mean.copy(), running_var.copy()
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                          eps=1e-5, channels_last=channels_last)
    expected = ref.forward_eval(x, running_mean, running_var, weight, bias, 1e-5, channels_last)
    assert y.dtype == dtype
    ref.assert_close(y, expected, dtype, forward_scale(expected, bias), "y")
    # eval never writes the running statistics
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


@large_shapes
def test_eval_forward_large(shape, channels_last, rng):
    dtype = np.dtype(np.float32)
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running_mean, running_var = make_running(rng, shape[1], dtype)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, False,
                          channels_last=channels_last)
    expected = ref.forward_eval(x, running_mean, running_var, weight, bias, 1e-5, channels_last)
    ref.assert_close(y, expected, dtype, forward_scale(expected, bias), "y")


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_functional_training_updates_buffers_in_place(momentum, dtype, channels_last, rng):
    shape = (3, 4, 5, 2)
    x = make_input(rng, shape, dtype, channels_last)
    running_mean, running_var = make_running(rng, 4, dtype)
    before = running_mean.copy(), running_var.copy()
    y = fastbn.batch_norm(x, running_mean, running_var, training=True, momentum=momentum,
                          eps=1e-5, channels_last=channels_last)
    _, mean, _, var_unbiased = ref.forward_train(x, None, None, 1e-5, channels_last)
    if momentum == 0.0:
        np.testing.assert_array_equal(running_mean, before[0])
        np.testing.assert_array_equal(running_var, before[1])
    ref.assert_close(running_mean, ref.update_running(before[0], mean, momentum), dtype,
                     np.abs(before[0]) + np.max(np.abs(x)), "running_mean")
    ref.assert_close(running_var, ref.update_running(before[1], var_unbiased, momentum), dtype,
                     np.abs(before[1]) + np.abs(var_unbiased), "running_var")
    # The same y as batch_norm_forward, which has its own reference check.
    y_forward = check_train_forward(x, None, None, 1e-5, channels_last)[0]
    np.testing.assert_array_equal(y, y_forward)


def test_functional_training_without_buffers(dtype, channels_last, rng):
    """torch allows running_mean=running_var=None with training=True."""
    x = make_input(rng, (4, 3, 6), dtype, channels_last)
    y = fastbn.batch_norm(x, None, None, training=True, channels_last=channels_last)
    expected = ref.forward_train(x, None, None, 1e-5, channels_last)[0]
    ref.assert_close(y, expected, dtype, forward_scale(expected, None), "y")


def test_two_dimensional_input_is_the_same_in_both_layouts(dtype, rng):
    x = make_input(rng, (9, 5), dtype)
    weight, bias = make_params(rng, 5, dtype)
    first = fastbn.batch_norm_forward(x, weight, bias, channels_last=False)
    last = fastbn.batch_norm_forward(x, weight, bias, channels_last=True)
    for a, b in zip(first, last):
        np.testing.assert_array_equal(a, b)
    y_exp = ref.forward_train(x, weight, bias)[0]
    ref.assert_close(first[0], y_exp, dtype, forward_scale(y_exp, bias))


def test_constant_channel_with_zero_eps_maps_to_bias(dtype, channels_last):
    """var + eps == 0 gives invstd 0 (PyTorch's CPU convention), so y is exactly the bias."""
    x = np.full(physical_shape((3, 2, 4), channels_last), 2.5, dtype)
    bias = np.array([0.25, -1.0], dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, None, bias, 0.0,
                                                channels_last=channels_last)
    np.testing.assert_array_equal(mean, [2.5, 2.5])
    np.testing.assert_array_equal(invstd, [0.0, 0.0])
    expected = ref.forward_train(x, None, bias, 0.0, channels_last)[0]
    np.testing.assert_array_equal(y, expected.astype(dtype))


# ----------------------------------------------------------------------------- backward

@shapes
def test_train_backward_matches_reference(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, 1e-5,
                                                channels_last=channels_last)
    check_train_backward(dy, x, weight, 1e-5, channels_last, mean, invstd)


@large_shapes
def test_train_backward_large(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, _ = make_params(rng, shape[1], dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x, weight, None, 1e-5,
                                                channels_last=channels_last)
    check_train_backward(dy, x, weight, 1e-5, channels_last, mean, invstd)


def eval_backward_check(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, _ = make_params(rng, shape[1], dtype)
    running_mean, running_var = make_running(rng, shape[1], dtype)
    invstd = ref.inverse_std(running_var, 1e-5)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, running_mean.astype(np.float64), invstd,
                                            weight, training=False,
                                            channels_last=channels_last)
    dx_exp, gw_exp, gb_exp = ref.backward_eval(dy, x, running_mean, running_var, weight, 1e-5,
                                               channels_last)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(dy, x, running_mean, invstd, weight,
                                                       channels_last, training=False)
    ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
    ref.assert_close(gw, gw_exp, dtype, gw_scale, "grad_weight")
    ref.assert_close(gb, gb_exp, dtype, gb_scale, "grad_bias")


@shapes
def test_eval_backward_matches_reference(shape, dtype, channels_last, rng):
    eval_backward_check(shape, dtype, channels_last, rng)


@large_shapes
def test_eval_backward_large(shape, channels_last, rng):
    eval_backward_check(shape, np.dtype(np.float32), channels_last, rng)


def test_backward_without_weight_uses_ones(dtype, channels_last, rng):
    shape = (4, 3, 5)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    _, mean, invstd = fastbn.batch_norm_forward(x, channels_last=channels_last)
    without = fastbn.batch_norm_backward(dy, x, mean, invstd, None, channels_last=channels_last)
    ones = fastbn.batch_norm_backward(dy, x, mean, invstd, np.ones(3, dtype),
                                      channels_last=channels_last)
    for a, b in zip(without, ones):
        np.testing.assert_array_equal(a, b)
    check_train_backward(dy, x, None, 1e-5, channels_last, mean, invstd)


# ----------------------------------------------------------------------------- memory layouts

@pytest.mark.parametrize("kind", MEMORY_KINDS[1:])
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (4, 3, 6)], ids=shape_id)
def test_memory_layouts_give_the_contiguous_bits(kind, shape, channels_last, rng):
    """Strided, Fortran-ordered and read-only inputs: same bits as a contiguous copy, and the
    inputs themselves are left untouched."""
    dtype = np.dtype(np.float32)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running_mean, running_var = make_running(rng, shape[1], dtype)
    x_odd, dy_odd = in_memory(x, kind), in_memory(dy, kind)

    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
    y_odd, mean_odd, invstd_odd = fastbn.batch_norm_forward(x_odd, weight, bias,
                                                            channels_last=channels_last)
    for a, b in [(y, y_odd), (mean, mean_odd), (invstd, invstd_odd)]:
        np.testing.assert_array_equal(b, a)
    ref.assert_close(y_odd, ref.forward_train(x, weight, bias, 1e-5, channels_last)[0], dtype,
                     None, "y")

    grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, channels_last=channels_last)
    grads_odd = fastbn.batch_norm_backward(dy_odd, x_odd, mean, invstd, weight,
                                           channels_last=channels_last)
    for a, b in zip(grads, grads_odd):
        np.testing.assert_array_equal(b, a)

    y_eval = fastbn.batch_norm(x, running_mean, running_var, weight, bias, False,
                               channels_last=channels_last)
    y_eval_odd = fastbn.batch_norm(x_odd, running_mean, running_var, weight, bias, False,
                                   channels_last=channels_last)
    np.testing.assert_array_equal(y_eval_odd, y_eval)
    np.testing.assert_array_equal(x_odd, x)
    np.testing.assert_array_equal(dy_odd, dy)


def test_read_only_parameters_and_statistics(dtype, channels_last, rng):
    shape = (3, 4, 5)
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, 4, dtype)
    running_mean, running_var = make_running(rng, 4, dtype)
    y_writeable = fastbn.batch_norm(x, running_mean, running_var, weight, bias, False,
                                    channels_last=channels_last)
    for a in (weight, bias, running_mean, running_var):
        a.setflags(write=False)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, False,
                          channels_last=channels_last)
    np.testing.assert_array_equal(y, y_writeable)


# ----------------------------------------------------------------------------- out=

def test_out_receives_the_result(dtype, channels_last, rng):
    shape = (3, 4, 6)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, 4, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
    out = np.full_like(x, np.nan)
    result = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last, out=out)[0]
    assert result is out
    np.testing.assert_array_equal(out, y)

    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, channels_last=channels_last)[0]
    out = np.full_like(x, np.nan)
    result = fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                        channels_last=channels_last, out=out)[0]
    assert result is out
    np.testing.assert_array_equal(out, dx)


def test_out_may_alias_the_input_elementwise(dtype, channels_last, rng):
    """Forward may write over x, backward over dy: each value is read before it is written."""
    shape = (3, 4, 6)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    running_mean, running_var = make_running(rng, 4, dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, channels_last=channels_last)
    dx = fastbn.batch_norm_backward(dy, x, mean, invstd, channels_last=channels_last)[0]
    y_eval = fastbn.batch_norm(x, running_mean, running_var, channels_last=channels_last)

    buf = x.copy()
    assert fastbn.batch_norm(buf, running_mean, running_var, channels_last=channels_last,
                             out=buf) is buf
    np.testing.assert_array_equal(buf, y_eval)
    dy_buf = dy.copy()
    assert fastbn.batch_norm_backward(dy_buf, x, mean, invstd, channels_last=channels_last,
                                      out=dy_buf)[0] is dy_buf
    np.testing.assert_array_equal(dy_buf, dx)
    buf = x.copy()
    assert fastbn.batch_norm_forward(buf, channels_last=channels_last, out=buf)[0] is buf
    np.testing.assert_array_equal(buf, y)


# ----------------------------------------------------------------------------- moments

@pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES[:1], ids=shape_id)
def test_channel_moments_match_reference(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    count, mean, m2 = fastbn.channel_moments(x, channels_last=channels_last)
    count_exp, mean_exp, m2_exp = ref.channel_moments(x, channels_last)
    assert count.dtype == mean.dtype == m2.dtype == np.float64
    np.testing.assert_array_equal(count, count_exp)
    ref.assert_close(mean, mean_exp, np.float64, np.max(np.abs(x)), "mean")
    ref.assert_close(m2, m2_exp, np.float64, np.abs(m2_exp) + 1e-300, "m2")


# The channels-last statistics pass prefetches once its input reaches
# kernels.prefetch.STREAMED_BYTES (20 MiB), in a loop of its own: (84, 64, 32, 32) is just past
# it in float32 (four lane groups per step) and in float64 (one per step).
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_streamed_channels_last_statistics_match_reference(dtype, rng):
    from fastbn.kernels.prefetch import STREAMED_BYTES
    shape = (84, 64, 32, 32)
    x = make_input(rng, shape, dtype, channels_last=True) + dtype(3.0)
    assert x.nbytes >= STREAMED_BYTES
    count, mean, m2 = fastbn.channel_moments(x, channels_last=True)
    count_exp, mean_exp, m2_exp = ref.channel_moments(x, True)
    np.testing.assert_array_equal(count, count_exp)
    ref.assert_close(mean, mean_exp, np.float64, np.max(np.abs(x)), "mean")
    ref.assert_close(m2, m2_exp, np.float64, np.abs(m2_exp) + 1e-300, "m2")
    weight, bias = make_params(rng, shape[1], dtype)
    check_train_forward(x, weight, bias, 1e-5, True, momentum=0.1,
                        running=make_running(rng, shape[1], dtype))


def test_merged_moments_of_parts_equal_moments_of_whole(dtype, channels_last, rng):
    """Split a batch along N, merge the parts' moments, compare with the whole batch."""
    shape = (7, 3, 5, 4)
    x = make_input(rng, shape, dtype, channels_last)
    parts = [x[:1], x[1:4], x[4:]]
    stacked = [fastbn.channel_moments(p, channels_last=channels_last) for p in parts]
    counts, means, m2s = (np.stack([s[i] for s in stacked]) for i in range(3))
    count, mean, m2 = fastbn.merge_moments(counts, means, m2s)
    count_exp, mean_exp, m2_exp = ref.channel_moments(x, channels_last)
    np.testing.assert_array_equal(count, count_exp)
    ref.assert_close(mean, mean_exp, np.float64, np.max(np.abs(x)), "mean")
    ref.assert_close(m2, m2_exp, np.float64, np.abs(m2_exp), "m2")
    # A single row merges to itself.
    single = fastbn.merge_moments(counts[:1], means[:1], m2s[:1])
    for a, b in zip(single, stacked[0]):
        np.testing.assert_array_equal(a, b)
