"""Zero-copy NumPy views of CPU tensors, in the layout fastbn's kernels take.

A tensor is channels-first for the kernels when it is contiguous, and channels-last when moving
its channel axis last gives a contiguous tensor (``torch.channels_last`` / ``channels_last_3d``,
or a transposed (N, L, C) batch for 1d). Anything else is made contiguous once.
"""

__all__ = ["kernel_layout", "in_kernel_layout", "as_array", "array_in_layout"]


def kernel_layout(t):
    """True for channels-last memory, False for contiguous, None for any other striding.

    A tensor that is both (one channel, or one value per sample) counts as channels-first.
    """
    if t.is_contiguous():
        return False
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return True
    return None


def in_kernel_layout(t):
    """(t, channels_last) with t copied to contiguous memory only when its striding is neither
    layout. Works on fake tensors too, so the fake kernels give the real strides."""
    channels_last = kernel_layout(t)
    if channels_last is None:
        return t.contiguous(), False
    return t, channels_last


def as_array(t, channels_last=False):
    """The NumPy view of t's memory: (N, C, ...) or, channels-last, (N, ..., C). No copy."""
    t = t.detach()
    if channels_last:
        t = t.movedim(1, -1)
    return t.numpy()


def array_in_layout(t, channels_last):
    """A NumPy view of t in the given layout, copying t once if its memory is laid out
    otherwise (a gradient may arrive channels-first for a channels-last input)."""
    if kernel_layout(t) is not channels_last:
        t = t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()
    return as_array(t, channels_last)
