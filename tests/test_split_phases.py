"""The split training phases a SyncBatchNorm is built from, against the float64 reference.

batch_norm_normalize, batch_norm_grad_sums and batch_norm_grad_input over dtypes x ranks x
layouts (and the large shapes that run the parallel twins), on one batch and on a batch cut
into shards whose partials are combined. On one batch they also give the fused kernels' bits.
"""

import numpy as np
import pytest

import fastbn

import reference as ref
from conftest import LARGE_SHAPES, SHAPES, make_input, make_params, shape_id

shapes = pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES, ids=shape_id)


def reference_grad_sums(dy, x, mean, channels_last):
    xc = ref.channels_first(x, channels_last)
    dyc = ref.channels_first(dy, channels_last)
    axes = (0,) + tuple(range(2, xc.ndim))
    centered = xc - np.asarray(mean).reshape((1, -1) + (1,) * (xc.ndim - 2))
    return np.stack([dyc.sum(axis=axes), (dyc * centered).sum(axis=axes)])


@shapes
def test_phases_match_reference_and_fused_kernels(shape, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    y_exp, mean_exp, invstd_exp, _ = ref.forward_train(x, weight, bias,
                                                       channels_last=channels_last)
    y_fused, mean, invstd = fastbn.batch_norm_forward(x, weight, bias,
                                                      channels_last=channels_last)

    y = fastbn.batch_norm_normalize(x, mean, invstd, weight, bias, channels_last=channels_last)
    assert y.dtype == dtype and y.shape == x.shape
    ref.assert_close(y, ref.normalize(x, mean, invstd, weight, bias, channels_last), dtype,
                     np.max(np.abs(y_exp)) + 2 * np.max(np.abs(bias)), "y")
    assert np.array_equal(y, y_fused), "normalize differs from the fused training forward"

    sums = fastbn.batch_norm_grad_sums(dy, x, mean, channels_last=channels_last)
    sums_exp = reference_grad_sums(dy, x, mean, channels_last)
    dyc = np.abs(ref.channels_first(dy, channels_last))
    xc = ref.channels_first(x, channels_last)
    axes = (0,) + tuple(range(2, xc.ndim))
    dev = np.abs(xc - np.asarray(mean).reshape((1, -1) + (1,) * (xc.ndim - 2)))
    assert sums.dtype == np.float64 and sums.shape == (2, shape[1])
    ref.assert_close(sums[0], sums_exp[0], dtype, dyc.sum(axis=axes), "sum(dy)")
    ref.assert_close(sums[1], sums_exp[1], dtype, (dyc * (dev + np.abs(xc))).sum(axis=axes),
                     "sum(dy * (x - mean))")

    count = x.size // shape[1]
    dx = fastbn.batch_norm_grad_input(dy, x, mean, invstd, sums, count, weight,
                                      channels_last=channels_last)
    dx_exp, _, _ = ref.backward_train(dy, x, weight, channels_last=channels_last)
    dx_scale, _, _ = ref.backward_scales(dy, x, mean_exp, invstd_exp, weight, channels_last)
    ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
    dx_fused, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                channels_last=channels_last)
    assert np.array_equal(dx, dx_fused), "grad_input differs from the fused backward"


