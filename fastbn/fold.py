"""Folding an eval-mode batch norm into the layer before it, for inference.

A convolution or linear layer computes ``z[o] = sum(W[o] * input) + b[o]`` per output channel
o; an eval-mode batch norm then computes ``y[o] = (z[o] - mean[o]) * scale[o] + beta[o]`` with
``scale = gamma / sqrt(running_var + eps)``. Both are affine in z, so one layer with
``W'[o] = W[o] * scale[o]`` and ``b'[o] = (b[o] - mean[o]) * scale[o] + beta[o]`` computes y
directly. PyTorch users have this as ``torch.nn.utils.fusion.fuse_conv_bn_eval``.
"""

from collections.abc import Mapping

import numpy as np

from ._validate import check_eps
from .functional import running_invstd
from .modules import _BatchNorm

__all__ = ["fold_batch_norm"]


def fold_batch_norm(weight, bias, bn, *, axis=0, eps=None):
    """The weight and bias of a layer followed by ``bn`` in eval mode, as one layer.

    ``weight`` is the layer's weight array (a convolution's (O, I, kH, kW), a channels-last
    (kH, kW, I, O), a linear layer's (O, I), ...) and ``axis`` its output-channel axis;
    ``bias`` is its (O,) bias or None. ``bn`` is either a fastbn batch norm module, whose
    running statistics, affine parameters and eps are used, or a mapping such as a
    ``state_dict()`` (fastbn's or torch's, arrays or CPU tensors) with ``running_mean`` and
    ``running_var`` and, when affine, ``weight`` and ``bias``; a mapping needs ``eps`` as a
    keyword, a module must not be given one.

    Returns ``(folded_weight, folded_bias)``, computed in float64 and returned in weight's
    dtype; folded_bias is an (O,) array even when bias is None. Eval mode only: a batch norm
    with ``track_running_stats=False`` normalizes every batch with its own statistics, which
    no fixed weight can reproduce, so it raises ValueError.
    """
    weight = _float_array(weight, "weight")
    if weight.ndim < 1:
        raise ValueError("weight must have at least one dimension (the output channels)")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"axis {axis} is out of range for weight of shape {weight.shape}")
    axis = int(axis) % weight.ndim
    n_out = weight.shape[axis]
    mean, var, gamma, beta, eps = _batch_norm_state(bn, eps, n_out)
    if bias is not None:
        bias = _float_array(bias, "bias")
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},) (weight's axis {axis}), got "
                             f"{bias.shape}")
    scale = running_invstd(var, eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean if bias is None else bias.astype(np.float64) - mean
    folded_bias = shift * scale + (0.0 if beta is None else beta)
    per_channel = [1] * weight.ndim
    per_channel[axis] = n_out
    folded_weight = weight.astype(np.float64) * scale.reshape(per_channel)
    return folded_weight.astype(weight.dtype), folded_bias.astype(weight.dtype)


def _float_array(value, name):
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise TypeError(f"{name} must hold floating-point values, got {array.dtype}")
    return array


def _batch_norm_state(bn, eps, n_out):
    """(mean, var, gamma or None, beta or None, eps) in float64, checked against n_out."""
    if isinstance(bn, _BatchNorm):
        if eps is not None:
            raise TypeError("eps comes from the module; pass eps only with a state_dict")
        if bn._relu:
            raise TypeError(f"{type(bn).__name__} applies a ReLU after the batch norm, which "
                            "no folded weight can: fold bn.state_dict() with eps=bn.eps and "
                            "keep a ReLU after the folded layer")
        if not bn.track_running_stats:
            raise ValueError(f"cannot fold {type(bn).__name__} with track_running_stats=False:"
                             " it normalizes every batch with that batch's own statistics, "
                             "even in eval mode")
        state = bn.state_dict()
        eps = bn.eps
    elif isinstance(bn, Mapping):
        if eps is None:
            raise TypeError("fold_batch_norm(..., bn=<state_dict>) needs eps=... (the batch "
                            "norm's eps; a state_dict does not hold it)")
        state = bn
        eps = check_eps(eps)
    else:
        raise TypeError("bn must be a fastbn batch norm module or a state_dict mapping, got "
                        f"{type(bn).__name__}")
    if "running_mean" not in state or "running_var" not in state:
        raise ValueError("cannot fold a batch norm without running statistics (a "
                         "track_running_stats=False module's state has none): it normalizes "
                         "every batch with that batch's own statistics")
    if ("weight" in state) != ("bias" in state):
        raise ValueError("the state has only one of weight and bias; an affine batch norm "
                         "has both")
    values = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        if key not in state:
            values[key] = None
            continue
        value = np.asarray(state[key])
        if value.shape != (n_out,):
            raise ValueError(f"the batch norm's {key} has shape {value.shape}, but weight has "
                             f"{n_out} output channels")
        values[key] = value.astype(np.float64)
    return (values["running_mean"], values["running_var"], values["weight"], values["bias"],
            eps)
