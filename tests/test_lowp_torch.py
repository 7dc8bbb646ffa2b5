"""Parity with torch 2.13's bfloat16 and float16 batch norm on the CPU.

torch's mixed-precision path: a bfloat16 (or float16) input with float32 weight, bias and
running buffers. Both libraries are compared with a float64 oracle applied to the same 16-bit
input, and no element of fastbn's may be further from it than torch's own error plus one
rounding step of the output dtype at that value: dtype rounding for y and dx, float32 for
grad_weight, grad_bias and the running statistics. Channels-last runs give torch a
channels_last tensor, so its channels-last kernels are the peer.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import seeded_rng, shape_id
from test_lowp import lowp_case, rounding_step

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
# Imported before any test runs, so that conftest's fixture lets the bridge take small tensors.
import fastbn.torch  # noqa: E402

pytestmark = pytest.mark.torch

TORCH_LOWP = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = [(6, 5), (4, 3, 6, 7), (8, 16, 16, 17), (2, 3, 4, 5, 6)]


@pytest.fixture(params=[ml_dtypes.bfloat16, np.float16], ids=["bfloat16", "float16"])
def lowp(request):
    return np.dtype(request.param)


def to_torch(x, lowp, channels_last, requires_grad=False):
    """x (fastbn layout) as a torch tensor of the 16-bit dtype, channels_last memory format
    where the layout asks for it; float32 holds every 16-bit value exactly."""
    a = np.moveaxis(x, -1, 1) if channels_last and x.ndim > 2 else x
    t = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(TORCH_LOWP[lowp.name])
    if channels_last and x.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif channels_last and x.ndim == 5:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t.requires_grad_(requires_grad)


def to_numpy(t, channels_last):
    a = t.detach().float().numpy().astype(np.float64)
    return np.moveaxis(a, 1, -1) if channels_last and a.ndim > 2 else a


def step(value, dtype):
    if np.dtype(dtype) == np.float32:
        return np.spacing(np.abs(np.asarray(value, np.float64)).astype(np.float32)).astype(
            np.float64)
    return rounding_step(value, np.dtype(dtype))


def assert_no_worse_than_torch(ours, theirs, oracle, dtype, what):
    ours = np.asarray(ours, np.float64)
    ours_error = np.abs(ours - oracle)
    torch_error = np.abs(np.asarray(theirs, np.float64) - oracle)
    bound = torch_error + step(oracle, dtype)
    bad = ~(ours_error <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements further from the float64 oracle than torch "
        f"plus one rounding step; ours {ours[bad][:3]}, torch {np.asarray(theirs)[bad][:3]}, "
        f"oracle {oracle[bad][:3]}")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_training_forward_backward_and_running_stats(shape, lowp, channels_last):
    x, dy, weight, bias, (rm, rv) = lowp_case(shape, lowp, channels_last, "torch-train")
    running_mean, running_var = rm.copy(), rv.copy()
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=running_mean,
                                                running_var=running_var, momentum=0.1,
                                                channels_last=channels_last)
    dx, grad_weight, grad_bias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                                            channels_last=channels_last)

    xt = to_torch(x, lowp, channels_last, requires_grad=True)
    wt = torch.from_numpy(weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(bias.copy()).requires_grad_(True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    yt = torch.nn.functional.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
    yt.backward(to_torch(dy, lowp, channels_last))
    assert yt.dtype == xt.grad.dtype == TORCH_LOWP[lowp.name]

    y_ref, mean_ref, _, var_unbiased = ref.forward_train(x, weight, bias, 1e-5, channels_last)
    dx_ref, gw_ref, gb_ref = ref.backward_train(dy, x, weight, 1e-5, channels_last)
    assert y.dtype == dx.dtype == lowp
    assert_no_worse_than_torch(y, to_numpy(yt, channels_last), y_ref, lowp, "y")
    assert_no_worse_than_torch(running_mean, rmt.numpy(), ref.update_running(rm, mean_ref, 0.1),
                               np.float32, "running_mean")
    assert_no_worse_than_torch(running_var, rvt.numpy(),
                               ref.update_running(rv, var_unbiased, 0.1), np.float32,
                               "running_var")
    assert_no_worse_than_torch(dx, to_numpy(xt.grad, channels_last), dx_ref, lowp, "dx")
    assert_no_worse_than_torch(grad_weight, wt.grad.numpy(), gw_ref, np.float32, "grad_weight")
    assert_no_worse_than_torch(grad_bias, bt.grad.numpy(), gb_ref, np.float32, "grad_bias")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_eval_forward_and_backward(shape, lowp, channels_last):
    x, dy, weight, bias, (rm, rv) = lowp_case(shape, lowp, channels_last, "torch-eval")
    module = fastbn.BatchNorm1d if len(shape) < 4 else (
        fastbn.BatchNorm2d if len(shape) == 4 else fastbn.BatchNorm3d)
    bn = module(shape[1], channels_last=channels_last, dtype=lowp).eval()
    bn.load_state_dict(dict(weight=weight, bias=bias, running_mean=rm, running_var=rv,
                            num_batches_tracked=np.int64(0)))
    y = bn(x)
    dx = bn.backward(dy)

    xt = to_torch(x, lowp, channels_last, requires_grad=True)
    wt = torch.from_numpy(weight.copy()).requires_grad_(True)
    bt = torch.from_numpy(bias.copy()).requires_grad_(True)
    yt = torch.nn.functional.batch_norm(xt, torch.from_numpy(rm), torch.from_numpy(rv), wt, bt,
                                        False, 0.1, 1e-5)
    yt.backward(to_torch(dy, lowp, channels_last))

    y_ref = ref.forward_eval(x, rm, rv, weight, bias, 1e-5, channels_last)
    dx_ref, gw_ref, gb_ref = ref.backward_eval(dy, x, rm, rv, weight, 1e-5, channels_last)
    assert_no_worse_than_torch(y, to_numpy(yt, channels_last), y_ref, lowp, "y")
    assert_no_worse_than_torch(dx, to_numpy(xt.grad, channels_last), dx_ref, lowp, "dx")
    assert_no_worse_than_torch(bn.grad_weight, wt.grad.numpy(), gw_ref, np.float32,
                               "grad_weight")
    assert_no_worse_than_torch(bn.grad_bias, bt.grad.numpy(), gb_ref, np.float32, "grad_bias")


def test_the_criterion_catches_an_error_beyond_one_rounding_step(lowp):
    """Guard for the comparison itself: with torch exact, one element two rounding steps off
    fails, and half a step passes."""
    x, _, weight, bias, _ = lowp_case((4, 3, 6, 7), lowp, False, "guard")
    y_ref = ref.forward_train(x, weight, bias, 1e-5, False)[0]
    k = seeded_rng("guard").integers(y_ref.size)
    off = y_ref.copy()
    off.flat[k] += 0.5 * rounding_step(y_ref.flat[k], lowp)
    assert_no_worse_than_torch(off, y_ref, y_ref, lowp, "y")
    off.flat[k] = y_ref.flat[k] + 2 * rounding_step(y_ref.flat[k], lowp)
    with pytest.raises(AssertionError, match="y: 1 of 504 elements"):
        assert_no_worse_than_torch(off, y_ref, y_ref, lowp, "y")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_bridge_runs_16_bit_tensors_on_the_kernels(lowp, channels_last, monkeypatch):
    """fastbn.torch routes bfloat16/float16 tensors with float32 parameters to the kernels
    (through int16 views of their bits): the same bits as the NumPy call, a result no worse
    than torch's, and 16-bit dx with float32 parameter gradients."""
    import fastbn.functional
    ft = fastbn.torch

    shape = (4, 3, 6, 7)
    x, dy, weight, bias, _ = lowp_case(shape, lowp, channels_last, "bridge")
    calls = []
    forward = fastbn.functional.batch_norm_forward
    monkeypatch.setattr(fastbn.functional, "batch_norm_forward",
                        lambda *a, **k: calls.append(a[0].dtype) or forward(*a, **k))
    modules = ft.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in modules:
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(weight))
            module.bias.copy_(torch.from_numpy(bias))
    results = []
    for module in modules:
        xt = to_torch(x, lowp, channels_last, requires_grad=True)
        assert ft.covered_by_kernels(xt, module.weight, module.bias, module.running_mean)
        yt = module(xt)
        yt.backward(to_torch(dy, lowp, channels_last))
        results.append((yt, xt.grad, module.weight.grad, module.bias.grad, module.running_var))
    assert calls == [lowp]
    (y, dx, gw, gb, rv), (y_t, dx_t, gw_t, gb_t, rv_t) = results
    assert y.dtype == dx.dtype == TORCH_LOWP[lowp.name] and gw.dtype == torch.float32
    expected, *_ = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
    np.testing.assert_array_equal(to_numpy(y, channels_last), expected.astype(np.float64))
    y_ref, _, _, var_unbiased = ref.forward_train(x, weight, bias, 1e-5, channels_last)
    dx_ref, gw_ref, gb_ref = ref.backward_train(dy, x, weight, 1e-5, channels_last)
    assert_no_worse_than_torch(to_numpy(y, channels_last), to_numpy(y_t, channels_last), y_ref,
                               lowp, "y")
    assert_no_worse_than_torch(to_numpy(dx, channels_last), to_numpy(dx_t, channels_last),
                               dx_ref, lowp, "dx")
    assert_no_worse_than_torch(gw.numpy(), gw_t.numpy(), gw_ref, np.float32, "grad_weight")
    assert_no_worse_than_torch(gb.numpy(), gb_t.numpy(), gb_ref, np.float32, "grad_bias")
    assert_no_worse_than_torch(rv.numpy(), rv_t.numpy(),
                               ref.update_running(np.ones(3), var_unbiased, 0.1), np.float32,
                               "running_var")
    modules[0].eval()
    y_eval = modules[0](to_torch(x, lowp, channels_last))
    assert y_eval.dtype == TORCH_LOWP[lowp.name]
