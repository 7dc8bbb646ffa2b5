"""Parity with PyTorch: forward, running statistics, backward, functional, state dicts.

Skipped when torch cannot be imported; CI installs torch==2.13.0 so these run there.

Tolerances: torch computes float32 batch norm as y = x * alpha + beta with beta = b - mean *
alpha, so its rounding error scales with |x| * |alpha| + |beta| rather than with |y|; the
forward scale below is that magnitude. Either side may be off by a few float32 ulps of it.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import LARGE_SHAPES, MODULE_FOR_RANK, make_input, make_params, make_running, shape_id

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

TORCH_MODULE_FOR_RANK = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                         4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


@pytest.fixture(autouse=True)
def seeded_torch():
    torch.manual_seed(0)


def to_torch(x, channels_last, requires_grad=False):
    """A channels-first torch tensor with x's values (a copy)."""
    a = np.moveaxis(x, -1, 1) if channels_last and x.ndim > 2 else x
    return torch.from_numpy(np.array(a, order="C", copy=True)).requires_grad_(requires_grad)


def to_numpy(t, channels_last):
    """A torch channels-first tensor as a numpy array in the given layout."""
    a = t.detach().numpy()
    return np.ascontiguousarray(np.moveaxis(a, 1, -1) if channels_last and a.ndim > 2 else a)


def forward_scale(x, mean, var, weight, bias, eps, channels_last):
    """max over channels of |x| * |alpha| + |beta| + |b|, with alpha = w * invstd."""
    xc = ref.channels_first(x, channels_last)
    axes = (0,) + tuple(range(2, xc.ndim))
    n_channels = xc.shape[1]
    w = np.ones(n_channels) if weight is None else np.abs(np.asarray(weight, np.float64))
    b = np.zeros(n_channels) if bias is None else np.abs(np.asarray(bias, np.float64))
    alpha = w * ref.inverse_std(var, eps)
    return np.max(np.max(np.abs(xc), axis=axes) * alpha + np.abs(mean) * alpha + 2 * b)


def buffer_history(module):
    """Magnitudes that have entered the running buffers so far (they scale the buffers'
    rounding error, since each buffer is a convex combination of them)."""
    if not module.track_running_stats:
        return {}
    return dict(mean=float(np.max(np.abs(module.running_mean))),
                var=float(np.max(np.abs(module.running_var))))


def check_module_step(module, torch_module, x, dy, dtype, channels_last, history):
    """One forward and backward of both; compare outputs, buffers and gradients."""
    use_batch = module.training or not module.track_running_stats
    if use_batch:
        mean, var, var_unbiased = ref.batch_mean_var(x, channels_last)
        if module.training and module.track_running_stats:
            history["mean"] = max(history["mean"], float(np.max(np.abs(mean))))
            history["var"] = max(history["var"], float(np.max(var_unbiased)))
    else:
        mean, var = module.running_mean, module.running_var
    t_x = to_torch(x, channels_last, requires_grad=True)
    t_y = torch_module(t_x)
    y = module(x)
    scale = forward_scale(x, mean, var, module.weight, module.bias, module.eps, channels_last)
    ref.assert_close(y, to_numpy(t_y, channels_last), dtype, scale, "y vs torch")

    if module.track_running_stats:
        assert module.num_batches_tracked == int(torch_module.num_batches_tracked)
        ref.assert_close(module.running_mean, torch_module.running_mean.numpy(), dtype,
                         history["mean"], "running_mean vs torch")
        ref.assert_close(module.running_var, torch_module.running_var.numpy(), dtype,
                         history["var"], "running_var vs torch")
    else:
        assert torch_module.running_mean is None and module.running_mean is None

    t_y.backward(to_torch(dy, channels_last))
    dx = module.backward(dy)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(
        dy, x, mean, ref.inverse_std(var, module.eps), module.weight, channels_last, use_batch)
    ref.assert_close(dx, to_numpy(t_x.grad, channels_last), dtype, dx_scale, "dx vs torch")
    if module.affine:
        ref.assert_close(module.grad_weight, torch_module.weight.grad.numpy(), dtype,
                         gw_scale, "grad_weight vs torch")
        ref.assert_close(module.grad_bias, torch_module.bias.grad.numpy(), dtype, gb_scale,
                         "grad_bias vs torch")
        torch_module.weight.grad = None
        torch_module.bias.grad = None


CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("shape", [(6, 3), (3, 4, 7), (2, 3, 5, 4), (2, 2, 3, 2, 3)],
                         ids=shape_id)
def test_module_parity(config, shape, dtype, channels_last, rng):
    module = MODULE_FOR_RANK[len(shape)](shape[1], channels_last=channels_last, dtype=dtype,
                                         **config)
    torch_module = TORCH_MODULE_FOR_RANK[len(shape)](shape[1], **config).to(TORCH_DTYPE[dtype])
    if module.affine:
        weight, bias = make_params(rng, shape[1], dtype)
        module.weight[...] = weight
        module.bias[...] = bias
        with torch.no_grad():
            torch_module.weight.copy_(torch.from_numpy(weight))
            torch_module.bias.copy_(torch.from_numpy(bias))
    history = buffer_history(module)
    for mode in ["train", "train", "train", "eval", "train", "eval"]:
        module.train(mode == "train")
        torch_module.train(mode == "train")
        x = make_input(rng, shape, dtype, channels_last)
        dy = make_input(rng, shape, dtype, channels_last)
        check_module_step(module, torch_module, x, dy, dtype, channels_last, history)


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=shape_id)
def test_module_parity_large(shape, channels_last, rng):
    dtype = np.dtype(np.float32)
    module = MODULE_FOR_RANK[len(shape)](shape[1], channels_last=channels_last)
    torch_module = TORCH_MODULE_FOR_RANK[len(shape)](shape[1])
    history = buffer_history(module)
    for mode in ["train", "eval"]:
        module.train(mode == "train")
        torch_module.train(mode == "train")
        x = make_input(rng, shape, dtype, channels_last)
        dy = make_input(rng, shape, dtype, channels_last)
        check_module_step(module, torch_module, x, dy, dtype, channels_last, history)


def test_seed_golden_case_matches_torch():
    """The seed's BatchNorm1d(4, eps=0, momentum=0.3) case against torch.

    torch 2.13 rejects eps=0 in training ("batch_norm eps must be positive during training"),
    while fastbn keeps the seed's eps=0 working; torch runs with eps=1e-30, which changes
    nothing here: the batch variance is 0, so every output is 0 * invstd = 0 either way, and in
    eval 1e-30 is far below the float32 resolution of running_var.
    """
    module = fastbn.BatchNorm1d(4, eps=0, momentum=0.3)
    torch_module = torch.nn.BatchNorm1d(4, eps=1e-30, momentum=0.3)
    x = np.ones((2, 4, 1), np.float32)
    for _ in range(4):
        y = module(x)
        t_y = torch_module(torch.ones(2, 4, 1))
        np.testing.assert_array_equal(y, t_y.detach().numpy())
        ref.assert_close(module.running_mean, torch_module.running_mean.numpy(), np.float32, 1.0)
        ref.assert_close(module.running_var, torch_module.running_var.numpy(), np.float32, 1.0)
    y_eval = module.eval()(x)
    ref.assert_close(y_eval, torch_module.eval()(torch.ones(2, 4, 1)).detach().numpy(),
                     np.float32, 1.0)
    ref.assert_close(y_eval, np.full((2, 4, 1), 0.49), np.float32, 1.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5), (2, 2, 3, 2, 3)], ids=shape_id)
