"""fastbn.torch against torch 2.13: modules and functional, every configuration, every memory
format the bridge routes, float32 and float64; autograd (gradcheck, double backward), the
registered ops (opcheck), fallbacks, and errors.

Tolerances are those of test_torch_parity: the magnitudes that enter each result, times the
dtype's rtol; either side may be a few ulps of that off.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
from fastbn.torch import ops  # noqa: E402
import reference as ref  # noqa: E402
from conftest import shape_id  # noqa: E402
from test_torch_parity import CONFIGS  # noqa: E402  (the module configurations)
from torch_cases import (MEMORY_FORMATS, TORCH_BATCHNORM, TORCH_DTYPE, backward_scales,  # noqa: E402
                         batch_stats, forward_scale, random_params, random_tensor)

pytestmark = pytest.mark.torch

FAST_BATCHNORM = {2: ft.BatchNorm1d, 3: ft.BatchNorm1d, 4: ft.BatchNorm2d, 5: ft.BatchNorm3d}

CASES = [(shape, memory_format) for shape in [(6, 3), (3, 4, 7), (2, 3, 5, 4), (2, 2, 3, 2, 3)]
         for memory_format in MEMORY_FORMATS[len(shape)]]


def config_id(config):
    return ",".join(f"{k}={v}" for k, v in config.items()) or "defaults"


def case_id(case):
    return f"{shape_id(case[0])}-{case[1]}"


def make_pair(shape, dtype, rng, **config):
    """A torch module and a fastbn.torch module with identical random parameters."""
    rank = len(shape)
    expected = TORCH_BATCHNORM[rank](shape[1], **config).to(TORCH_DTYPE[dtype])
    actual = FAST_BATCHNORM[rank](shape[1], dtype=TORCH_DTYPE[dtype], **config)
    if expected.affine:
        weight, bias = random_params(rng, shape[1], dtype)
        with torch.no_grad():
            for module in (expected, actual):
                module.weight.copy_(weight)
                module.bias.copy_(bias)
    return expected, actual


def same_strides(t):
    """A copy of t with t's exact strides (clone() would make a strided tensor dense)."""
    copy = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    return copy.copy_(t)


def check_step(expected, actual, x, dy, dtype, history):
    """One forward and backward of both modules on the same input; compare everything."""
    use_batch = expected.training or not expected.track_running_stats
    if use_batch:
        mean, var, var_unbiased = batch_stats(x)
        if expected.training and expected.track_running_stats:
            history["mean"] = max(history["mean"], float(np.max(np.abs(mean))))
            history["var"] = max(history["var"], float(np.max(var_unbiased)))
    else:
        mean = expected.running_mean.double().numpy()
        var = expected.running_var.double().numpy()
    x_expected, x_actual = same_strides(x).requires_grad_(), same_strides(x).requires_grad_()
    y_expected = expected(x_expected)
    y_actual = actual(x_actual)
    assert y_actual.dtype == y_expected.dtype and y_actual.shape == y_expected.shape
    if x.is_contiguous() or (x.dim() >= 4 and x.movedim(1, -1).is_contiguous()):
        assert y_actual.stride() == x.stride(), "the output keeps the input's memory format"
    else:
        assert y_actual.is_contiguous()
    scale = forward_scale(x, mean, var, expected.weight, expected.bias, expected.eps)
    ref.assert_close(y_actual.detach().numpy(), y_expected.detach().numpy(), dtype, scale, "y")

    if expected.track_running_stats:
        assert int(actual.num_batches_tracked) == int(expected.num_batches_tracked)
        ref.assert_close(actual.running_mean.numpy(), expected.running_mean.numpy(), dtype,
                         history["mean"], "running_mean")
        ref.assert_close(actual.running_var.numpy(), expected.running_var.numpy(), dtype,
                         history["var"], "running_var")
    else:
        assert actual.running_mean is None and actual.running_var is None

    y_expected.backward(dy)
    y_actual.backward(dy)
    dx_scale, gw_scale, gb_scale = backward_scales(dy, x, mean, var, expected.eps,
                                                   expected.weight, use_batch)
    ref.assert_close(x_actual.grad.numpy(), x_expected.grad.numpy(), dtype, dx_scale, "dx")
    if expected.affine:
        # .grad accumulates over steps, as autograd does; the scale grows with it.
        history["gw"] = history.get("gw", 0) + gw_scale
        history["gb"] = history.get("gb", 0) + gb_scale
        ref.assert_close(actual.weight.grad.numpy(), expected.weight.grad.numpy(), dtype,
                         history["gw"], "grad_weight")
        ref.assert_close(actual.bias.grad.numpy(), expected.bias.grad.numpy(), dtype,
                         history["gb"], "grad_bias")


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_parity(config, case, dtype, rng):
    shape, memory_format = case
    expected, actual = make_pair(shape, dtype, rng, **config)
    history = {"mean": 0.0, "var": 1.0}
    for mode in ["train", "train", "eval", "train", "eval"]:
        expected.train(mode == "train")
        actual.train(mode == "train")
        x = random_tensor(rng, shape, dtype, memory_format)
        dy = random_tensor(rng, shape, dtype, memory_format)
        check_step(expected, actual, x, dy, dtype, history)


