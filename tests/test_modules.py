"""BatchNorm1d/2d/3d against the reference state machine: modes, buffers, state dicts."""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import (MODULE_FOR_RANK, SHAPES, make_input, make_params, physical_shape,
                      shape_id)


def scale_of(expected, module):
    bias = 0.0 if module.bias is None else np.max(np.abs(module.bias.astype(np.float64)))
    return np.max(np.abs(expected)) + 2.0 * bias


def assert_same_state(module, reference, dtype):
    """Buffers and counters of the module equal the reference's."""
    assert module.num_batches_tracked == reference.num_batches_tracked
    if reference.running_mean is None:
        assert module.running_mean is None and module.running_var is None
        return
    assert module.running_mean.dtype == dtype and module.running_var.dtype == dtype
    # Each step rounds the buffers to dtype once; a few steps stay within a few ulps.
    ref.assert_close(module.running_mean, reference.running_mean, dtype, reference.mean_scale,
                     "running_mean")
    ref.assert_close(module.running_var, reference.running_var, dtype, reference.var_scale,
                     "running_var")


def run_steps(module, reference, steps, dtype, rng, shape, channels_last):
    """Feed the same batches to both (mode per step: 'train' or 'eval'), compare everything."""
    for mode in steps:
        module.train(mode == "train")
        reference.training = mode == "train"
        x = make_input(rng, shape, dtype, channels_last)
        y = module(x)
        expected = reference.forward(x)
        assert y.dtype == dtype and y.shape == x.shape
        ref.assert_close(y, expected, dtype, scale_of(expected, module), f"y ({mode})")
        assert_same_state(module, reference, dtype)
        dy = make_input(rng, shape, dtype, channels_last)
        dx = module.backward(dy)
        dx_exp, gw_exp, gb_exp = reference.backward(dy)
        dx_scale, gw_scale, gb_scale = reference.backward_scales(dy)
        ref.assert_close(dx, dx_exp, dtype, dx_scale, f"dx ({mode})")
        if module.weight is None:
            assert module.grad_weight is None and module.grad_bias is None
        else:
            assert module.grad_weight.dtype == module.grad_bias.dtype == dtype
            ref.assert_close(module.grad_weight, gw_exp, dtype, gw_scale, "grad_weight")
            ref.assert_close(module.grad_bias, gb_exp, dtype, gb_scale, "grad_bias")


CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.5, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False, momentum=None),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (3, 2, 4, 5), (2, 3, 2, 3, 4)],
                         ids=shape_id)
def test_module_follows_reference(config, shape, dtype, channels_last, rng):
    cls = MODULE_FOR_RANK[len(shape)]
    module = cls(shape[1], channels_last=channels_last, dtype=dtype, **config)
    reference = ref.ReferenceBatchNorm(shape[1], channels_last=channels_last, **config)
    if module.weight is not None:
        weight, bias = make_params(rng, shape[1], dtype)
        module.weight[...] = weight
        module.bias[...] = bias
        reference.weight, reference.bias = weight.astype(np.float64), bias.astype(np.float64)
    steps = ["train", "train", "eval", "train", "eval", "eval", "train"]
    run_steps(module, reference, steps, dtype, rng, shape, channels_last)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_modules_accept_every_shape_of_their_rank(shape, channels_last, rng):
    dtype = np.dtype(np.float32)
    module = MODULE_FOR_RANK[len(shape)](shape[1], channels_last=channels_last)
    reference = ref.ReferenceBatchNorm(shape[1], channels_last=channels_last)
    run_steps(module, reference, ["train", "eval"], dtype, rng, shape, channels_last)


# ----------------------------------------------------------------------------- the seed's case