def test_functional_parity(shape, training, dtype, channels_last, rng):
    x = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    running_mean, running_var = make_running(rng, shape[1], dtype)
    t_mean, t_var = torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var.copy())
    if training:
        mean, var, var_unbiased = ref.batch_mean_var(x, channels_last)
    else:
        mean, var, var_unbiased = running_mean, running_var, 0.0
    mean_scale = np.abs(running_mean.astype(np.float64)) + np.abs(mean)
    var_scale = np.abs(running_var.astype(np.float64)) + np.abs(var_unbiased)
    t_y = torch.nn.functional.batch_norm(to_torch(x, channels_last), t_mean, t_var,
                                         torch.from_numpy(weight), torch.from_numpy(bias),
                                         training=training, momentum=0.2, eps=1e-4)
    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                          momentum=0.2, eps=1e-4, channels_last=channels_last)
    scale = forward_scale(x, mean, var, weight, bias, 1e-4, channels_last)
    ref.assert_close(y, to_numpy(t_y, channels_last), dtype, scale, "y vs torch")
    # The buffers are convex combinations of their old values and the batch statistics.
    ref.assert_close(running_mean, t_mean.numpy(), dtype, mean_scale, "running_mean vs torch")
    ref.assert_close(running_var, t_var.numpy(), dtype, var_scale, "running_var vs torch")


def test_loading_a_torch_state_dict(dtype, channels_last, rng):
    """A trained torch module's state_dict, converted to arrays, loads into fastbn."""
    shape = (4, 3, 5, 2)
    torch_module = torch.nn.BatchNorm2d(3, momentum=0.4).to(TORCH_DTYPE[dtype])
    weight, bias = make_params(rng, 3, dtype)
    with torch.no_grad():
        torch_module.weight.copy_(torch.from_numpy(weight))
        torch_module.bias.copy_(torch.from_numpy(bias))
        for _ in range(3):
            torch_module(to_torch(make_input(rng, shape, dtype, False), False))
    state = {key: value.detach().numpy().copy() for key, value in
             torch_module.state_dict().items()}
    module = fastbn.BatchNorm2d(3, momentum=0.4, channels_last=channels_last, dtype=dtype)
    module.load_state_dict(state)
    assert module.num_batches_tracked == 3
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    module.eval()
    torch_module.eval()
    history = buffer_history(module)
    check_module_step(module, torch_module, x, dy, dtype, channels_last, history)
    module.train()
    torch_module.train()
    check_module_step(module, torch_module, x, dy, dtype, channels_last, history)

    # And back: fastbn's state_dict loads into torch.
    fresh = torch.nn.BatchNorm2d(3, momentum=0.4).to(TORCH_DTYPE[dtype])
    fresh.load_state_dict({key: torch.as_tensor(value) for key, value in
                           module.state_dict().items()})
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), module.state_dict()[key], err_msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_backward_parity(training, dtype, channels_last, rng):
    shape = (3, 4, 5, 3)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, 4, dtype)
    running_mean, running_var = make_running(rng, 4, dtype)
    t_x = to_torch(x, channels_last, requires_grad=True)
    t_w = torch.from_numpy(weight.copy()).requires_grad_(True)
    t_b = torch.from_numpy(bias.copy()).requires_grad_(True)
    t_y = torch.nn.functional.batch_norm(t_x, torch.from_numpy(running_mean.copy()),
                                         torch.from_numpy(running_var.copy()), t_w, t_b,
                                         training=training)
    t_y.backward(to_torch(dy, channels_last))
    if training:
        _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias,
                                                    channels_last=channels_last)
    else:
        mean, invstd = running_mean.astype(np.float64), ref.inverse_std(running_var, 1e-5)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, training=training,
                                            channels_last=channels_last)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(dy, x, mean, invstd, weight,
                                                       channels_last, training)
    ref.assert_close(dx, to_numpy(t_x.grad, channels_last), dtype, dx_scale, "dx vs torch")
    ref.assert_close(gw, t_w.grad.numpy(), dtype, gw_scale, "grad_weight vs torch")
    ref.assert_close(gb, t_b.grad.numpy(), dtype, gb_scale, "grad_bias vs torch")