LARGE_CASES = [((8, 16, 16, 17), "contiguous"), ((8, 16, 16, 17), "channels_last"),
               ((2048, 17), "contiguous"), ((2, 3, 130, 130), "contiguous"),
               ((2, 3, 130, 130), "channels_last")]


@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_module_parity_large(case, rng):
    """Shapes big enough for the parallel kernel twins."""
    shape, memory_format = case
    dtype = np.dtype(np.float32)
    expected, actual = make_pair(shape, dtype, rng)
    history = {"mean": 0.0, "var": 1.0}
    for mode in ["train", "eval"]:
        expected.train(mode == "train")
        actual.train(mode == "train")
        check_step(expected, actual, random_tensor(rng, shape, dtype, memory_format),
                   random_tensor(rng, shape, dtype, memory_format), dtype, history)


def test_gradient_in_another_memory_format_than_input(rng):
    """A channels-last input whose gradient arrives contiguous (or the reverse)."""
    dtype = np.dtype(np.float64)
    expected, actual = make_pair((3, 4, 5, 6), dtype, rng)
    history = {"mean": 0.0, "var": 1.0}
    x = random_tensor(rng, (3, 4, 5, 6), dtype, "channels_last")
    dy = random_tensor(rng, (3, 4, 5, 6), dtype, "contiguous")
    check_step(expected, actual, x, dy, dtype, history)
    check_step(expected, actual, dy.contiguous(), x, dtype, history)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_functional_parity(training, memory_format, dtype, rng):
    shape = (3, 4, 5, 2)
    x = random_tensor(rng, shape, dtype, memory_format)
    weight, bias = random_params(rng, shape[1], dtype)
    running = [torch.from_numpy(a) for a in ref_running(rng, shape[1], dtype)]
    expected_running = [t.clone() for t in running]
    y = ft.batch_norm(x, *running, weight, bias, training=training, momentum=0.2, eps=1e-4)
    y_expected = torch.nn.functional.batch_norm(x, *expected_running, weight, bias,
                                                training=training, momentum=0.2, eps=1e-4)
    mean, var, var_unbiased = batch_stats(x) if training else (
        running[0].double().numpy(), running[1].double().numpy(), 0.0)
    scale = forward_scale(x, mean, var, weight, bias, 1e-4)
    ref.assert_close(y.numpy(), y_expected.numpy(), dtype, scale, "y")
    assert y.stride() == y_expected.stride()
    for got, want, stat in zip(running, expected_running, (mean, var_unbiased)):
        scale = np.abs(want.double().numpy()) + np.abs(stat)
        ref.assert_close(got.numpy(), want.numpy(), dtype, scale, "running statistic")


def ref_running(rng, n_channels, dtype):
    from conftest import make_running
    return make_running(rng, n_channels, dtype)