def test_seed_golden_case():
    """Seed 002: BatchNorm1d(4, eps=0, momentum=0.3) fed ones((2, 4, 1)) four times."""
    module = fastbn.BatchNorm1d(4, eps=0, momentum=0.3)
    x = np.ones((2, 4, 1), np.float32)
    expected_mean = [0.3, 0.51, 0.657, 0.7599]
    expected_var = [0.7, 0.49, 0.343, 0.2401]
    for step in range(4):
        y = module(x)
        # A constant channel with eps=0 normalizes to exactly 0 (invstd is defined as 0).
        np.testing.assert_array_equal(y, np.zeros((2, 4, 1), np.float32))
        ref.assert_close(module.running_mean, np.full(4, expected_mean[step]), np.float32,
                         1.0, f"running_mean after step {step + 1}")
        ref.assert_close(module.running_var, np.full(4, expected_var[step]), np.float32,
                         1.0, f"running_var after step {step + 1}")
        assert module.num_batches_tracked == step + 1
    y = module.eval()(x)
    ref.assert_close(y, np.full((2, 4, 1), 0.49), np.float32, 1.0, "eval output")


def test_seed_golden_case_float64_channels_last():
    module = fastbn.BatchNorm1d(4, eps=0, momentum=0.3, channels_last=True, dtype=np.float64)
    x = np.ones((2, 1, 4))
    for _ in range(4):
        np.testing.assert_array_equal(module(x), np.zeros((2, 1, 4)))
    ref.assert_close(module.running_mean, np.full(4, 0.7599), np.float64, 1.0)
    ref.assert_close(module.running_var, np.full(4, 0.2401), np.float64, 1.0)
    ref.assert_close(module.eval()(x), np.full((2, 1, 4), 0.49), np.float64, 1.0)


# ----------------------------------------------------------------------------- modes and state

def test_train_and_eval_return_self_and_set_the_mode():
    module = fastbn.BatchNorm2d(3)
    assert module.training is True
    assert module.eval() is module and module.training is False
    assert module.train() is module and module.training is True
    assert module.train(False) is module and module.training is False


def test_defaults_and_buffers_like_torch():
    module = fastbn.BatchNorm2d(3)
    assert (module.eps, module.momentum, module.affine, module.track_running_stats) == (
        1e-5, 0.1, True, True)
    assert module.weight.dtype == np.float32
    np.testing.assert_array_equal(module.weight, np.ones(3))
    np.testing.assert_array_equal(module.bias, np.zeros(3))
    np.testing.assert_array_equal(module.running_mean, np.zeros(3))
    np.testing.assert_array_equal(module.running_var, np.ones(3))
    assert module.num_batches_tracked == 0
    bare = fastbn.BatchNorm1d(3, affine=False, track_running_stats=False)
    assert bare.weight is None and bare.bias is None
    assert bare.running_mean is None and bare.running_var is None
    assert bare.num_batches_tracked is None


def test_without_running_stats_eval_uses_batch_statistics(dtype, channels_last, rng):
    module = fastbn.BatchNorm2d(3, track_running_stats=False, channels_last=channels_last,
                                dtype=dtype)
    x = make_input(rng, (4, 3, 3, 5), dtype, channels_last)
    y_train = module(x)
    y_eval = module.eval()(x)
    np.testing.assert_array_equal(y_eval, y_train)
    expected = ref.forward_train(x, None, None, 1e-5, channels_last)[0]
    ref.assert_close(y_eval, expected, dtype, None, "y")
    assert module.running_mean is None and module.num_batches_tracked is None


def test_eval_does_not_touch_buffers(dtype, rng):
    module = fastbn.BatchNorm1d(4, dtype=dtype)
    module(make_input(rng, (5, 4, 3), dtype))
    state = module.state_dict()
    module.eval()(make_input(rng, (5, 4, 3), dtype))
    module.backward(make_input(rng, (5, 4, 3), dtype))
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_momentum_none_is_a_cumulative_average(dtype, rng):
    """With momentum=None the running mean is the plain average of the batch means."""
    module = fastbn.BatchNorm1d(3, momentum=None, dtype=dtype)
    means, variances = [], []
    for _ in range(5):
        x = make_input(rng, (6, 3, 4), dtype)
        module(x)
        mean, _, var_unbiased = ref.batch_mean_var(x, False)
        means.append(mean)
        variances.append(var_unbiased)
    ref.assert_close(module.running_mean, np.mean(means, axis=0), dtype,
                     np.max(np.abs(means)) + 1.0, "running_mean")
    # The initial running_var of 1 is forgotten after the first step (factor 1/1).
    ref.assert_close(module.running_var, np.mean(variances, axis=0), dtype,
                     np.max(variances), "running_var")
    assert module.num_batches_tracked == 5


