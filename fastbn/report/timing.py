"""Measurement primitives for the roofline report (``python -m fastbn``), reusable elsewhere.

A batch norm kernel is memory bound, so the yardstick is the machine's own memory bandwidth:
an op that must stream a tensor of B bytes P times cannot finish before P * B / bandwidth.
The pass counts are the minimum traffic of each op: training forward reads x twice (statistics,
then normalize) and writes y once; eval forward reads x and writes y; training backward reads
dy and x for the two reductions, then reads them again and writes dx.

The callables timed are in report/ops.py. Arrays are filled before timing (a fresh page faults on first touch, which would
be timed otherwise), and every callable is called once before its timing (which compiles the
kernel or loads it from Numba's disk cache).
"""

import importlib.metadata
import os
import platform
import sys
import time

import numpy as np

from .._validate import parameter_dtype, resolve_dtype
from .heap import minor_faults

PASSES = {"train_forward": 3, "eval_forward": 2, "backward": 5}
OPS = tuple(PASSES)
OP_TITLES = {"train_forward": "train fwd", "eval_forward": "eval fwd", "backward": "backward"}
LAYOUTS = ("NCHW", "NHWC")
# (batch, channels, *spatial); the last one is over 64 MB so that it runs out of cache.
DEFAULT_SHAPES = ((32, 64, 56, 56), (64, 256, 14, 14), (8, 3, 224, 224), (256, 512, 7, 7),
                  (128, 1024), (16, 32, 8, 32, 32), (2, 4, 8, 8), (64, 64, 112, 112))
EPS = 1e-5
MOMENTUM = 0.1
# 256 MiB per array is eight times a 32 MB L3, so the copy kernel streams from DRAM.
BANDWIDTH_BYTES = 256 << 20


# ----------------------------------------------------------------------------- machine

def package_version(name):
    """Installed version of a distribution, or None; never imports it (importing torch here
    would load its OpenMP runtime into the process that runs Numba's)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(default=32 << 20):
    """The largest CPU cache in bytes (Linux sysfs), or default where it cannot be read."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = [e for e in os.listdir(base) if e.startswith("index")]
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


def machine_info():
    """Cores, Numba threads and layer, and versions. Call after a parallel kernel has run:
    Numba only knows its threading layer once its pool has started."""
    import numba

    import fastbn

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        layer = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    # The load average says whether other work shared the cores while this ran.
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
        "numba_threads": numba.get_num_threads(), "threading_layer": layer,
        "load_average": load, "last_level_cache_bytes": last_level_cache_bytes(),
        "platform": platform.platform(), "python": platform.python_version(),
        "fastbn": fastbn.__version__, "numpy": np.__version__, "numba": numba.__version__,
        "torch": package_version("torch"),
    }


# ----------------------------------------------------------------------------- bandwidth

_stream_kernel = None


def _compiled_stream_kernel():
    # Built on first use, so importing this module never imports Numba (the torch worker
    # imports it too). A KernelPair, so the probe picks its twin by fastbn's own rule and runs
    # on the threads fastbn runs on, also when other work keeps the cores busy.
    global _stream_kernel
    if _stream_kernel is None:
        from numba import prange

        from ..kernels.jit import parallel_kernel

        def scale_shift_stream(x, a, b, y):
            # y = x*a + b rather than a plain copy: LLVM cannot turn it into a memcpy call,
            # so this is a loop of loads and stores like the batch norm kernels.
            for i in prange(x.size):
                y[i] = x[i] * a + b

        _stream_kernel = parallel_kernel(scale_shift_stream)
    return _stream_kernel