def test_empty_batch_matches_torch():
    """An empty batch gives an empty output and leaves the buffers alone, as in torch."""
    expected, actual = torch.nn.BatchNorm2d(3), ft.BatchNorm2d(3)
    x = torch.zeros((0, 3, 4, 4), requires_grad=True)
    y_expected, y_actual = expected(x), actual(x)
    assert y_actual.shape == y_expected.shape == (0, 3, 4, 4)
    torch.testing.assert_close(actual.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(actual.running_var, expected.running_var, rtol=0, atol=0)
    y_actual.sum().backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_double_backward(training, memory_format, rng):
    x = random_tensor(rng, (3, 2, 3, 4), np.float64, memory_format).requires_grad_()
    weight, bias = (t.requires_grad_() for t in random_params(rng, 2, np.float64))
    running_mean = torch.tensor([0.3, -0.2], dtype=torch.float64)
    running_var = torch.tensor([1.5, 0.7], dtype=torch.float64)

    def function(x, weight, bias):
        return ft.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                             training=training, eps=1e-3)

    assert torch.autograd.gradcheck(function, (x, weight, bias))
    assert torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_double_backward_matches_torch(rng):
    """A gradient penalty through a training batch norm: second-order terms through the batch
    statistics must be kept (a once-differentiable backward would silently drop them)."""
    x = random_tensor(rng, (4, 3, 2, 2), np.float64).requires_grad_()
    weight, bias = (t.requires_grad_() for t in random_params(rng, 3, np.float64))

    def penalty(batch_norm):
        y = batch_norm(x, None, None, weight, bias, training=True)
        (grad_x,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((grad_x ** 2).sum(), (x, weight, bias))

    for got, want in zip(penalty(ft.batch_norm), penalty(torch.nn.functional.batch_norm)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradients_accumulate_and_respect_requires_grad(rng):
    module = ft.BatchNorm2d(3, dtype=torch.float64)
    x = random_tensor(rng, (2, 3, 4, 4), np.float64)  # no grad wanted for x
    module(x).sum().backward()
    first = module.weight.grad.clone()
    module(x).sum().backward()
    torch.testing.assert_close(module.weight.grad, 2 * first)
    assert x.grad is None
    module.weight.requires_grad_(False)
    module.weight.grad = None
    module(x.requires_grad_()).pow(2).sum().backward()
    assert module.weight.grad is None and x.grad is not None


# ----------------------------------------------------------------------------- registered ops

def test_opcheck_every_registered_op(rng):
    x = random_tensor(rng, (3, 4, 5, 2), np.float64)
    x_cl = random_tensor(rng, (3, 4, 5, 2), np.float64, "channels_last")
    dy = random_tensor(rng, (3, 4, 5, 2), np.float64)
    weight, bias = random_params(rng, 4, np.float64)
    running_mean = torch.linspace(-1, 1, 4, dtype=torch.float64)
    running_var = torch.linspace(0.5, 2, 4, dtype=torch.float64)
    for inp in (x, x_cl):
        grad_input = inp.clone().requires_grad_()
        torch.library.opcheck(ops.batch_norm_train, (grad_input, weight.clone().requires_grad_(),
                                                     bias, running_mean, running_var, 0.1, 1e-5))
        torch.library.opcheck(ops.batch_norm_train, (inp, None, None, None, None, 0.1, 1e-5))
        torch.library.opcheck(ops.batch_norm_eval, (grad_input, running_mean, running_var,
                                                    weight, bias, 1e-5))
        _, save_mean, save_invstd, _, _ = ops.batch_norm_train(inp, weight, bias, None, None,
                                                               0.1, 1e-5)
        torch.library.opcheck(ops.batch_norm_backward, (dy, inp, save_mean, save_invstd, weight))
        torch.library.opcheck(ops.batch_norm_eval_backward, (dy, inp, running_mean, running_var,
                                                             None, 1e-5))


def test_training_op_mutates_nothing(rng):
    x = random_tensor(rng, (3, 4, 5, 2), np.float32)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    _, _, _, new_mean, new_var = ops.batch_norm_train(x, None, None, running_mean, running_var,
                                                      0.5, 1e-5)
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))
    assert not torch.equal(new_mean, running_mean) and not torch.equal(new_var, running_var)


# ----------------------------------------------------------------------------- fallbacks, errors

def test_other_dtypes_run_torchs_implementation(rng):
    """bfloat16 parameters are not kernel parameters (16-bit inputs run on the kernels with
    float32 ones, see test_lowp_torch): the bridge gives exactly torch's result."""
    x = random_tensor(rng, (4, 3, 5, 5), np.float32).to(torch.bfloat16)
    expected = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    actual = ft.BatchNorm2d(3).to(torch.bfloat16)
    assert not ft.covered_by_kernels(x, actual.weight)
    assert torch.equal(actual(x), expected(x))
    assert torch.equal(actual.running_var, expected.running_var)


def test_mixed_dtypes_run_torchs_implementation(rng):
    x = random_tensor(rng, (4, 3, 5, 5), np.float64)
    weight = torch.ones(3)  # float32 parameters with float64 input
    assert not ft.covered_by_kernels(x, weight)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.functional.batch_norm(x, None, None, weight, None, training=True)
    with pytest.raises(RuntimeError) as actual:
        ft.batch_norm(x, None, None, weight, None, training=True)
    assert str(actual.value) == str(expected.value)


