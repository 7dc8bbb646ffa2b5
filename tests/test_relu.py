"""Fused BatchNorm + ReLU: the functional layer against the float64 reference, and the
backward's recomputed mask against the forward's output, bit for bit.

Reference comparisons use kinked_input with kink_bias (conftest): the ReLU's kink lies in a gap
of the data, far from every value, so the float64 mask is the only right one. The mask tests
use plain and quantized data, where many pre-activations are tiny or exactly 0.
"""

import numpy as np
import pytest

import fastbn
import fastbn.functional
import reference as ref
from conftest import (LARGE_SHAPES, kink_bias, kinked_input, kinked_step, make_input,
                      make_params, make_running, shape_id)

# Even batch sizes (kinked_input mirrors samples in pairs); ranks 2 to 5, short and long
# planes, one value per channel per sample.
SHAPES = [(6, 3), (4, 5, 7), (2, 3, 5, 4), (2, 1, 3, 4), (2, 2, 3, 2, 3), (2, 3, 130, 130),
          (8, 16, 16, 17), (2048, 5)]
shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
affine = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])


def kinked_case(rng, shape, dtype, channels_last, affine, running=None):
    """x, dy, weight, bias with the kink in a gap; running=(mean, var) places it for eval."""
    x, center, spread = kinked_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    if running is None:
        mean, var, _ = ref.batch_mean_var(x, channels_last)
    else:
        mean, var = running
    if not affine:
        if running is not None:  # the kink sits at the running mean: put that in a gap
            running[0][...] = center + spread * rng.integers(-2, 3, shape[1])
        return x, dy, None, None
    weight, _ = make_params(rng, shape[1], dtype)
    bias = kink_bias(rng, weight, mean, ref.inverse_std(var, 1e-5), center, spread, dtype)
    return x, dy, weight, bias


def pre_scale(pre, bias):
    """Magnitudes entering (x - mean) * alpha + beta: |pre - bias| and |bias|."""
    bias = 0.0 if bias is None else np.max(np.abs(bias.astype(np.float64)))
    return np.max(np.abs(pre)) + 2.0 * bias


@shapes
@affine
def test_train_forward_and_backward_match_the_reference(shape, affine, dtype, channels_last,
                                                        rng):
    x, dy, weight, bias = kinked_case(rng, shape, dtype, channels_last, affine)
    running = [a.copy() for a in make_running(rng, shape[1], dtype)]
    plain_running = [a.copy() for a in running]
    y, mean, invstd = fastbn.batch_norm_relu_forward(
        x, weight, bias, running_mean=running[0], running_var=running[1],
        channels_last=channels_last)
    pre = ref.forward_train(x, weight, bias, 1e-5, channels_last)[0]
    assert y.dtype == x.dtype and y.shape == x.shape
    ref.assert_close(y, ref.relu(pre), dtype, pre_scale(pre, bias), "y")
    assert np.count_nonzero(y == 0) > 0 and np.count_nonzero(y > 0) > 0
    # The same pass as batch_norm_forward: same statistics and updates, y its ReLU, bitwise.
    y_plain, mean_plain, invstd_plain = fastbn.batch_norm_forward(
        x, weight, bias, running_mean=plain_running[0], running_var=plain_running[1],
        channels_last=channels_last)
    np.testing.assert_array_equal(y, np.where(y_plain <= 0, 0, y_plain).astype(x.dtype))
    for got, expected in [(mean, mean_plain), (invstd, invstd_plain),
                          (running[0], plain_running[0]), (running[1], plain_running[1])]:
        np.testing.assert_array_equal(got, expected)

    dx, gw, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                 channels_last=channels_last)
    dx_exp, gw_exp, gb_exp = ref.relu_backward_train(dy, x, weight, bias, 1e-5, channels_last)
    masked = np.where(ref.relu_mask(pre), dy.astype(np.float64), 0.0)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(masked, x, mean, invstd, weight,
                                                       channels_last, training=True)
    param_dtype = dtype if weight is None else weight.dtype
    assert dx.dtype == dtype and gw.dtype == param_dtype and gb.dtype == param_dtype
    ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
    ref.assert_close(gw, gw_exp, dtype, gw_scale, "grad_weight")
    ref.assert_close(gb, gb_exp, dtype, gb_scale, "grad_bias")