def test_reset_running_stats_and_parameters(rng):
    module = fastbn.BatchNorm2d(3)
    module.weight[...] = [2.0, 3.0, 4.0]
    module.bias[...] = [1.0, -1.0, 0.5]
    module(make_input(rng, (2, 3, 4, 4), np.float32))
    assert module.num_batches_tracked == 1
    weight_id = id(module.weight)
    module.reset_running_stats()
    np.testing.assert_array_equal(module.running_mean, np.zeros(3))
    np.testing.assert_array_equal(module.running_var, np.ones(3))
    assert module.num_batches_tracked == 0
    np.testing.assert_array_equal(module.weight, [2.0, 3.0, 4.0])  # parameters are kept
    module(make_input(rng, (2, 3, 4, 4), np.float32))
    module.reset_parameters()
    np.testing.assert_array_equal(module.weight, np.ones(3))
    np.testing.assert_array_equal(module.bias, np.zeros(3))
    np.testing.assert_array_equal(module.running_mean, np.zeros(3))
    np.testing.assert_array_equal(module.running_var, np.ones(3))
    assert module.num_batches_tracked == 0
    assert id(module.weight) == weight_id  # reset in place, like torch


def test_reset_without_buffers_or_parameters_is_harmless():
    module = fastbn.BatchNorm1d(2, affine=False, track_running_stats=False)
    module.reset_running_stats()
    module.reset_parameters()
    assert module.running_mean is None and module.weight is None


@pytest.mark.parametrize("config, keys", [
    (dict(), ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
    (dict(affine=False), ["running_mean", "running_var", "num_batches_tracked"]),
    (dict(track_running_stats=False), ["weight", "bias"]),
    (dict(affine=False, track_running_stats=False), []),
])
def test_state_dict_keys_are_torch_names(config, keys):
    assert sorted(fastbn.BatchNorm1d(3, **config).state_dict()) == sorted(keys)


def test_state_dict_round_trip(dtype, channels_last, rng):
    source = fastbn.BatchNorm2d(4, momentum=0.2, channels_last=channels_last, dtype=dtype)
    weight, bias = make_params(rng, 4, dtype)
    source.weight[...] = weight
    source.bias[...] = bias
    for _ in range(3):
        source(make_input(rng, (3, 4, 2, 5), dtype, channels_last))
    state = source.state_dict()
    assert state["num_batches_tracked"] == 3
    # The state dict holds copies: changing it does not change the module.
    state_copy = {k: np.copy(v) for k, v in state.items()}
    state["weight"][...] = 0
    np.testing.assert_array_equal(source.weight, weight)

    target = fastbn.BatchNorm2d(4, momentum=0.2, channels_last=channels_last, dtype=dtype)
    target.load_state_dict(state_copy)
    for key, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state_copy[key], err_msg=key)
    x = make_input(rng, (3, 4, 2, 5), dtype, channels_last)
    np.testing.assert_array_equal(target.eval()(x), source.eval()(x))
    np.testing.assert_array_equal(target.train()(x), source.train()(x))
    assert target.num_batches_tracked == source.num_batches_tracked == 4
    np.testing.assert_array_equal(target.running_var, source.running_var)


