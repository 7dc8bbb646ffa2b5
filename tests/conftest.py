"""Shared cases for the core suite: dtypes, layouts, shapes by rank, and seeded inputs.

Shapes are written channels-first, (N, C, *spatial); ``physical_shape`` turns one into the
channels-last (N, *spatial, C) shape. The cases are small on purpose (Numba compiles each kernel
per dtype on first use, so reusing two dtypes and few array kinds keeps a cold run short); the
LARGE_* shapes are at least 32768 elements so that the parallel kernel twins run too.
"""

import sys
import zlib

import numpy as np
import pytest

import fastbn

DTYPES = [np.float32, np.float64]
LAYOUTS = [False, True]  # channels_last

# Odd sizes, C = 1, and N = 1 with more than one spatial value, for each rank 2..5.
SHAPES_BY_RANK = {
    2: [(5, 3), (6, 1)],
    3: [(3, 5, 7), (1, 4, 9), (4, 1, 3)],
    4: [(3, 5, 7, 11), (2, 1, 3, 4), (1, 3, 2, 5)],
    5: [(2, 3, 2, 3, 4), (1, 2, 3, 1, 5)],
}
SHAPES = [shape for shapes in SHAPES_BY_RANK.values() for shape in shapes]

# At least 32768 elements, so that the parallel twins run: short planes with few and with many
# channels, channels-last with an odd C, a plain (N, C) matrix, and (2, 3, 130, 130), whose
# planes are long enough (>= 16384 values) for the long-plane kernels.
LARGE_SHAPES = [(4, 3, 64, 48), (8, 16, 16, 17), (16, 5, 21, 20), (2048, 17), (2, 3, 130, 130)]

MODULE_FOR_RANK = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                   5: fastbn.BatchNorm3d}


def layout_id(channels_last):
    return "channels_last" if channels_last else "channels_first"


def dtype_id(dtype):
    return np.dtype(dtype).name


def shape_id(shape):
    return "x".join(map(str, shape))