@shapes
@affine
def test_eval_forward_and_backward_match_the_reference(shape, affine, dtype, channels_last,
                                                       rng):
    running_mean, running_var = make_running(rng, shape[1], dtype)
    x, dy, weight, bias = kinked_case(rng, shape, dtype, channels_last, affine,
                                      running=(running_mean, running_var))
    y = fastbn.batch_norm_relu(x, running_mean, running_var, weight, bias, training=False,
                               channels_last=channels_last)
    pre = ref.forward_eval(x, running_mean, running_var, weight, bias, 1e-5, channels_last)
    ref.assert_close(y, ref.relu(pre), dtype, pre_scale(pre, bias), "y")
    assert np.count_nonzero(y == 0) > 0 and np.count_nonzero(y > 0) > 0
    y_plain = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                                channels_last=channels_last)
    np.testing.assert_array_equal(y, np.where(y_plain <= 0, 0, y_plain).astype(x.dtype))

    mean = running_mean.astype(np.float64)
    invstd = fastbn.functional.running_invstd(running_var, 1e-5)
    dx, gw, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                 training=False, channels_last=channels_last)
    dx_exp, gw_exp, gb_exp = ref.relu_backward_eval(dy, x, running_mean, running_var, weight,
                                                    bias, 1e-5, channels_last)
    masked = np.where(ref.relu_mask(pre), dy.astype(np.float64), 0.0)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(masked, x, mean, invstd, weight,
                                                       channels_last, training=False)
    ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
    ref.assert_close(gw, gw_exp, dtype, gw_scale, "grad_weight")
    ref.assert_close(gb, gb_exp, dtype, gb_scale, "grad_bias")


def quantized_input(rng, shape, dtype, channels_last):
    """Small integers in mirrored pairs: every channel's mean is exactly 0, so with bias 0
    every x == 0 has a pre-activation of exactly 0, and many others are tiny after rounding
    when the bias is a random float."""
    half = (shape[0] // 2,) + tuple(shape[1:])
    v = rng.integers(-3, 4, half).astype(np.float64)
    x = np.concatenate([v, -v])
    if channels_last and len(shape) > 2:
        x = np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(x, dtype=dtype)


@pytest.mark.parametrize("data", ["plain", "quantized", "quantized_bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES + LARGE_SHAPES[:1], ids=shape_id)
def test_the_backward_mask_is_the_forward_output_bit_for_bit(shape, data, training, dtype,
                                                             channels_last, rng):
    """The fused backward recomputes each pre-activation; if one bit differed from the
    forward's, a value at the kink would be masked on one side only. So the fused backward
    must equal batch_norm_backward of dy zeroed where the fused forward's y is 0, exactly."""
    if data == "plain":
        x = make_input(rng, shape, dtype, channels_last)
        weight, bias = make_params(rng, shape[1], dtype)
    else:
        x = quantized_input(rng, shape, dtype, channels_last)
        weight, bias = make_params(rng, shape[1], dtype)
        if data == "quantized":
            bias[...] = 0
    dy = make_input(rng, shape, dtype, channels_last)
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_forward(x, weight, bias,
                                                         channels_last=channels_last)
    else:
        running_mean, running_var = make_running(rng, shape[1], dtype)
        if data == "quantized":
            running_mean[...] = 1  # the kink at x == 1 exactly
        y = fastbn.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                   channels_last=channels_last)
        mean = running_mean.astype(np.float64)
        invstd = fastbn.functional.running_invstd(running_var, 1e-5)
    if data == "quantized":
        assert np.count_nonzero(y == 0) > np.count_nonzero(y < 0)  # exact zeros abound
    masked = np.where(y > 0, dy, 0).astype(dtype)
    fused = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                            training=training, channels_last=channels_last)
    plain = fastbn.batch_norm_backward(masked, x, mean, invstd, weight, training=training,
                                       channels_last=channels_last)
    for name, got, expected in zip(["dx", "grad_weight", "grad_bias"], fused, plain):
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_gradient_at_exactly_zero_is_zero(dtype, channels_last):
    """A constant channel normalizes to exactly its bias; with bias 0 every value sits on
    the kink, where torch.relu's gradient is 0: no gradient reaches that channel at all."""
    rng = np.random.default_rng(7)
    shape = (4, 3, 5, 6)
    x = make_input(rng, shape, dtype, channels_last)
    channel = (slice(None),) * (len(shape) - 1) + (1,) if channels_last else (slice(None), 1)
    x[channel] = 0.75
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, 3, dtype)
    bias[1] = 0
    y, mean, invstd = fastbn.batch_norm_relu_forward(x, weight, bias,
                                                     channels_last=channels_last)
    assert np.all(y[channel] == 0)
    dx, gw, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                 channels_last=channels_last)
    assert gb[1] == 0 and gw[1] == 0 and np.all(dx[channel] == 0)
    # Without the ReLU the same channel gets the full sum of dy.
    assert fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                      channels_last=channels_last)[2][1] != 0


