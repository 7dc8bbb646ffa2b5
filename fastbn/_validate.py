"""Input checks for the functional layer and the modules.

Every check runs before any kernel does, so a call that raises changes nothing. Messages name
the argument, what was expected and what arrived.
"""

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INPUT_DTYPES = "float32, float64, float16 or bfloat16"
_LOWP_HINT = "bfloat16 needs the ml_dtypes package: pip install 'fastbn[lowp]'"


def bfloat16_dtype():
    """ml_dtypes.bfloat16 as a NumPy dtype; imported on first use, so that fastbn itself never
    needs ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(_LOWP_HINT) from None
    return np.dtype(ml_dtypes.bfloat16)


def is_input_dtype(dtype):
    """Whether data of this dtype can be normalized: float32 and float64, and the 16-bit
    storage formats float16 and bfloat16 (computed in float32, statistics in float64)."""
    if dtype in _FLOAT_DTYPES or dtype == np.float16:
        return True
    # Only a bfloat16 array can bring this name, and with it ml_dtypes, already imported.
    return dtype.name == "bfloat16" and dtype == bfloat16_dtype()


def resolve_dtype(dtype):
    """A dtype argument ("bfloat16", np.float16, ml_dtypes.bfloat16, ...) as an np.dtype; a
    bfloat16 request without ml_dtypes raises an ImportError naming the lowp extra."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return bfloat16_dtype()
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be {_INPUT_DTYPES}, got {dtype!r}") from None


def parameter_dtype(dtype):
    """Parameters and running buffers of a model whose activations have this dtype: the same
    for float32 and float64, float32 for float16 and bfloat16 (torch's mixed precision)."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def as_float_array(x, name="x"):
    """x as an ndarray of an input dtype (see is_input_dtype), or a TypeError that says what
    was wrong."""
    if type(x) is not np.ndarray:
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an array of {_INPUT_DTYPES} values; "
                            f"np.asarray failed: {exc}") from None
    if not is_input_dtype(x.dtype):
        raise TypeError(f"{name} must have dtype {_INPUT_DTYPES}, got {x.dtype}")
    return x


def check_channels(x, num_channels, channels_last, name="x"):
    """Raise ValueError unless x is (N, C, ...) or (N, ..., C) with C == num_channels."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), got shape "
                         f"{x.shape}")
    got = x.shape[-1] if channels_last else x.shape[1]
    if got != num_channels:
        axis = "last" if channels_last else "1"
        raise ValueError(f"{name} has {got} channels (axis {axis}) but {num_channels} were "
                         f"expected; shape {x.shape}")


def check_batch_size(x, plan):
    if plan.count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}")


def contiguous(x):
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def channel_vector(v, n_channels, name, writeable=False):
    if v is None:
        return None
    if type(v) is not np.ndarray or v.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 ndarray of shape "
                        f"({n_channels},), got {type(v).__name__}"
                        + (f" of dtype {v.dtype}" if isinstance(v, np.ndarray) else ""))
    if v.shape != (n_channels,):
        raise ValueError(f"{name} must have shape ({n_channels},), got {v.shape}")
    if writeable and not (v.flags.writeable and v.flags.c_contiguous):
        raise ValueError(f"{name} is updated in place, so it must be writeable and contiguous")
    return v


def checked_output(out, x, name="out"):
    """out validated against x, or a new C-contiguous array like x."""
    if out is None:
        return np.empty(x.shape, x.dtype)
    if type(out) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{name} must have shape {x.shape} and dtype {x.dtype}, got shape "
                         f"{out.shape} and dtype {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be C-contiguous and writeable")
    return out


def check_no_overlap(out, x, out_name, x_name, allow_same=False):
    """Reject an out that overlaps x partially; an exact alias is elementwise-safe."""
    if out is x or not np.may_share_memory(out, x):
        if out is x and not allow_same:
            raise ValueError(f"{out_name} must not be {x_name}: {x_name} is needed intact")
        return
    same = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
            and out.strides == x.strides)
    if same and allow_same:
        return
    if same or np.shares_memory(out, x):
        raise ValueError(f"{out_name} overlaps {x_name} in memory, which would corrupt the "
                         "result; pass a separate buffer")


def check_eps(eps):
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    return eps


def check_momentum(momentum):
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


def new_or_checked_output(out, x, allow_same):
    if out is None:
        return np.empty(x.shape, x.dtype)
    out = checked_output(out, x)
    check_no_overlap(out, x, "out", "x", allow_same=allow_same)
    return out