def test_meta_tensors_run_torchs_implementation():
    module = ft.BatchNorm2d(3, device="meta")
    x = torch.empty((4, 3, 5, 5), device="meta").to(memory_format=torch.channels_last)
    y = module(x)
    expected = torch.nn.BatchNorm2d(3, device="meta")(x)
    assert y.device.type == "meta" and y.shape == expected.shape
    assert y.stride() == expected.stride()


def test_one_value_per_channel_raises_torchs_error():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ft.BatchNorm1d(3)(torch.randn(1, 3))
    ft.BatchNorm1d(3).eval()(torch.randn(1, 3))  # eval needs no batch statistics


def test_wrong_rank_raises_torchs_error():
    with pytest.raises(ValueError, match="expected 4D input"):
        ft.BatchNorm2d(3)(torch.randn(2, 3, 4))


def test_wrong_channel_count_raises_torchs_error_and_changes_nothing():
    module = ft.BatchNorm2d(3)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.BatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError) as actual:
        module(torch.randn(2, 4, 3, 3))
    assert str(actual.value) == str(expected.value)
    assert "should contain 4 elements not 3" in str(actual.value)
    assert int(module.num_batches_tracked) == 1  # torch counts the call before the error too
    assert torch.equal(module.running_mean, torch.zeros(3))
    assert torch.equal(module.running_var, torch.ones(3))


def test_small_batches_run_torchs_kernel_and_large_ones_fastbns(monkeypatch, rng):
    """Under KERNEL_MIN_ELEMENTS elements torch's own kernel is faster than the bridge's Python;
    such calls give exactly torch's result, larger ones go through fastbn's kernels."""
    import fastbn.torch.functional as bridge

    monkeypatch.setattr(bridge, "KERNEL_MIN_ELEMENTS", 1 << 18)
    calls = []
    monkeypatch.setattr(ops, "train_in_place", lambda *args: calls.append(args[0].shape)
                        or TRAIN_IN_PLACE(*args))
    small = random_tensor(rng, (2, 4, 8, 8), np.float32)
    expected, actual = torch.nn.BatchNorm2d(4), ft.BatchNorm2d(4)
    assert not ft.covered_by_kernels(small)
    assert torch.equal(actual(small), expected(small))
    assert torch.equal(actual.running_var, expected.running_var) and calls == []
    large = random_tensor(rng, (8, 4, 128, 64), np.float32)
    assert ft.covered_by_kernels(large)
    actual(large)
    assert calls == [large.shape]


TRAIN_IN_PLACE = ops.train_in_place


def test_eval_mode_runs_torchs_kernel(monkeypatch, rng):
    """With TORCH_RUNNING_STATS, normalizing float32/float64 with the running statistics runs
    torch's own kernel: exactly torch's output and input gradient (frozen batch norm), the
    buffers untouched. Training, eval without tracked statistics (batch statistics), a fused
    ReLU, and TORCH_RUNNING_STATS = False keep fastbn's kernels."""
    import fastbn.torch.functional as bridge

    monkeypatch.setattr(bridge, "TORCH_RUNNING_STATS", True)
    calls = []
    for name in ("train_in_place", "eval_kernels"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, original=original, name=name:
                            calls.append(name) or original(*args))
    x = random_tensor(rng, (4, 6, 5, 7), np.float64).requires_grad_()
    dy = random_tensor(rng, (4, 6, 5, 7), np.float64)
    expected, actual = torch.nn.BatchNorm2d(6).double(), ft.BatchNorm2d(6).double()
    for module in (expected, actual):
        with torch.no_grad():
            module.running_mean.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64))
            module.running_var.copy_(torch.linspace(0.5, 2, 6, dtype=torch.float64))
        module.eval()
    assert not ft.covered_by_kernels(x, training=False)
    assert ft.covered_by_kernels(x, training=False, relu=True) and ft.covered_by_kernels(x)
    y_expected, y_actual = expected(x), actual(x)
    (dx_expected,) = torch.autograd.grad(y_expected, x, dy)
    (dx_actual,) = torch.autograd.grad(y_actual, x, dy)
    assert torch.equal(y_actual, y_expected) and torch.equal(dx_actual, dx_expected)
    assert torch.equal(actual.running_var, expected.running_var) and calls == []
    untracked = ft.BatchNorm2d(6, track_running_stats=False).double().eval()
    untracked(x)
    assert calls == ["train_in_place"]
    monkeypatch.setattr(bridge, "TORCH_RUNNING_STATS", False)
    actual(x)
    assert calls == ["train_in_place", "eval_kernels"]


