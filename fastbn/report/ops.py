"""The callables the report times, one per op, over the arrays of ``timing.make_problem``.

fastbn is timed two ways: module calls that allocate their output, as users call them
(``module_ops``, compared with torch's module calls in report/torch_peer.py), and functional
calls into preallocated ``out=`` buffers (``fastbn_ops``, compared with the one-pass bound of
report/bound.py on the same buffers). ``numpy_ops`` is the plain NumPy reference.
"""

import numpy as np

from .timing import EPS, MOMENTUM, reduce_axes


def fastbn_ops(arrays, layout, y=None, dx=None):
    """{op: zero-argument callable} over fastbn's functional API with out= buffers (y for the
    forwards, dx for the backward; new ones unless given).

    Backward is timed on the statistics of a training forward, as training does.
    """
    import fastbn

    x, dy, w, b = arrays["x"], arrays["dy"], arrays["weight"], arrays["bias"]
    channels_last = layout == "NHWC"
    running_mean, running_var = arrays["running_mean"].copy(), arrays["running_var"].copy()
    y = np.zeros_like(x) if y is None else y
    dx = np.zeros_like(x) if dx is None else dx
    _, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, w, b, EPS, channels_last=channels_last, out=y)

    def train_forward():
        fastbn.batch_norm_forward(x, w, b, EPS, running_mean=running_mean,
                                  running_var=running_var, momentum=MOMENTUM,
                                  channels_last=channels_last, out=y)

    def eval_forward():
        fastbn.batch_norm(x, arrays["running_mean"], arrays["running_var"], w, b, False,
                          MOMENTUM, EPS, channels_last=channels_last, out=y)

    def backward():
        fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, w, training=True,
                                   channels_last=channels_last, out=dx)

    return {"train_forward": train_forward, "eval_forward": eval_forward, "backward": backward}


def module_ops(arrays, layout):
    """{op: callable} over fastbn's modules, called as users call them: each call allocates its
    output (and the backward its gradients). backward differentiates a training forward."""
    import fastbn

    x, dy = arrays["x"], arrays["dy"]
    module_class = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                    5: fastbn.BatchNorm3d}[x.ndim]
    channels_last = layout == "NHWC" and x.ndim > 2
    n_channels = arrays["weight"].size
    modules = []
    for _ in range(3):
        module = module_class(n_channels, eps=EPS, momentum=MOMENTUM,
                              channels_last=channels_last, dtype=x.dtype)
        module.load_state_dict({"weight": arrays["weight"], "bias": arrays["bias"],
                                "running_mean": arrays["running_mean"],
                                "running_var": arrays["running_var"],
                                "num_batches_tracked": np.int64(0)})
        modules.append(module)
    train, inference, differentiated = modules
    inference.eval()
    differentiated(x)

    return {"train_forward": lambda: train(x), "eval_forward": lambda: inference(x),
            "backward": lambda: differentiated.backward(dy)}


def numpy_ops(arrays, layout):
    """{op: callable}: the straightforward vectorized NumPy batch norm the speedups are quoted
    against, at the input dtype, allocating its results as NumPy code does."""
    x, dy = arrays["x"], arrays["dy"]
    axes = reduce_axes(x.ndim, layout)
    count = x.size // x.shape[1 if layout == "NCHW" else -1]
    bshape = [1] * x.ndim
    bshape[1 if layout == "NCHW" else -1] = -1
    w, b = arrays["weight"].reshape(bshape), arrays["bias"].reshape(bshape)
    rm_b = arrays["running_mean"].reshape(bshape)
    rv_b = arrays["running_var"].reshape(bshape)
    running_mean, running_var = arrays["running_mean"].copy(), arrays["running_var"].copy()

    def forward_stats():
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        return mean, var, 1.0 / np.sqrt(var + x.dtype.type(EPS))

    def train_forward():
        mean, var, invstd = forward_stats()
        running_mean[...] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.ravel()
        running_var[...] = ((1 - MOMENTUM) * running_var
                            + MOMENTUM * var.ravel() * count / (count - 1))
        return (x - mean) * invstd * w + b

    def eval_forward():
        return (x - rm_b) / np.sqrt(rv_b + x.dtype.type(EPS)) * w + b

    mean, _, invstd = forward_stats()

    def backward():
        xhat = (x - mean) * invstd
        grad_bias = dy.sum(axis=axes, keepdims=True)
        grad_weight = (dy * xhat).sum(axis=axes, keepdims=True)
        dx = (w * invstd / count) * (count * dy - grad_bias - xhat * grad_weight)
        return dx, grad_weight.ravel(), grad_bias.ravel()

    return {"train_forward": train_forward, "eval_forward": eval_forward, "backward": backward}