def test_load_state_dict_keeps_arrays_and_dtype(rng):
    module = fastbn.BatchNorm1d(3)
    running_mean = module.running_mean
    module.load_state_dict({"weight": [1.0, 2.0, 3.0], "bias": np.zeros(3),
                            "running_mean": np.array([0.5, 0.25, 0.125]),
                            "running_var": np.array([2.0, 3.0, 4.0]),
                            "num_batches_tracked": np.int64(7)})
    assert module.running_mean is running_mean and module.running_mean.dtype == np.float32
    np.testing.assert_array_equal(module.weight, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(module.running_mean, [0.5, 0.25, 0.125])
    assert module.num_batches_tracked == 7
    x = make_input(rng, (4, 3, 5), np.float32)
    expected = ref.forward_eval(x, module.running_mean, module.running_var, module.weight,
                                module.bias)
    ref.assert_close(module.eval()(x), expected, np.float32, None, "y")


@pytest.mark.parametrize("cls, text", [
    (fastbn.BatchNorm1d, "BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, "
                         "track_running_stats=True)"),
    (fastbn.BatchNorm3d, "BatchNorm3d(3, eps=1e-05, momentum=0.1, affine=True, "
                         "track_running_stats=True)"),
])
def test_repr_like_torch(cls, text):
    assert repr(cls(3)) == text
    assert repr(fastbn.BatchNorm2d(2, momentum=None, affine=False, channels_last=True)) == (
        "BatchNorm2d(2, eps=1e-05, momentum=None, affine=False, track_running_stats=True, "
        "channels_last=True)")


# ----------------------------------------------------------------------------- forward/backward

def test_forward_out_and_backward_out(dtype, channels_last, rng):
    module = fastbn.BatchNorm2d(3, channels_last=channels_last, dtype=dtype)
    twin = fastbn.BatchNorm2d(3, channels_last=channels_last, dtype=dtype)
    x = make_input(rng, (2, 3, 4, 5), dtype, channels_last)
    dy = make_input(rng, (2, 3, 4, 5), dtype, channels_last)
    out = np.full_like(x, np.nan)
    assert module.forward(x, out=out) is out
    np.testing.assert_array_equal(out, twin(x))
    dx_out = np.full_like(x, np.nan)
    assert module.backward(dy, out=dx_out) is dx_out
    np.testing.assert_array_equal(dx_out, twin.backward(dy))
    np.testing.assert_array_equal(module.grad_weight, twin.grad_weight)
    np.testing.assert_array_equal(module.running_mean, twin.running_mean)


def test_backward_uses_the_last_forward(rng):
    """Two forwards then one backward: the gradient is the second forward's."""
    module = fastbn.BatchNorm1d(3, dtype=np.float64)
    first = make_input(rng, (4, 3, 5), np.float64)
    second = make_input(rng, (4, 3, 5), np.float64)
    dy = make_input(rng, (4, 3, 5), np.float64)
    module(first)
    module(second)
    dx = module.backward(dy)
    reference = ref.ReferenceBatchNorm(3)
    reference.forward(first)
    reference.forward(second)
    dx_exp, gw_exp, gb_exp = reference.backward(dy)
    dx_scale, gw_scale, gb_scale = reference.backward_scales(dy)
    ref.assert_close(dx, dx_exp, np.float64, dx_scale, "dx")
    ref.assert_close(module.grad_weight, gw_exp, np.float64, gw_scale, "grad_weight")
    ref.assert_close(module.grad_bias, gb_exp, np.float64, gb_scale, "grad_bias")
    # Backward twice gives the same bits: nothing saved is consumed or changed.
    np.testing.assert_array_equal(module.backward(dy), dx)


def test_forward_accepts_non_contiguous_input(channels_last, rng):
    module = fastbn.BatchNorm2d(3, channels_last=channels_last)
    twin = fastbn.BatchNorm2d(3, channels_last=channels_last)
    x = make_input(rng, (4, 3, 5, 6), np.float32, channels_last)
    dy = make_input(rng, (4, 3, 5, 6), np.float32, channels_last)
    x_f = np.asfortranarray(x)
    dy_strided = np.zeros(dy.shape[:-1] + (dy.shape[-1] * 2,), dy.dtype)[..., ::2]
    dy_strided[...] = dy
    np.testing.assert_array_equal(module(x_f), twin(x))
    np.testing.assert_array_equal(module.backward(dy_strided), twin.backward(dy))
    np.testing.assert_array_equal(module.grad_weight, twin.grad_weight)
    np.testing.assert_array_equal(module.running_var, twin.running_var)


def test_physical_shape_helper_matches_layouts():
    # Guard for the test helpers themselves: channels_last moves C to the end.
    assert physical_shape((2, 3, 4, 5), True) == (2, 4, 5, 3)
    assert physical_shape((2, 3), True) == (2, 3)
