"""fold_batch_norm: a layer followed by an eval-mode batch norm against the folded layer.

The convolutions are written here with NumPy (valid padding, stride 1), channels-first
(weight (O, I, kH, kW) on NCHW input) and channels-last (weight (kH, kW, I, O) on NHWC input).
"""

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import make_input, make_params


def conv_nchw(x, weight, bias):
    """x (N, I, H, W), weight (O, I, kH, kW) -> (N, O, H', W') in float64."""
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), weight.shape[2:],
                                                       axis=(2, 3))
    y = np.einsum("nihwab,oiab->nohw", windows, weight.astype(np.float64))
    return y if bias is None else y + bias.astype(np.float64).reshape(1, -1, 1, 1)


def conv_nhwc(x, weight, bias):
    """x (N, H, W, I), weight (kH, kW, I, O) -> (N, H', W', O) in float64."""
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), weight.shape[:2],
                                                       axis=(1, 2))
    y = np.einsum("nhwiab,abio->nhwo", windows, weight.astype(np.float64))
    return y if bias is None else y + bias.astype(np.float64)


def trained_batch_norm(rng, module, batch_shape, dtype):
    """module after a few training steps (running statistics away from 0 and 1), in eval."""
    for _ in range(3):
        module(make_input(rng, batch_shape, dtype, module.channels_last))
    if module.affine:
        module.weight[...], module.bias[...] = make_params(rng, module.num_features, dtype)
    return module.eval()


