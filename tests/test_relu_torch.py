"""Fused BatchNorm + ReLU against torch's BatchNorm followed by ReLU: modules in every
configuration, the functional pair, and torch's gradient-at-0 convention.

Inputs put the ReLU's kink in a gap of the data (conftest.kinked_step), so torch's mask and
fastbn's cannot differ by rounding; tolerances are those of test_torch_parity.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import kinked_step, make_input, make_params, shape_id
from test_relu import BNRELU_FOR_RANK, CONFIGS, MODULE_SHAPES, configs
from test_torch_parity import (TORCH_DTYPE, TORCH_MODULE_FOR_RANK, forward_scale, to_numpy,
                               to_torch)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch
assert CONFIGS  # the same configurations as the reference tests


def torch_pair(module, shape, dtype):
    """torch BatchNorm and ReLU in an nn.Sequential, with module's hyperparameters and
    weight."""
    bn = TORCH_MODULE_FOR_RANK[len(shape)](
        shape[1], eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=module.track_running_stats).to(TORCH_DTYPE[dtype])
    if module.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(module.weight))
    return bn, torch.nn.Sequential(bn, torch.nn.ReLU())


@configs
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=shape_id)
def test_module_parity_with_batch_norm_then_relu(config, shape, dtype, channels_last, rng):
    module = BNRELU_FOR_RANK[len(shape)](shape[1], channels_last=channels_last, dtype=dtype,
                                         **config)
    if module.affine:
        module.weight[...] = make_params(rng, shape[1], dtype)[0]
    bn, sequential = torch_pair(module, shape, dtype)
    for mode in ["train", "train", "eval", "train", "eval"]:
        module.train(mode == "train")
        sequential.train(mode == "train")
        use_batch = module.training or not module.track_running_stats
        x, dy, bias = kinked_step(rng, module, shape, dtype, channels_last)
        if use_batch:
            mean, var, _ = ref.batch_mean_var(x, channels_last)
        else:
            mean, var = module.running_mean.copy(), module.running_var.copy()
        if module.affine:
            with torch.no_grad():
                bn.bias.copy_(torch.from_numpy(bias))
        t_x = to_torch(x, channels_last, requires_grad=True)
        t_y = sequential(t_x)
        y = module(x)
        scale = forward_scale(x, mean, var, module.weight, module.bias, module.eps,
                              channels_last)
        ref.assert_close(y, to_numpy(t_y, channels_last), dtype, scale, "y vs torch")
        assert np.count_nonzero(y == 0) > 0 and np.count_nonzero(y > 0) > 0
        if module.track_running_stats:
            assert module.num_batches_tracked == int(bn.num_batches_tracked)
            ref.assert_close(module.running_mean, bn.running_mean.numpy(), dtype,
                             np.max(np.abs(bn.running_mean.numpy())) + 1.0, "running_mean")
            ref.assert_close(module.running_var, bn.running_var.numpy(), dtype,
                             np.max(np.abs(bn.running_var.numpy())), "running_var")
        t_y.backward(to_torch(dy, channels_last))
        dx = module.backward(dy)
        masked = np.where(y > 0, dy, 0)
        dx_scale, gw_scale, gb_scale = ref.backward_scales(
            masked, x, mean, ref.inverse_std(var, module.eps), module.weight, channels_last,
            use_batch)
        ref.assert_close(dx, to_numpy(t_x.grad, channels_last), dtype, dx_scale, "dx vs torch")
        if module.affine:
            ref.assert_close(module.grad_weight, bn.weight.grad.numpy(), dtype, gw_scale,
                             "grad_weight vs torch")
            ref.assert_close(module.grad_bias, bn.bias.grad.numpy(), dtype, gb_scale,
                             "grad_bias vs torch")
            bn.weight.grad = None
            bn.bias.grad = None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_parity_with_batch_norm_then_relu(training, dtype, channels_last, rng):
    shape = (4, 3, 5, 6)
    module = fastbn.BNReLU2d(3, channels_last=channels_last, dtype=dtype)
    module.weight[...] = make_params(rng, 3, dtype)[0]
    module.running_mean[...] = rng.uniform(-1, 1, 3)
    module.running_var[...] = rng.uniform(0.5, 2, 3)
    module.train(training)
    x, dy, bias = kinked_step(rng, module, shape, dtype, channels_last)
    weight, running_mean, running_var = module.weight, module.running_mean, module.running_var
    t_x = to_torch(x, channels_last, requires_grad=True)
    t_w = torch.from_numpy(weight.copy()).requires_grad_(True)
    t_b = torch.from_numpy(bias.copy()).requires_grad_(True)
    t_y = torch.relu(torch.nn.functional.batch_norm(
        t_x, torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var.copy()), t_w,
        t_b, training=training))
    t_y.backward(to_torch(dy, channels_last))
    if training:
        y, mean, invstd = fastbn.batch_norm_relu_forward(x, weight, bias,
                                                         channels_last=channels_last)
        var = ref.batch_mean_var(x, channels_last)[1]
    else:
        y = fastbn.batch_norm_relu(x, running_mean, running_var, weight, bias,
                                   channels_last=channels_last)
        mean = running_mean.astype(np.float64)
        invstd = fastbn.functional.running_invstd(running_var, 1e-5)
        var = running_var
    ref.assert_close(y, to_numpy(t_y, channels_last), dtype,
                     forward_scale(x, mean, var, weight, bias, 1e-5, channels_last), "y")
    dx, gw, gb = fastbn.batch_norm_relu_backward(dy, x, mean, invstd, weight, bias,
                                                 training=training, channels_last=channels_last)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(np.where(y > 0, dy, 0), x, mean, invstd,
                                                       weight, channels_last, training)
    ref.assert_close(dx, to_numpy(t_x.grad, channels_last), dtype, dx_scale, "dx vs torch")
    ref.assert_close(gw, t_w.grad.numpy(), dtype, gw_scale, "grad_weight vs torch")
    ref.assert_close(gb, t_b.grad.numpy(), dtype, gb_scale, "grad_bias vs torch")


def test_gradient_at_exactly_zero_matches_torch(dtype):
    """A channel of zeros with bias 0 normalizes to exactly 0 on both sides (torch's
    x * alpha + beta is exact only there); torch.relu's gradient at 0 is 0, and so is
    fastbn's."""
    rng = np.random.default_rng(11)
    x = make_input(rng, (4, 2, 6), dtype)
    x[:, 0] = 0
    dy = make_input(rng, (4, 2, 6), dtype)
    module = fastbn.BNReLU1d(2, dtype=dtype)
    bn = torch.nn.BatchNorm1d(2).to(TORCH_DTYPE[dtype])
    t_x = to_torch(x, False, requires_grad=True)
    t_y = torch.relu(bn(t_x))
    t_y.backward(torch.from_numpy(dy))
    y = module(x)
    assert np.all(y[:, 0] == 0) and torch.all(t_y[:, 0] == 0)
    dx = module.backward(dy)
    assert float(bn.bias.grad[0]) == 0 and module.grad_bias[0] == 0
    np.testing.assert_array_equal(dx[:, 0], t_x.grad[:, 0].numpy())