def test_nan_passes_through_relu_as_in_torch(dtype):
    """torch.relu(nan) is nan and its gradient there is the incoming one."""
    x = np.array([[1.0, 2.0], [np.nan, 0.5], [3.0, -1.0]], dtype)
    weight, bias = np.ones(2, dtype), np.zeros(2, dtype)
    y, mean, invstd = fastbn.batch_norm_relu_forward(x, weight, bias)
    assert np.all(np.isnan(y[:, 0]))
    assert np.all(np.isfinite(y[:, 1])) and np.all(y[:, 1] >= 0)
    dy = np.ones_like(x)
    dx, _, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias)
    assert gb[0] == 3  # every value of the NaN channel passes its gradient
    assert gb[1] == np.count_nonzero(y[:, 1] > 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masked_inf_and_nan_gradients_give_zero_as_in_torch(training, dtype, channels_last):
    """torch's threshold_backward selects 0 where the ReLU was off, whatever dy holds there;
    a product dy * mask would turn inf and NaN into NaN for the whole channel."""
    rng = np.random.default_rng(13)
    shape = (4, 3, 8, 8)
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, 3, dtype)
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_forward(x, weight, bias,
                                                         channels_last=channels_last)
    else:
        running_mean, running_var = make_running(rng, 3, dtype)
        y = fastbn.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                   channels_last=channels_last)
        mean = running_mean.astype(np.float64)
        invstd = fastbn.functional.running_invstd(running_var, 1e-5)
    dy = make_input(rng, shape, dtype, channels_last)
    off = np.flatnonzero(y.reshape(-1) == 0)
    assert off.size >= 2
    dy.reshape(-1)[off[0]] = np.inf
    dy.reshape(-1)[off[1]] = np.nan
    dx, gw, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                 training=training,
                                                 channels_last=channels_last)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(gw)) and np.all(np.isfinite(gb))
    masked = np.where(y > 0, dy, 0).astype(dtype)
    for got, expected in zip((dx, gw, gb), fastbn.batch_norm_backward(
            masked, x, mean, invstd, weight, training=training, channels_last=channels_last)):
        np.testing.assert_array_equal(got, expected)


def test_relu_backward_checks_bias_like_weight(rng):
    x = make_input(rng, (4, 3), np.float32)
    _, mean, invstd = fastbn.batch_norm_relu_forward(x)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        fastbn.batch_norm_relu_backward(x, x, mean, invstd, None, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="bias must be a float32 or float64 ndarray"):
        fastbn.batch_norm_relu_backward(x, x, mean, invstd, None, [0.0, 0.0, 0.0])


def test_empty_batch(dtype, channels_last):
    x = np.zeros((0, 3, 4) if not channels_last else (0, 4, 3), dtype)
    y, mean, invstd = fastbn.batch_norm_relu_forward(x, channels_last=channels_last)
    assert y.shape == x.shape and np.all(np.isnan(mean))
    dx, gw, gb = fastbn.batch_norm_relu_backward(x, x, mean, invstd,
                                                 channels_last=channels_last)
    assert dx.shape == x.shape and np.all(gw == 0) and np.all(gb == 0)


# ----------------------------------------------------------------------------- modules

CONFIGS = [dict(), dict(momentum=None), dict(momentum=0.3, eps=1e-3), dict(affine=False),
           dict(track_running_stats=False)]
configs = pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "defaults")
MODULE_SHAPES = [(6, 3), (4, 3, 7), (2, 3, 5, 4), (2, 2, 3, 2, 3)]
BNRELU_FOR_RANK = {2: fastbn.BNReLU1d, 3: fastbn.BNReLU1d, 4: fastbn.BNReLU2d,
                   5: fastbn.BNReLU3d}
BATCHNORM_FOR_RANK = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                      5: fastbn.BatchNorm3d}


