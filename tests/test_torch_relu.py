"""fastbn.torch's fused BatchNorm + ReLU against torch's BatchNorm followed by ReLU: modules in
every configuration and memory format, batch_norm_relu, autograd (gradcheck, double backward),
the registered ops with relu (opcheck), torch.compile, and convert(model, fuse_relu=True).

Inputs put the ReLU's kink in a gap of the data (conftest.kinked_input), so torch's mask and
fastbn's cannot differ by rounding.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
from fastbn.torch import ops  # noqa: E402
import reference as ref  # noqa: E402
from conftest import kink_bias, kinked_input, make_params, shape_id  # noqa: E402
from torch_cases import (MEMORY_FORMATS, TORCH_BATCHNORM, TORCH_DTYPE, as_float64,  # noqa: E402
                         backward_scales, batch_stats, forward_scale, in_format,
                         random_tensor, compiled_copy, assert_same_step)

pytestmark = pytest.mark.torch

FAST_BNRELU = {2: ft.BNReLU1d, 3: ft.BNReLU1d, 4: ft.BNReLU2d, 5: ft.BNReLU3d}
CONFIGS = [dict(), dict(momentum=None), dict(momentum=0.3, eps=1e-3), dict(affine=False),
           dict(track_running_stats=False)]
CASES = [(shape, memory_format) for shape in [(6, 3), (4, 4, 7), (2, 3, 5, 4), (2, 2, 3, 2, 3)]
         for memory_format in MEMORY_FORMATS[len(shape)]]


def kinked_tensor(rng, module, shape, dtype, memory_format):
    """x with the kink in a gap for this step's statistics (bias set on module), and dy."""
    use_batch = module.training or not module.track_running_stats
    center = None if use_batch else module.running_mean.double().numpy()
    x, center, spread = kinked_input(rng, shape, dtype, False, center)
    if module.affine:
        if use_batch:
            mean, var, _ = ref.batch_mean_var(x, False)
        else:
            mean, var = module.running_mean.double().numpy(), module.running_var.double().numpy()
        bias = kink_bias(rng, module.weight.detach().numpy(), mean,
                         ref.inverse_std(var, module.eps), center, spread, dtype)
        with torch.no_grad():
            module.bias.copy_(torch.from_numpy(bias))
    dy = random_tensor(rng, shape, dtype, memory_format)
    return in_format(torch.from_numpy(x), memory_format), dy


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{shape_id(c[0])}-{c[1]}")
def test_module_parity_with_batch_norm_then_relu(config, case, dtype, rng):
    shape, memory_format = case
    actual = FAST_BNRELU[len(shape)](shape[1], dtype=TORCH_DTYPE[dtype], **config)
    bn = TORCH_BATCHNORM[len(shape)](shape[1], **config).to(TORCH_DTYPE[dtype])
    expected = torch.nn.Sequential(bn, torch.nn.ReLU())
    if actual.affine:
        with torch.no_grad():
            actual.weight.copy_(torch.from_numpy(make_params(rng, shape[1], dtype)[0]))
    for mode in ["train", "train", "eval", "train", "eval"]:
        actual.train(mode == "train")
        expected.train(mode == "train")
        use_batch = actual.training or not actual.track_running_stats
        x, dy = kinked_tensor(rng, actual, shape, dtype, memory_format)
        if actual.affine:
            with torch.no_grad():
                bn.weight.copy_(actual.weight)
                bn.bias.copy_(actual.bias)
                actual.weight.grad = actual.bias.grad = bn.weight.grad = bn.bias.grad = None
        if use_batch:
            mean, var, _ = batch_stats(x)
        else:
            mean, var = as_float64(bn.running_mean), as_float64(bn.running_var)
        x_expected, x_actual = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_expected, y_actual = expected(x_expected), actual(x_actual)
        scale = forward_scale(x, mean, var, bn.weight, bn.bias, bn.eps)
        ref.assert_close(y_actual.detach().numpy(), y_expected.detach().numpy(), dtype, scale,
                         "y")
        assert bool((y_actual == 0).any()) and bool((y_actual > 0).any())
        if actual.track_running_stats:
            assert int(actual.num_batches_tracked) == int(bn.num_batches_tracked)
            for name in ("running_mean", "running_var"):
                want = getattr(bn, name).numpy()
                ref.assert_close(getattr(actual, name).numpy(), want, dtype,
                                 np.max(np.abs(want)) + 1.0, name)
        y_expected.backward(dy)
        y_actual.backward(dy)
        masked = torch.where(y_expected > 0, dy, torch.zeros_like(dy))
        dx_scale, gw_scale, gb_scale = backward_scales(masked, x, mean, var, bn.eps, bn.weight,
                                                       use_batch)
        ref.assert_close(x_actual.grad.numpy(), x_expected.grad.numpy(), dtype, dx_scale, "dx")
        if actual.affine:
            ref.assert_close(actual.weight.grad.numpy(), bn.weight.grad.numpy(), dtype,
                             gw_scale, "grad_weight")
            ref.assert_close(actual.bias.grad.numpy(), bn.bias.grad.numpy(), dtype, gb_scale,
                             "grad_bias")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_functional_parity_and_gradcheck(training, memory_format, rng):
    module = ft.BNReLU2d(3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(make_params(rng, 3, np.float64)[0]))
        module.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        module.running_var.copy_(torch.tensor([1.5, 0.7, 1.1], dtype=torch.float64))
    module.train(training)
    x, _ = kinked_tensor(rng, module, (4, 3, 3, 2), np.float64, memory_format)
    x = x.requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()
    running = (module.running_mean, module.running_var)

    def fused(x, weight, bias):
        return ft.batch_norm_relu(x, running[0].clone(), running[1].clone(), weight, bias,
                                  training=training, eps=1e-3)

    def unfused(x, weight, bias):
        return torch.relu(torch.nn.functional.batch_norm(
            x, running[0].clone(), running[1].clone(), weight, bias, training=training,
            eps=1e-3))

    torch.testing.assert_close(fused(x, weight, bias), unfused(x, weight, bias), rtol=1e-12,
                               atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fused, (x, weight, bias))


