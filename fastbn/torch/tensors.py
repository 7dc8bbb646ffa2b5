"""Zero-copy NumPy views of CPU tensors, in the layout fastbn's kernels take.

A tensor is channels-first for the kernels when it is contiguous, and channels-last when it is
4-D or 5-D and moving its channel axis last gives a contiguous tensor (``torch.channels_last`` /
``channels_last_3d``). Anything else is made contiguous once, including a 3-D (N, C, L) view of
(N, L, C) memory: torch has no memory format for it and returns such a batch norm's output
contiguous, and matching that keeps torch.compile's dynamic-shape graphs lowerable (inductor
failed on a channels-last 3-D output feeding a convolution's backward).
"""

import torch

from .._validate import bfloat16_dtype

__all__ = ["kernel_layout", "in_kernel_layout", "empty_in_layout", "empty_output", "as_array",
           "array_in_layout", "has_bfloat16_arrays"]

_bfloat16 = None


def has_bfloat16_arrays():
    """Whether bfloat16 tensors can be seen as NumPy arrays (ml_dtypes, the lowp extra)."""
    global _bfloat16
    if _bfloat16 is None:
        try:
            _bfloat16 = bfloat16_dtype()
        except ImportError:
            _bfloat16 = False
    return _bfloat16 is not False


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# Axis orders of the NumPy views: the channel axis moved last, and back.
_TO_CHANNELS_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


def kernel_layout(t):
    """True for channels-last memory, False for contiguous, None for any other striding.

    A tensor that is both (one channel, or one value per sample) counts as channels-first.
    torch's own channels_last test is the same as asking whether moving the channel axis last
    gives a contiguous tensor, without building that view (a tenth of the time, which the
    bridge pays on every call).
    """
    if t.is_contiguous():
        return False
    memory_format = _CHANNELS_LAST.get(t.dim())
    if memory_format is not None and t.is_contiguous(memory_format=memory_format):
        return True
    return None


def in_kernel_layout(t):
    """(t, channels_last) with t copied to contiguous memory only when its striding is neither
    layout. Works on fake tensors too, so the fake kernels give the real strides."""
    channels_last = kernel_layout(t)
    if channels_last is None:
        return t.contiguous(), False
    return t, channels_last


def empty_in_layout(t, channels_last):
    """A new tensor of t's shape and dtype, dense in the given layout, for the fake kernels.

    Built from a plain shape rather than with empty_like: under torch.compile's dynamic shapes
    empty_like gives a channels-last 3-D tensor strides with Max(1, L) terms, which inductor
    failed to lower in a following convolution's backward."""
    if channels_last:
        return t.new_empty(t.movedim(1, -1).shape).movedim(-1, 1)
    return t.new_empty(t.shape)


def empty_output(t):
    """The kernels' output for a real tensor t already in a kernel layout: empty_like keeps
    t's dense strides (contiguous or channels-last) and costs a third of building the
    tensor from its shape."""
    return torch.empty_like(t)


def as_array(t, channels_last=False):
    """The NumPy view of t's memory: (N, C, ...) or, channels-last, (N, ..., C). No copy.

    torch.Tensor.numpy knows no bfloat16: such a tensor is viewed through its int16 bits and
    the array reinterpreted as ml_dtypes.bfloat16 (see has_bfloat16_arrays), still no copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        array = t.view(torch.int16).numpy().view(_bfloat16)
    else:
        array = t.numpy()
    # NumPy's transpose of the view costs half of torch's movedim before .numpy().
    return array.transpose(_TO_CHANNELS_LAST[array.ndim]) if channels_last else array


def array_in_layout(t, channels_last):
    """A NumPy view of t in the given layout, copying t once if its memory is laid out
    otherwise (a gradient may arrive channels-first for a channels-last input)."""
    if kernel_layout(t) is not channels_last:
        t = t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()
    return as_array(t, channels_last)