@configs
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=shape_id)
def test_module_matches_reference_batch_norm_then_relu(config, shape, dtype, channels_last,
                                                       rng):
    module = BNRELU_FOR_RANK[len(shape)](shape[1], channels_last=channels_last, dtype=dtype,
                                         **config)
    reference = ref.ReferenceBatchNorm(shape[1], channels_last=channels_last, **config)
    if module.affine:
        module.weight[...] = make_params(rng, shape[1], dtype)[0]
    for mode in ["train", "train", "eval", "train", "eval"]:
        module.train(mode == "train")
        reference.training = mode == "train"
        x, dy, bias = kinked_step(rng, module, shape, dtype, channels_last)
        if module.affine:
            reference.weight = module.weight.astype(np.float64)
            reference.bias = bias.astype(np.float64)
        y = module(x)
        pre = reference.forward(x)
        ref.assert_close(y, ref.relu(pre), dtype, pre_scale(pre, module.bias), "y")
        if module.track_running_stats:
            assert module.num_batches_tracked == reference.num_batches_tracked
            ref.assert_close(module.running_mean, reference.running_mean, dtype,
                             reference.mean_scale, "running_mean")
            ref.assert_close(module.running_var, reference.running_var, dtype,
                             reference.var_scale, "running_var")
        dx = module.backward(dy)
        masked = np.where(ref.relu_mask(pre), dy.astype(np.float64), 0.0)
        dx_exp, gw_exp, gb_exp = reference.backward(masked)
        dx_scale, gw_scale, gb_scale = reference.backward_scales(masked)
        ref.assert_close(dx, dx_exp, dtype, dx_scale, "dx")
        if module.affine:
            ref.assert_close(module.grad_weight, gw_exp, dtype, gw_scale, "grad_weight")
            ref.assert_close(module.grad_bias, gb_exp, dtype, gb_scale, "grad_bias")
        else:
            assert module.grad_weight is None and module.grad_bias is None


def test_modules_share_batch_norm_s_constructor_members_and_checks():
    """Same base, same constructor, state and checks as the BatchNorm modules."""
    for relu_class, bn_class in [(fastbn.BNReLU1d, fastbn.BatchNorm1d),
                                 (fastbn.BNReLU2d, fastbn.BatchNorm2d),
                                 (fastbn.BNReLU3d, fastbn.BatchNorm3d)]:
        assert issubclass(relu_class, bn_class)
        fused = relu_class(4, eps=1e-3, momentum=None, channels_last=True, dtype=np.float64)
        plain = bn_class(4, eps=1e-3, momentum=None, channels_last=True, dtype=np.float64)
        assert vars(fused).keys() == vars(plain).keys()
        assert repr(fused) == repr(plain).replace(bn_class.__name__, relu_class.__name__)
        assert fused.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ValueError, match=r"BNReLU2d \(channels_first\) expects input of shape "
                                         r"\(N, C, H, W\), got 3D"):
        fastbn.BNReLU2d(3)(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="num_features must be at least 1"):
        fastbn.BNReLU1d(0)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        fastbn.BNReLU3d(2).backward(np.zeros((2, 2, 1, 1, 1), np.float32))


def test_module_output_is_relu_of_the_batch_norm_module_bit_for_bit(dtype, channels_last):
    """Same state, same steps: BNReLU2d's y is BatchNorm2d's with negatives zeroed, and its
    buffers are BatchNorm2d's, to the bit; eval too."""
    rng = np.random.default_rng(3)
    shape = (4, 3, 6, 5)
    fused = fastbn.BNReLU2d(3, channels_last=channels_last, dtype=dtype)
    plain = fastbn.BatchNorm2d(3, channels_last=channels_last, dtype=dtype)
    weight, bias = make_params(rng, 3, dtype)
    for module in (fused, plain):
        module.weight[...] = weight
        module.bias[...] = bias
    for mode in [True, True, False]:
        x = make_input(rng, shape, dtype, channels_last)
        y_fused = fused.train(mode)(x)
        y_plain = plain.train(mode)(x)
        np.testing.assert_array_equal(y_fused, np.where(y_plain <= 0, 0, y_plain).astype(dtype))
        for key, value in plain.state_dict().items():
            np.testing.assert_array_equal(fused.state_dict()[key], value, err_msg=key)
        dy = make_input(rng, shape, dtype, channels_last)
        dx = fused.backward(dy)
        dx_plain = plain.backward(np.where(y_fused > 0, dy, 0).astype(dtype))
        np.testing.assert_array_equal(dx, dx_plain)
        np.testing.assert_array_equal(fused.grad_weight, plain.grad_weight)
        np.testing.assert_array_equal(fused.grad_bias, plain.grad_bias)


def readme_example(heading, index=0):
    """The index-th ```python block after `heading` in README.md, exactly as written."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index(heading):]
    start = 0
    for _ in range(index + 1):
        start = section.index("```python\n", start) + len("```python\n")
    return section[start:section.index("```", start)]


@pytest.mark.parametrize("heading", ["## Fused BatchNorm + ReLU",
                                     "## Folding batch norm into the preceding layer"])
def test_readme_examples_run_as_written(heading):
    exec(compile(readme_example(heading), f"README {heading}", "exec"), {})


@pytest.mark.torch
def test_readme_torch_example_runs_as_written():
    pytest.importorskip("torch")
    exec(compile(readme_example("## Fused BatchNorm + ReLU", 1), "README torch", "exec"), {})