def physical_shape(shape, channels_last):
    """The array shape for channels-first shape ``shape`` in the given layout."""
    if channels_last and len(shape) > 2:
        return (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return tuple(shape)


def seeded_rng(*key):
    """A generator seeded from a readable key, so every test draws fixed data."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_input(rng, shape, dtype, channels_last=False):
    """Per-channel offset and spread (so per-channel statistics matter), in layout order."""
    n_channels = shape[1]
    loc = rng.uniform(-3.0, 3.0, n_channels)
    spread = rng.uniform(0.5, 2.0, n_channels)
    x = rng.standard_normal(shape) * spread.reshape((1, -1) + (1,) * (len(shape) - 2))
    x += loc.reshape((1, -1) + (1,) * (len(shape) - 2))
    if channels_last and len(shape) > 2:
        x = np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(x, dtype=dtype)


def make_params(rng, n_channels, dtype):
    """Random weight (both signs, away from 0) and bias."""
    weight = rng.uniform(0.5, 1.5, n_channels) * rng.choice([-1.0, 1.0], n_channels)
    bias = rng.uniform(-1.0, 1.0, n_channels)
    return weight.astype(dtype), bias.astype(dtype)


def make_running(rng, n_channels, dtype):
    """Plausible running statistics: any mean, a positive variance."""
    mean = rng.uniform(-2.0, 2.0, n_channels)
    var = rng.uniform(0.25, 4.0, n_channels)
    return mean.astype(dtype), var.astype(dtype)


def kinked_input(rng, shape, dtype, channels_last=False, center=None):
    """(x, center, spread): values of channel c lie in center + spread * [k + 0.2, k + 0.8] for
    integers k in [-4, 4), so no value is within 0.2 * spread of center + spread * j for any
    integer j. Samples come in mirrored pairs (N must be even), so each channel's mean is its
    center up to rounding. A ReLU kink placed in such a gap (see kink_bias) is far from every
    value: the float64 reference's mask is then the only right one."""
    assert shape[0] % 2 == 0, "kinked_input mirrors samples in pairs"
    n_channels = shape[1]
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    if center is None:
        center = rng.uniform(-3.0, 3.0, n_channels)
    spread = rng.uniform(0.5, 2.0, n_channels)
    half = (shape[0] // 2,) + tuple(shape[1:])
    v = rng.integers(-4, 4, half) + 0.5 + rng.uniform(-0.3, 0.3, half)
    x = (np.asarray(center, np.float64).reshape(per_channel)
         + spread.reshape(per_channel) * np.concatenate([v, -v]))
    if channels_last and len(shape) > 2:
        x = np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(x, dtype=dtype), np.asarray(center, np.float64), spread


def kink_bias(rng, weight, mean, invstd, center, spread, dtype):
    """A bias that puts the kink of relu((x - mean) * invstd * weight + bias) at
    center + spread * j for a random integer j per channel: in a gap of kinked_input."""
    n_channels = len(center)
    weight = np.ones(n_channels) if weight is None else np.asarray(weight, np.float64)
    target = center + spread * rng.integers(-2, 3, n_channels)
    return (-weight * np.asarray(invstd, np.float64) * (target - mean)).astype(dtype)


def kinked_step(rng, module, shape, dtype, channels_last):
    """(x, dy) for one step of a BNReLU module, with the kink in a gap of x: the bias is set
    for the statistics this step normalizes with (batch ones, or the running ones in eval);
    without affine the kink is the mean itself, so x is centred on the running mean in eval.
    Returns the bias set, or None."""
    use_batch = module.training or not module.track_running_stats
    center = None if use_batch else np.asarray(module.running_mean, np.float64)
    x, center, spread = kinked_input(rng, shape, dtype, channels_last, center)
    dy = make_input(rng, shape, dtype, channels_last)
    if not module.affine:
        return x, dy, None
    if use_batch:
        axes = (0,) + tuple(range(2, len(shape)))
        x_cf = np.moveaxis(x, -1, 1) if channels_last and x.ndim > 2 else x
        mean = x_cf.astype(np.float64).mean(axis=axes)
        var = x_cf.astype(np.float64).var(axis=axes)
    else:
        mean, var = module.running_mean, module.running_var
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + module.eps)
    module.bias[...] = kink_bias(rng, module.weight, mean, invstd, center, spread, dtype)
    return x, dy, module.bias.copy()


MEMORY_KINDS = ["contiguous", "strided", "fortran", "readonly"]


def in_memory(x, kind):
    """x with the same values but another memory arrangement."""
    if kind == "contiguous":
        return np.ascontiguousarray(x)
    if kind == "strided":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        view = wide[..., ::2]
        view[...] = x
        assert not view.flags.c_contiguous
        return view
    if kind == "fortran":
        f = np.asfortranarray(x)
        assert f.flags.f_contiguous
        return f
    if kind == "readonly":
        r = np.array(x)
        r.setflags(write=False)
        return r
    raise ValueError(kind)


@pytest.fixture(autouse=True)
def fastbn_torch_kernels_for_every_size(monkeypatch):
    """The suites check fastbn's kernels on small tensors, on channels-last tensors of many
    channels and in eval mode, which the bridge would otherwise hand to torch's own kernel
    (fastbn.torch.functional.KERNEL_MIN_ELEMENTS, TORCH_CHANNELS_LAST_MIN_CHANNELS,
    TORCH_RUNNING_STATS); only the tests of that routing restore them. Nothing is imported
    here: without torch this does nothing."""
    bridge = sys.modules.get("fastbn.torch.functional")
    if bridge is not None:
        monkeypatch.setattr(bridge, "KERNEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(bridge, "TORCH_CHANNELS_LAST_MIN_CHANNELS", None)
        monkeypatch.setattr(bridge, "TORCH_RUNNING_STATS", False)


@pytest.fixture(params=DTYPES, ids=dtype_id)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(params=LAYOUTS, ids=layout_id)
def channels_last(request):
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fixed data per test, different across tests."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def parallel_twins_regardless_of_load(monkeypatch):
    """Tests that force the parallel twins must get them even when other work keeps this
    shared machine's cores busy (which would otherwise send calls to the serial twins; see
    fastbn.kernels.jit.free_cores). tests/test_load_policy.py tests that choice itself."""
    import fastbn.kernels.jit

    monkeypatch.setattr(fastbn.kernels.jit, "free_cores", lambda: None)