def test_channels_last_batches_of_many_channels_run_torchs_kernel(monkeypatch, rng):
    """Channels-last float32/float64 batch norms of TORCH_CHANNELS_LAST_MIN_CHANNELS channels
    or more run torch's own kernel (as fast there, and the bridge's Python would make the call
    slower): exactly torch's output, running statistics and gradients. Fewer channels, a fused
    ReLU, contiguous memory, or the threshold set to None keep fastbn's kernels."""
    import fastbn.torch.functional as bridge

    monkeypatch.setattr(bridge, "TORCH_CHANNELS_LAST_MIN_CHANNELS", 16)
    calls = []
    monkeypatch.setattr(ops, "train_in_place", lambda *args: calls.append(args[0].shape)
                        or TRAIN_IN_PLACE(*args))
    for dtype, shape in ((np.float32, (4, 32, 6, 5)), (np.float64, (2, 16, 3, 4, 5))):
        x = random_tensor(rng, shape, dtype)
        memory_format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        dy = random_tensor(rng, shape, dtype)
        assert not ft.covered_by_kernels(x)
        assert ft.covered_by_kernels(x, relu=True)
        assert ft.covered_by_kernels(x.detach().contiguous())
        family = torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm3d
        converted = ft.BatchNorm2d if x.dim() == 4 else ft.BatchNorm3d
        expected = family(shape[1]).to(x.dtype)
        actual = converted(shape[1]).to(x.dtype)
        y_expected = expected(x)
        (dx_expected,) = torch.autograd.grad(y_expected, x, dy)
        y_actual = actual(x)
        (dx_actual,) = torch.autograd.grad(y_actual, x, dy)
        assert torch.equal(y_actual, y_expected) and torch.equal(dx_actual, dx_expected)
        assert y_actual.is_contiguous(memory_format=memory_format)
        assert torch.equal(actual.running_var, expected.running_var)
        assert calls == []
    few = random_tensor(rng, (4, 8, 6, 5), np.float32).contiguous(
        memory_format=torch.channels_last)
    assert ft.covered_by_kernels(few)
    ft.BatchNorm2d(8)(few)
    assert calls == [few.shape]
    monkeypatch.setattr(bridge, "TORCH_CHANNELS_LAST_MIN_CHANNELS", None)
    many = random_tensor(rng, (4, 32, 6, 5), np.float32).contiguous(
        memory_format=torch.channels_last)
    assert ft.covered_by_kernels(many)




@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d",
                                    "strided", "both"])
def test_kernels_see_a_zero_copy_view_in_the_tensors_layout(layout, monkeypatch, rng):
    """The contract's routing: contiguous memory takes the channels-first kernels and
    channels_last / channels_last_3d memory the channels-last ones, each on a NumPy view of the
    tensor's own memory (no copy), with y and dx in the input's memory format; any other
    striding is copied to contiguous once. A tensor that is both (one channel) counts as
    channels-first."""
    shape = {"channels_last_3d": (4, 3, 5, 6, 7), "both": (4, 1, 6, 7)}.get(layout, (4, 3, 6, 7))
    x = random_tensor(rng, shape, np.float32)
    if layout in ("channels_last", "channels_last_3d"):
        x = x.contiguous(memory_format=getattr(torch, layout))
    elif layout == "strided":
        x = random_tensor(rng, (4, 3, 6, 14), np.float32)[..., ::2]
    x.requires_grad_()
    import fastbn.functional as F
    seen = []

    def spy(name):
        real = getattr(F, name)

        def call(*args, channels_last=False, **kwargs):
            array = args[0] if name == "batch_norm_forward" else args[1]
            seen.append((name, channels_last, array.__array_interface__["data"][0],
                         array.shape, array.flags.c_contiguous))
            return real(*args, channels_last=channels_last, **kwargs)
        monkeypatch.setattr(ops.F, name, call)

    spy("batch_norm_forward")
    spy("batch_norm_backward")
    module = FAST_BATCHNORM[x.dim()](shape[1])
    y = module(x)
    y.backward(torch.ones_like(y))
    channels_last = layout in ("channels_last", "channels_last_3d")
    assert [s[:2] for s in seen] == [("batch_norm_forward", channels_last),
                                     ("batch_norm_backward", channels_last)]
    for _, _, address, array_shape, c_contiguous in seen:
        assert c_contiguous
        assert array_shape == (x.movedim(1, -1).shape if channels_last else x.shape)
        assert (address == x.data_ptr()) is (layout != "strided")
    if layout == "strided":
        assert y.is_contiguous() and x.grad.is_contiguous()
    else:
        assert y.stride() == x.stride() and x.grad.stride() == x.stride()
