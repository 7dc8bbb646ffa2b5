"""BatchNorm1d/2d/3d: parameters, running statistics, train/eval modes, saved tensors.

The modules follow torch.nn.BatchNorm{1,2,3}d exactly, on NumPy arrays, with an explicit
``backward(dy)`` in place of autograd. The arithmetic lives in :mod:`fastbn.functional`.
BNReLU1d/2d/3d are the same modules with a ReLU fused into the normalize pass.

``dtype`` names the activations' dtype. float32 and float64 modules hold their parameters and
running buffers in that dtype. float16 and bfloat16 (``"bfloat16"`` or ``ml_dtypes.bfloat16``,
the ``lowp`` extra) are storage formats: such modules hold float32 parameters and buffers,
torch's mixed-precision convention, and so do their grad_weight and grad_bias. As with torch's
CPU batch norm, every module takes input of any of the four dtypes; y and dx keep the input's.
"""

import numpy as np

from . import _validate as V
from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNReLU1d", "BNReLU2d", "BNReLU3d"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class StateDictKeyError(KeyError, ValueError):
    """load_state_dict's keys do not match: a ValueError by contract, and a KeyError too so
    that callers written against the earlier behaviour keep catching it."""

    def __str__(self):
        # KeyError's str() is the repr of its argument; a message reads better unquoted.
        return str(self.args[0]) if self.args else ""