def check_fold(layer, x, weight, bias, module, axis, dtype):
    """layer(x) then module (eval) against layer(x) with the folded weight and bias."""
    folded_weight, folded_bias = fastbn.fold_batch_norm(weight, bias, module, axis=axis)
    assert folded_weight.dtype == weight.dtype and folded_bias.dtype == weight.dtype
    assert folded_weight.shape == weight.shape and folded_bias.shape == (weight.shape[axis],)
    z = layer(x, weight, bias)
    expected = ref.forward_eval(z, module.running_mean, module.running_var, module.weight,
                                module.bias, module.eps, module.channels_last)
    got = layer(x, folded_weight, folded_bias)
    # The folded parameters are float64 results rounded once to dtype; the products and sums
    # of the layer then carry that relative error, scaled by the magnitudes they add up.
    scale = layer(np.abs(x), np.abs(folded_weight), np.abs(folded_bias))
    ref.assert_close(got, expected, dtype, scale, "folded layer")
    # And end to end in the input dtype: fastbn's own eval batch norm on the layer's output.
    y = module(z.astype(dtype))
    ref.assert_close(got, y, dtype, scale + np.abs(expected), "folded layer vs module")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_conv_channels_first(affine, with_bias, dtype, rng):
    x = make_input(rng, (2, 3, 9, 8), dtype)
    weight = rng.standard_normal((5, 3, 3, 2)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype) if with_bias else None
    module = trained_batch_norm(rng, fastbn.BatchNorm2d(5, affine=affine, dtype=dtype),
                                (4, 5, 6, 6), dtype)
    check_fold(conv_nchw, x, weight, bias, module, 0, dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_conv_channels_last(affine, dtype, rng):
    x = make_input(rng, (2, 3, 7, 9), dtype, channels_last=True)
    weight = rng.standard_normal((2, 3, 3, 4)).astype(dtype)  # (kH, kW, I, O)
    bias = rng.standard_normal(4).astype(dtype)
    module = trained_batch_norm(
        rng, fastbn.BatchNorm2d(4, affine=affine, channels_last=True, dtype=dtype),
        (4, 4, 5, 5), dtype)
    check_fold(conv_nhwc, x, weight, bias, module, -1, dtype)


def test_linear_layer_and_batch_norm_1d(dtype, rng):
    def linear(x, weight, bias):
        return x.astype(np.float64) @ weight.astype(np.float64).T + bias.astype(np.float64)

    x = make_input(rng, (6, 7), dtype)
    weight = rng.standard_normal((3, 7)).astype(dtype)
    bias = rng.standard_normal(3).astype(dtype)
    module = trained_batch_norm(rng, fastbn.BatchNorm1d(3, eps=1e-3, dtype=dtype), (8, 3),
                                dtype)
    check_fold(linear, x, weight, bias, module, 0, dtype)


def test_state_dict_with_eps_folds_like_the_module(rng):
    module = trained_batch_norm(rng, fastbn.BatchNorm2d(4, eps=1e-4), (4, 4, 5, 5),
                                np.float32)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    from_module = fastbn.fold_batch_norm(weight, bias, module)
    from_state = fastbn.fold_batch_norm(weight, bias, module.state_dict(), eps=1e-4)
    for got, expected in zip(from_state, from_module):
        np.testing.assert_array_equal(got, expected)
    # Without affine parameters the state has running statistics only.
    plain = trained_batch_norm(rng, fastbn.BatchNorm2d(4, affine=False), (4, 4, 5, 5),
                               np.float32)
    assert "weight" not in plain.state_dict()
    for got, expected in zip(fastbn.fold_batch_norm(weight, None, plain.state_dict(),
                                                    eps=plain.eps),
                             fastbn.fold_batch_norm(weight, None, plain)):
        np.testing.assert_array_equal(got, expected)


def test_what_cannot_be_folded_says_why(rng):
    weight = np.ones((3, 2), np.float32)
    batch_stats_only = fastbn.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="cannot fold BatchNorm1d with track_running_stats="
                                         "False: it normalizes every batch"):
        fastbn.fold_batch_norm(weight, None, batch_stats_only)
    with pytest.raises(ValueError, match="cannot fold a batch norm without running statistics"):
        fastbn.fold_batch_norm(weight, None, batch_stats_only.state_dict(), eps=1e-5)
    with pytest.raises(TypeError, match="BNReLU1d applies a ReLU after the batch norm"):
        fastbn.fold_batch_norm(weight, None, fastbn.BNReLU1d(3))
    state = fastbn.BatchNorm1d(3).state_dict()
    with pytest.raises(TypeError, match="needs eps="):
        fastbn.fold_batch_norm(weight, None, state)
    with pytest.raises(TypeError, match="eps comes from the module"):
        fastbn.fold_batch_norm(weight, None, fastbn.BatchNorm1d(3), eps=1e-3)
    with pytest.raises(ValueError, match="running_mean has shape \\(3,\\), but weight has 2 "
                                         "output channels"):
        fastbn.fold_batch_norm(weight, None, state, eps=1e-5, axis=1)
    with pytest.raises(ValueError, match="bias must have shape \\(3,\\)"):
        fastbn.fold_batch_norm(weight, np.ones(2, np.float32), state, eps=1e-5)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fastbn.fold_batch_norm(weight, None, state, eps=1e-5, axis=2)
    with pytest.raises(TypeError, match="weight must hold floating-point values"):
        fastbn.fold_batch_norm(np.ones((3, 2), np.int64), None, state, eps=1e-5)
    with pytest.raises(TypeError, match="bn must be a fastbn batch norm module or a "
                                        "state_dict"):
        fastbn.fold_batch_norm(weight, None, [1, 2, 3], eps=1e-5)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        fastbn.fold_batch_norm(weight, None, state, eps=-1.0)


def test_matches_torch_fuse_conv_bn_weights(dtype, rng):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    module = trained_batch_norm(rng, fastbn.BatchNorm2d(4, eps=1e-3, dtype=dtype),
                                (4, 4, 5, 5), dtype)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    folded_weight, folded_bias = fastbn.fold_batch_norm(weight, bias, module)
    state = {key: torch.from_numpy(np.asarray(value)) for key, value in
             module.state_dict().items()}
    t_weight, t_bias = fuse_conv_bn_weights(
        torch.from_numpy(weight), torch.from_numpy(bias), state["running_mean"],
        state["running_var"], module.eps, state["weight"], state["bias"])
    ref.assert_close(folded_weight, t_weight.detach().numpy(), dtype,
                     np.max(np.abs(folded_weight)), "weight vs torch")
    ref.assert_close(folded_bias, t_bias.detach().numpy(), dtype,
                     np.max(np.abs(folded_bias)) + np.max(np.abs(module.running_mean)),
                     "bias vs torch")
    # A torch state_dict (tensors) folds directly.
    from_torch_state = fastbn.fold_batch_norm(weight, bias, state, eps=module.eps)
    for got, expected in zip(from_torch_state, (folded_weight, folded_bias)):
        np.testing.assert_array_equal(got, expected)