def test_gradient_at_exactly_zero_is_torchs():
    """A channel of zeros with bias 0 normalizes to exactly 0: torch.relu's gradient is 0."""
    x = torch.randn(4, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 0
    x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused, plain = ft.BNReLU1d(2, dtype=torch.float64), torch.nn.BatchNorm1d(2).double()
    fused(x_fused).sum().backward()
    torch.relu(plain(x_plain)).sum().backward()
    assert float(fused.bias.grad[0]) == 0 and float(plain.bias.grad[0]) == 0
    torch.testing.assert_close(x_fused.grad, x_plain.grad, rtol=1e-12, atol=1e-12)


def test_opcheck_the_ops_with_relu(rng):
    x = random_tensor(rng, (3, 4, 5, 2), np.float64)
    dy = random_tensor(rng, (3, 4, 5, 2), np.float64)
    weight, bias = (torch.from_numpy(a) for a in make_params(rng, 4, np.float64))
    running_mean = torch.linspace(-1, 1, 4, dtype=torch.float64)
    running_var = torch.linspace(0.5, 2, 4, dtype=torch.float64)
    for inp in (x, in_format(x, "channels_last")):
        grad_input = inp.clone().requires_grad_()
        torch.library.opcheck(ops.batch_norm_train, (grad_input, weight, bias, running_mean,
                                                     running_var, 0.1, 1e-5, True))
        torch.library.opcheck(ops.batch_norm_eval, (grad_input, running_mean, running_var,
                                                    weight, bias, 1e-5, True))
        _, save_mean, save_invstd, _, _ = ops.batch_norm_train(inp, weight, bias, None, None,
                                                               0.1, 1e-5, True)
        torch.library.opcheck(ops.batch_norm_backward, (dy, inp, save_mean, save_invstd,
                                                        weight, bias, True))
        torch.library.opcheck(ops.batch_norm_eval_backward, (dy, inp, running_mean,
                                                             running_var, weight, 1e-5, bias,
                                                             True))


def test_other_dtypes_run_torchs_batch_norm_and_relu(rng):
    x = random_tensor(rng, (4, 3, 5, 5), np.float32).to(torch.bfloat16)
    module = ft.BNReLU2d(3).to(torch.bfloat16)
    reference = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    assert torch.equal(module(x), torch.relu(reference(x)))


def small_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4),
                            torch.nn.ReLU(inplace=True)),
        torch.nn.Flatten(2), torch.nn.BatchNorm1d(4), torch.nn.ReLU())


def test_convert_fuse_relu_fuses_batch_norm_then_relu_in_sequentials(rng):
    torch.manual_seed(0)
    original = small_model()
    model = copy.deepcopy(original)
    parameters = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert ft.convert(model, fuse_relu=True) is model
    assert type(model[1]) is ft.BNReLU2d and type(model[2]) is torch.nn.Identity
    assert type(model[4]) is ft.BatchNorm2d and type(model[5]) is torch.nn.ReLU6
    assert type(model[6][1]) is ft.BNReLU2d and type(model[6][2]) is torch.nn.Identity
    assert type(model[8]) is ft.BNReLU1d and type(model[9]) is torch.nn.Identity
    assert [id(p) for p in model.parameters()] == parameters  # an optimizer keeps working
    assert list(model.state_dict()) == keys
    for mode in [True, True, False]:
        original.train(mode)
        model.train(mode)
        assert_same_step(original, model, random_tensor(rng, (4, 3, 6, 6), np.float32),
                         (1e-4, 1e-5), (1e-3, 1e-4))
    for (name, b), (_, c) in zip(model.named_buffers(), original.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_convert_fuse_relu_leaves_what_it_cannot_see():
    class Block(torch.nn.Module):  # the ReLU is applied in forward, as in torchvision's ResNet
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(x))

    hooked = torch.nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda module, inputs, output: None)
    model = torch.nn.Sequential(Block(), hooked, torch.nn.ReLU(), torch.nn.BatchNorm2d(3),
                                torch.nn.LeakyReLU())
    ft.convert(model, fuse_relu=True)
    assert type(model[0].bn) is ft.BatchNorm2d and type(model[0].relu) is torch.nn.ReLU
    assert type(model[1]) is ft.BatchNorm2d and type(model[2]) is torch.nn.ReLU
    assert type(model[3]) is ft.BatchNorm2d
    # And without fuse_relu nothing is fused.
    plain = ft.convert(small_model())
    assert not any(isinstance(m, (ft.BNReLU1d, ft.BNReLU2d)) for m in plain.modules())
    assert type(plain[2]) is torch.nn.ReLU


# torch's own import chain under torch.compile warns about its deprecated TorchScript pieces.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_of_a_fused_model_matches_eager(rng):
    torch.manual_seed(1)
    model = ft.convert(small_model(), fuse_relu=True)
    eager = copy.deepcopy(model)
    warmup = random_tensor(rng, (2, 3, 6, 6), np.float32)
    compiled = compiled_copy(model, warmup)
    eager(warmup)
    for mode in [True, False]:
        eager.train(mode)
        compiled.train(mode)
        assert_same_step(eager, compiled, random_tensor(rng, (4, 3, 6, 6), np.float32),
                         (1e-5, 1e-5), (1e-4, 1e-4))