class _BatchNorm:
    _ndims = ()
    _shape_doc = ("", "")
    # BNReLU modules: y = max(0, batch_norm(x)) in the same pass, and a backward through both.
    _relu = False

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, channels_last=False, dtype=np.float32):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        dtype = V.resolve_dtype(dtype)
        if not V.is_input_dtype(dtype):
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        self.num_features = int(num_features)
        self.eps = V.check_eps(eps)
        self.momentum = None if momentum is None else V.check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        param_dtype = V.parameter_dtype(dtype)
        self.training = True
        if self.affine:
            self.weight = np.ones(self.num_features, param_dtype)
            self.bias = np.zeros(self.num_features, param_dtype)
        else:
            self.weight = self.bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, param_dtype)
            self.running_var = np.ones(self.num_features, param_dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    # ------------------------------------------------------------------ modes and state

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def state_dict(self):
        """torch's key names, each only where the module has it; arrays are copies."""
        state = {}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                state[key] = value.copy() if isinstance(value, np.ndarray) else np.int64(value)
        return state

    def load_state_dict(self, state_dict):
        """Load arrays (or anything np.asarray accepts, such as torch tensors' .numpy()).

        Keys must match state_dict()'s exactly, else :class:`StateDictKeyError` (a ValueError
        and a KeyError) names the missing and unexpected ones. Shapes must be
        (num_features,); nothing is changed unless every entry is valid.
        """
        expected = set(self.state_dict())
        given = set(state_dict)
        if given != expected:
            missing = sorted(expected - given)
            unexpected = sorted(given - expected)
            raise StateDictKeyError(f"state_dict keys do not match: missing {missing}, "
                           f"unexpected {unexpected}")
        staged = {}
        for key in expected:
            value = np.asarray(state_dict[key])
            if key == "num_batches_tracked":
                if value.shape != () or not np.issubdtype(value.dtype, np.integer):
                    raise ValueError(f"num_batches_tracked must be an integer scalar, got "
                                     f"{value.dtype} of shape {value.shape}")
                staged[key] = int(value)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got "
                                 f"{value.shape}")
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"{key} must hold floating-point values, got {value.dtype}")
            staged[key] = value
        for key, value in staged.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value

    def save_state(self, file):
        """Write state_dict() to file (a path or binary file object) with np.savez.

        The file holds plain numeric arrays only; :meth:`load_state` reads it back without
        ever unpickling.
        """
        np.savez(file, **self.state_dict())

    def load_state(self, file):
        """Load a file written by :meth:`save_state`; it is read with allow_pickle=False."""
        with np.load(file, allow_pickle=False) as archive:
            self.load_state_dict({key: archive[key] for key in archive.files})

    def __getstate__(self):
        # Like torch, which never pickles autograd state: copies and pickles keep parameters,
        # buffers, gradients, mode and hyperparameters but not the input saved for backward,
        # which would drag a whole batch along. Call forward again before backward.
        state = self.__dict__.copy()
        state["_saved"] = None
        return state

    def __repr__(self):
        text = (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
        if self.channels_last:
            text += ", channels_last=True"
        return text + ")"

    # ------------------------------------------------------------------ compute

    def _check_input(self, x):
        x = V.as_float_array(x)
        if x.ndim not in self._ndims:
            layout = "channels_last" if self.channels_last else "channels_first"
            raise ValueError(f"{type(self).__name__} ({layout}) expects input of shape "
                             f"{self._shape_doc[self.channels_last]}, got {x.ndim}D input of "
                             f"shape {x.shape}")
        V.check_channels(x, self.num_features, self.channels_last)
        return x

    def _checked_state(self):
        """weight, bias, running_mean, running_var, checked: they are public attributes a
        caller may have replaced, and kernels index them without bounds checks."""
        n = self.num_features
        return (V.channel_vector(self.weight, n, "weight"),
                V.channel_vector(self.bias, n, "bias"),
                V.channel_vector(self.running_mean, n, "running_mean", writeable=True),
                V.channel_vector(self.running_var, n, "running_var", writeable=True))

    def forward(self, x, out=None):
        x = self._check_input(x)
        if out is not None:
            # backward needs x as it was, so the module never writes over it.
            V.check_no_overlap(V.checked_output(out, x), x, "out", "x")
        weight, bias, running_mean, running_var = self._checked_state()
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            update = self.training and self.track_running_stats
            factor = 0.0
            if update:
                factor = (1.0 / (self.num_batches_tracked + 1) if self.momentum is None
                          else self.momentum)
            y, mean, invstd = F._batch_stats_forward(
                x, self.channels_last, weight, bias, self.eps, factor,
                running_mean if update else None, running_var, out, self._relu)
            if update:
                self.num_batches_tracked += 1
        else:
            y = F._eval_forward(x, running_mean, running_var, weight, bias, self.eps,
                                self.channels_last, out, self._relu)
            # Like autograd, keep the buffers themselves; invstd is derived in backward.
            mean, invstd = running_mean, running_var
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    __call__ = forward

    def backward(self, dy, out=None):
        """dx for the last forward; sets grad_weight and grad_bias (None without affine)."""
        if self._saved is None:
            raise RuntimeError("backward() called before forward(): there is nothing to "
                               "differentiate")
        x, mean, invstd, use_batch_stats = self._saved
        if not use_batch_stats:
            mean, invstd = mean.astype(np.float64), F.running_invstd(invstd, self.eps)
        dy = V.as_float_array(dy, "dy")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of the last forward input, {x.shape}, "
                             f"got {dy.shape}")
        if self._relu:
            # The ReLU mask is recomputed from x, the statistics, weight and bias.
            dx, grad_weight, grad_bias = F.batch_norm_relu_backward(
                dy, x, mean, invstd, self.weight, self.bias, training=use_batch_stats,
                channels_last=self.channels_last, out=out)
        else:
            dx, grad_weight, grad_bias = F.batch_norm_backward(
                dy, x, mean, invstd, self.weight, training=use_batch_stats,
                channels_last=self.channels_last, out=out)
        if self.affine:
            self.grad_weight, self.grad_bias = grad_weight, grad_bias
        return dx


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L); channels_last: (N, C) or (N, L, C)."""

    _ndims = (2, 3)
    _shape_doc = ("(N, C) or (N, C, L)", "(N, C) or (N, L, C)")


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W); channels_last: (N, H, W, C)."""

    _ndims = (4,)
    _shape_doc = ("(N, C, H, W)", "(N, H, W, C)")


class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W); channels_last: (N, D, H, W, C)."""

    _ndims = (5,)
    _shape_doc = ("(N, C, D, H, W)", "(N, D, H, W, C)")


class BNReLU1d(BatchNorm1d):
    """BatchNorm1d followed by ReLU, fused: the ReLU costs no pass of its own, and backward
    keeps nothing beyond what BatchNorm1d keeps (the mask is recomputed from x). Named after
    torch.ao.nn.intrinsic.BNReLU2d; equal to BatchNorm1d then torch.nn.ReLU."""

    _relu = True


class BNReLU2d(BatchNorm2d):
    """BatchNorm2d followed by ReLU, fused (see BNReLU1d)."""

    _relu = True


class BNReLU3d(BatchNorm3d):
    """BatchNorm3d followed by ReLU, fused (see BNReLU1d)."""

    _relu = True