class BandwidthProbe:
    """Parallel read+write memory bandwidth: runs of y = x*a + b over n_bytes of float32 into
    a reused, pre-filled y of the same size.

    A shared machine's bandwidth drifts during a run, so the report takes samples before every
    shape and quotes the median of all of them, rather than trusting one burst at the start.
    Bytes counted are read + write (2 * n_bytes), as for the batch norm ops; the write-allocate
    read that a cached store also causes is not counted, in either.
    """

    def __init__(self, n_bytes=BANDWIDTH_BYTES):
        self._kernel = _compiled_stream_kernel()
        self._x = np.full(n_bytes // 4, 1.0, np.float32)
        self._y = np.full_like(self._x, 0.0)
        self._kernel.select(self._x.size)(self._x, np.float32(1.0), np.float32(0.0),
                                          self._y)  # compile, start the pool
        self.samples = []

    def sample(self, repeats):
        """Take repeats more samples; the bandwidth of these alone, in bytes/s."""
        a, b = np.float32(1.0), np.float32(0.0)
        taken = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._kernel.select(self._x.size)(self._x, a, b, self._y)
            taken.append(time.perf_counter() - start)
        self.samples.extend(taken)
        return 2 * self._x.nbytes / float(np.median(taken))

    def result(self):
        moved = 2 * self._x.nbytes
        return {"bytes_per_s": moved / float(np.median(self.samples)), "bytes_moved": moved,
                "samples_s": list(self.samples)}


def measure_bandwidth(n_bytes=BANDWIDTH_BYTES, repeats=9):
    """Bandwidth in bytes/s from ``repeats`` back-to-back samples (see BandwidthProbe)."""
    probe = BandwidthProbe(n_bytes)
    probe.sample(repeats)
    return probe.result()


# ----------------------------------------------------------------------------- timing

def _fastest_of(fn, calls):
    # The batch size comes from the fastest of a few calls: one call that happened to wait for
    # the scheduler would otherwise make every sample a single, timer-resolution-sized call.
    fastest = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def time_op(fn, budget_s=0.5, min_repeats=3, max_repeats=50, min_sample_s=1e-3, warmup=True):
    """Time fn() with time.perf_counter: a dict with the median and every sample in seconds.

    One warm-up call first (compilation, page faults). Calls shorter than min_sample_s (by the
    fastest of three) are batched ``number`` at a time so a sample is not dominated by timer
    resolution; the number of samples fits budget_s, clamped to [min_repeats, max_repeats].
    ``faults_per_call`` is the page faults the timed calls took, per call (see report/heap.py).
    """
    if warmup:
        fn()
    first = _fastest_of(fn, 3)
    number = 1 if first >= min_sample_s else int(min(1000, np.ceil(min_sample_s / first)))
    repeats = int(np.clip(budget_s / (first * number), min_repeats, max_repeats))
    samples = []
    faults_before = minor_faults()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    faults = None if faults_before is None else (minor_faults() - faults_before)
    return {"median_s": float(np.median(samples)), "samples_s": samples, "number": number,
            "faults_per_call": None if faults is None else faults / (repeats * number)}


def time_interleaved(fns, budget_s=0.5, min_repeats=3, max_repeats=50, min_sample_s=1e-3):
    """time_op for several callables at once, {name: result}, their samples taken in turn
    (A, B, A, B, ...) so that drift in the machine's speed lands on all of them alike. Their
    ratio is then as steady as this machine allows, where two back-to-back runs are not."""
    numbers = {}
    for name, fn in fns.items():
        fn()
        first = _fastest_of(fn, 3)
        numbers[name] = (1 if first >= min_sample_s
                         else int(min(1000, np.ceil(min_sample_s / first))), first)
    round_s = sum(number * first for number, first in numbers.values())
    repeats = int(np.clip(budget_s / round_s, min_repeats, max_repeats))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            number = numbers[name][0]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: {"median_s": float(np.median(samples[name])), "samples_s": samples[name],
                   "number": numbers[name][0]} for name in fns}


def roofline_fraction(passes, n_bytes, bytes_per_s, seconds):
    """Fraction of the bandwidth bound reached: (P * B / bandwidth) / time."""
    return passes * n_bytes / bytes_per_s / seconds


# ----------------------------------------------------------------------------- inputs

def layout_shape(shape, layout):
    """The array shape of an (N, C, *spatial) problem in layout NCHW or NHWC."""
    shape = tuple(shape)
    if layout == "NHWC" and len(shape) > 2:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


def reduce_axes(ndim, layout):
    if layout == "NHWC":
        return tuple(range(ndim - 1))
    return (0,) + tuple(range(2, ndim))


def make_problem(shape, dtype=np.float32, seed=0):
    """Filled inputs of one (N, C, *spatial) problem in both layouts: the NHWC arrays hold the
    same values as the NCHW ones, so both layouts normalize the same data."""
    rng = np.random.default_rng(seed)
    dtype = resolve_dtype(dtype)
    n_channels = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    if dtype.itemsize == 2:
        # float16 and bfloat16: scaled in float32 and rounded once (ml_dtypes' arithmetic on
        # bfloat16 arrays is slow), then dy = x * 0.25 exactly (a power of two).
        x *= 2.0
        x += 0.5
        x = x.astype(dtype)
        dy = (x[::-1].astype(np.float32) * 0.25).astype(dtype)
    else:
        x = x.astype(dtype, copy=False)
        x *= 2.0
        x += 0.5
        # dy from x by a cheap map: a second random draw costs a second on the largest shape.
        dy = x[::-1].copy()
        dy *= 0.25
    # 16-bit inputs come with float32 parameters and buffers (torch's mixed precision).
    param_dtype = parameter_dtype(dtype)
    params = {
        "weight": rng.uniform(0.5, 1.5, n_channels).astype(param_dtype),
        "bias": rng.uniform(-0.5, 0.5, n_channels).astype(param_dtype),
        "running_mean": rng.uniform(-0.1, 0.1, n_channels).astype(param_dtype),
        "running_var": rng.uniform(0.5, 2.0, n_channels).astype(param_dtype),
    }
    problem = {}
    for layout in LAYOUTS:
        if layout == "NHWC" and x.ndim > 2:
            xl, dyl = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
        else:
            xl, dyl = x, dy
        problem[layout] = dict(params, x=xl, dy=dyl)
    return problem


def shape_label(shape):
    return "x".join(str(d) for d in shape)


def parse_shape(text):
    """'32x64x56x56' (or '32,64,56,56') -> (32, 64, 56, 56)."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts if p)
    except ValueError:
        raise ValueError(f"cannot read shape {text!r}; write it like 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape {text!r} needs (batch, channels, *spatial), all positive")
    if shape[0] * int(np.prod(shape[2:], dtype=np.int64)) < 2:
        raise ValueError(f"shape {text!r} has one value per channel: training needs more")
    return shape


def stderr_is_terminal():
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