@pytest.mark.parametrize("shape", [(9, 4, 6), (9, 3, 5, 4), (9, 5)], ids=shape_id)
def test_shards_combine_to_the_whole_batch(shape, channels_last, rng):
    """Moments merged and gradient sums added over shards (one empty) give the whole batch's
    dx on every shard, in float64 within 1e-12 of scale."""
    x = make_input(rng, shape, np.float64, channels_last)
    dy = make_input(rng, shape, np.float64, channels_last)
    weight, bias = make_params(rng, shape[1], np.float64)
    cuts = [0, 2, 2, 9]
    shards = [(x[a:b], dy[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    parts = [fastbn.channel_moments(xs, channels_last=channels_last) for xs, _ in shards
             if len(xs)]
    count, mean, m2 = fastbn.merge_moments(*(np.stack(p) for p in zip(*parts)))
    invstd = ref.inverse_std(m2 / count, 1e-5)
    sums = sum(fastbn.batch_norm_grad_sums(dys, xs, mean, channels_last=channels_last)
               for xs, dys in shards)
    y_exp, mean_exp, invstd_exp, _ = ref.forward_train(x, weight, bias,
                                                       channels_last=channels_last)
    dx_exp, _, _ = ref.backward_train(dy, x, weight, channels_last=channels_last)
    dx_scale, _, _ = ref.backward_scales(dy, x, mean_exp, invstd_exp, weight, channels_last)
    for (a, b), (xs, dys) in zip(zip(cuts[:-1], cuts[1:]), shards):
        y = fastbn.batch_norm_normalize(xs, mean, invstd, weight, bias,
                                        channels_last=channels_last)
        ref.assert_close(y, y_exp[a:b], np.float64, np.max(np.abs(y_exp)) + 2, "y shard")
        dx = fastbn.batch_norm_grad_input(dys, xs, mean, invstd, sums, count[0], weight,
                                          channels_last=channels_last)
        ref.assert_close(dx, dx_exp[a:b], np.float64, dx_scale, "dx shard")


def test_empty_shard_gives_empty_output_and_zero_sums():
    x = np.zeros((0, 3, 4), np.float32)
    stats = np.zeros(3)
    assert fastbn.batch_norm_normalize(x, stats, stats).shape == x.shape
    assert np.array_equal(fastbn.batch_norm_grad_sums(x, x, stats), np.zeros((2, 3)))
    assert fastbn.batch_norm_grad_input(x, x, stats, stats, np.zeros((2, 3)), 5).shape == x.shape


def test_phase_arguments_are_checked():
    x = np.ones((4, 3), np.float32)
    stats = np.zeros(3)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        fastbn.batch_norm_normalize(x, np.zeros(2), stats)
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        fastbn.batch_norm_grad_sums(x.astype(np.float64), x, stats)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        fastbn.batch_norm_grad_input(x[:2], x, stats, stats, np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match=r"grad_sums must have shape \(2, 3\)"):
        fastbn.batch_norm_grad_input(x, x, stats, stats, np.zeros(3), 4)
    with pytest.raises(ValueError, match="count must be positive and at least"):
        fastbn.batch_norm_grad_input(x, x, stats, stats, np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="out must not be x"):
        fastbn.batch_norm_grad_input(np.ones_like(x), x, stats, stats, np.zeros((2, 3)), 4,
                                     out=x)


@pytest.mark.parametrize("buffer_dtype", [np.float32, np.float64])
def test_merged_stats_update_running_buffers_like_batch_norm_forward(buffer_dtype, rng):
    x = make_input(rng, (9, 4, 5), np.float64)
    running = [np.full(4, 0.5, buffer_dtype), np.full(4, 2.0, buffer_dtype)]
    expected = [r.copy() for r in running]
    fastbn.batch_norm_forward(x, running_mean=expected[0], running_var=expected[1],
                              momentum=0.3)
    count, mean, m2 = fastbn.channel_moments(x)
    invstd = fastbn.batch_norm_merged_stats(count[0], mean, m2, running_mean=running[0],
                                                       running_var=running[1], momentum=0.3)
    _, _, invstd_exp, _ = ref.forward_train(x)
    ref.assert_close(invstd, invstd_exp, np.float64, invstd_exp, "invstd")
    assert np.array_equal(running[0], expected[0]) and np.array_equal(running[1], expected[1])
    with pytest.raises(ValueError, match="count must be above 1 here, got 1.0"):
        fastbn.batch_norm_merged_stats(1, mean, m2, running_mean=running[0],
                                                  running_var=running[1])
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        fastbn.batch_norm_merged_stats(5, mean, m2, running_mean=running[0])
