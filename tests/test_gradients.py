"""Finite-difference checks of backward in float64: dx, grad_weight and grad_bias.

The loss is L = sum(g * y) for a fixed random g, so dL/dx is backward(g). Central differences
with step h have error about h**2 * |L'''| / 6 + eps64 * |L| / h, roughly 1e-10 here with
h = 1e-5 and O(1) data, while any wrong term of the gradient is of the order of the gradient's
own scale. The tolerance, 1e-7 of that scale, sits between the two.

Each check also differentiates the reference, so the formulas in tests/reference.py are
verified independently of fastbn.
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import MODULE_FOR_RANK, make_input, make_params, make_running, shape_id

STEP = 1e-5
FD_RTOL = 1e-7
SHAPES = [(4, 3), (3, 2, 5), (2, 3, 2, 3), (2, 2, 2, 1, 3)]


def central_difference(loss, array):
    """dloss/darray, perturbing each element of array in place (and restoring it)."""
    grad = np.empty(array.shape)
    flat = array.reshape(-1)
    assert np.shares_memory(flat, array)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + STEP
        up = loss()
        flat[i] = saved - STEP
        down = loss()
        flat[i] = saved
        grad.reshape(-1)[i] = (up - down) / (2 * STEP)
    return grad


def assert_fd_close(analytic, numeric, scale, what):
    analytic = np.asarray(analytic, np.float64)
    error = np.max(np.abs(analytic - numeric))
    assert error <= FD_RTOL * scale, (
        f"{what}: finite difference differs by {error:.3g} (scale {scale:.3g})")


def build(shape, channels_last, mode, affine, rng):
    """A float64 module in the given mode, with random parameters and running statistics."""
    cls = MODULE_FOR_RANK[len(shape)]
    module = cls(shape[1], affine=affine, track_running_stats=mode != "batch_eval",
                 channels_last=channels_last, dtype=np.float64)
    if affine:
        module.weight[...], module.bias[...] = make_params(rng, shape[1], np.float64)
    if mode == "eval":
        module.running_mean[...], module.running_var[...] = make_running(rng, shape[1],
                                                                         np.float64)
    return module.train(mode == "train")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("mode", ["train", "eval", "batch_eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_module_gradients_match_finite_differences(shape, mode, affine, channels_last, rng):
    """mode batch_eval: track_running_stats=False in eval, which uses batch statistics."""
    module = build(shape, channels_last, mode, affine, rng)
    reference = ref.ReferenceBatchNorm(shape[1], eps=module.eps, affine=affine,
                                       track_running_stats=mode != "batch_eval",
                                       channels_last=channels_last)
    reference.training = module.training
    if affine:
        reference.weight, reference.bias = module.weight, module.bias
    if mode == "eval":
        reference.running_mean = module.running_mean.copy()
        reference.running_var = module.running_var.copy()
    x = make_input(rng, shape, np.float64, channels_last)
    g = make_input(rng, shape, np.float64, channels_last)

    def loss():
        return float(np.sum(g * module.forward(x)))

    def reference_loss():
        return float(np.sum(g * reference.forward(x)))

    numeric_dx = central_difference(loss, x)
    numeric_ref_dx = central_difference(reference_loss, x)
    if affine:
        numeric_gw = central_difference(loss, module.weight)
        numeric_gb = central_difference(loss, module.bias)

    module.forward(x)
    dx = module.backward(g)
    reference.forward(x)
    dx_ref, gw_ref, gb_ref = reference.backward(g)
    dx_scale, gw_scale, gb_scale = reference.backward_scales(g)
    assert_fd_close(dx, numeric_dx, dx_scale, "dx")
    assert_fd_close(dx_ref, numeric_ref_dx, dx_scale, "reference dx")
    if affine:
        assert_fd_close(module.grad_weight, numeric_gw, np.max(gw_scale), "grad_weight")
        assert_fd_close(module.grad_bias, numeric_gb, np.max(gb_scale), "grad_bias")
        assert_fd_close(gw_ref, numeric_gw, np.max(gw_scale), "reference grad_weight")
        assert_fd_close(gb_ref, numeric_gb, np.max(gb_scale), "reference grad_bias")
    else:
        assert module.grad_weight is None and module.grad_bias is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_gradients_match_finite_differences(training, channels_last, rng):
    """batch_norm_backward against the derivative of batch_norm, parameters included."""
    shape = (3, 2, 2, 3)
    x = make_input(rng, shape, np.float64, channels_last)
    g = make_input(rng, shape, np.float64, channels_last)
    weight, bias = make_params(rng, shape[1], np.float64)
    running_mean, running_var = make_running(rng, shape[1], np.float64)
    eps = 1e-3

    def loss():
        y = fastbn.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                              training=training, eps=eps, channels_last=channels_last)
        return float(np.sum(g * y))

    numeric = [central_difference(loss, a) for a in (x, weight, bias)]
    if training:
        _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, eps,
                                                    channels_last=channels_last)
    else:
        mean, invstd = running_mean, ref.inverse_std(running_var, eps)
    analytic = fastbn.batch_norm_backward(g, x, mean, invstd, weight, training=training,
                                          channels_last=channels_last)
    scales = ref.backward_scales(g, x, mean, invstd, weight, channels_last, training)
    for name, a, n, s in zip(("dx", "grad_weight", "grad_bias"), analytic, numeric, scales):
        assert_fd_close(a, n, np.max(s), name)


def test_batch_statistics_gradient_sums_to_zero(channels_last, rng):
    """In training, y is invariant to adding a constant to a channel, so sum(dx) == 0 per
    channel; a backward that ignored the mean's dependence on x would fail this."""
    shape = (4, 3, 5)
    module = build(shape, channels_last, "train", True, rng)
    x = make_input(rng, shape, np.float64, channels_last)
    g = make_input(rng, shape, np.float64, channels_last)
    module.forward(x)
    dx = module.backward(g)
    per_channel = ref.channels_first(dx, channels_last).sum(axis=(0, 2))
    mean, var, _ = ref.batch_mean_var(x, channels_last)
    dx_scale = ref.backward_scales(g, x, mean, ref.inverse_std(var, module.eps), module.weight,
                                   channels_last)[0]
    # A sum of dx.size // C values, each within rounding of dx_scale.
    bound = ref.rtol(np.float64) * dx_scale * (dx.size // shape[1])
    assert np.all(np.abs(per_channel) <= bound), (per_channel, bound)
    assert np.max(np.abs(dx)) > 1e3 * bound  # dx itself is far from zero
