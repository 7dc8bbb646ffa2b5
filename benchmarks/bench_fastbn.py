"""fastbn's own suites: op timings, a module training step's peak memory, first-call latency."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import fastbn

from .common import (EPS, LAYOUTS, MOMENTUM, PARAM_NAMES, PARAMS, SMOKE, make_arrays,
                     parse_shape, relu_passes, require_dtype_support)


class BatchNormOps:
    """The functional API with preallocated out= buffers, so allocation stays out of the
    timings. Backward uses the statistics of a training forward, as training does."""

    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, layout, dtype):
        require_dtype_support(fastbn, dtype)
        a = make_arrays(shape, layout, dtype)
        self.x, self.dy, self.w, self.b = a["x"], a["dy"], a["weight"], a["bias"]
        self.rm, self.rv = a["running_mean"], a["running_var"]
        self.channels_last = layout == "NHWC"
        self.y = np.zeros_like(self.x)
        self.dx = np.zeros_like(self.x)
        _, self.save_mean, self.save_invstd = fastbn.batch_norm_forward(
            self.x, self.w, self.b, EPS, channels_last=self.channels_last, out=self.y)
        # One call of each kernel: compilation (or the disk-cache load) happens here.
        self.time_train_forward(shape, layout, dtype)
        self.time_eval_forward(shape, layout, dtype)
        self.time_backward(shape, layout, dtype)

    def time_train_forward(self, shape, layout, dtype):
        fastbn.batch_norm_forward(self.x, self.w, self.b, EPS, running_mean=self.rm,
                                  running_var=self.rv, momentum=MOMENTUM,
                                  channels_last=self.channels_last, out=self.y)

    def time_eval_forward(self, shape, layout, dtype):
        fastbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, False, MOMENTUM, EPS,
                          channels_last=self.channels_last, out=self.y)

    def time_backward(self, shape, layout, dtype):
        fastbn.batch_norm_backward(self.dy, self.x, self.save_mean, self.save_invstd, self.w,
                                   training=True, channels_last=self.channels_last, out=self.dx)


class BNReLUOps:
    """Fused BatchNorm + ReLU (forward and backward), and the separate ReLU passes that the
    fusion saves (common.relu_passes), so that a step of each can be added up from these:
    fused = time_fused_forward + time_fused_backward; separate = BatchNormOps's
    time_train_forward + time_backward + time_separate_relu_passes. The interleaved ratio on
    the out-of-cache tensor is benchmarks/relu_step.py's."""

    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, layout, dtype):
        require_dtype_support(fastbn, dtype)
        a = make_arrays(shape, layout, dtype)
        self.x, self.dy, self.w, self.b = a["x"], a["dy"], a["weight"], a["bias"]
        self.channels_last = layout == "NHWC"
        self.y = np.zeros_like(self.x)
        self.dz = self.dy.copy()
        self.dx = np.zeros_like(self.x)
        _, self.save_mean, self.save_invstd = fastbn.batch_norm_relu_forward(
            self.x, self.w, self.b, EPS, channels_last=self.channels_last, out=self.y)
        bits = self.x.dtype.itemsize == 2  # float16, bfloat16: the passes work on the bits
        self.relu_inplace, self.relu_mask_inplace = relu_passes(bits)
        self.flat_y, self.flat_dz = (a.reshape(-1).view(np.uint16) if bits else a.reshape(-1)
                                     for a in (self.y, self.dz))
        self.time_fused_forward(shape, layout, dtype)
        self.time_fused_backward(shape, layout, dtype)
        self.time_separate_relu_passes(shape, layout, dtype)

    def time_fused_forward(self, shape, layout, dtype):
        fastbn.batch_norm_relu_forward(self.x, self.w, self.b, EPS,
                                       channels_last=self.channels_last, out=self.y)

    def time_fused_backward(self, shape, layout, dtype):
        fastbn.batch_norm_relu_backward(self.dy, self.x, self.save_mean, self.save_invstd,
                                        self.w, self.b, channels_last=self.channels_last,
                                        out=self.dx)

    def time_separate_relu_passes(self, shape, layout, dtype):
        # y already holds ReLU output after the first call, so the forward pass rewrites the
        # same values; dz is masked in place, as often as asv repeats (idempotent too).
        self.relu_inplace(self.flat_y)
        self.relu_mask_inplace(self.flat_dz, self.flat_y)


_MODULES = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
            5: fastbn.BatchNorm3d}


class ModuleTrainingStep:
    """Peak memory of a BatchNorm module's forward + backward as user code writes it, letting
    the module allocate y and dx. The figure is the process's peak RSS, inputs included."""

    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, layout, dtype):
        require_dtype_support(fastbn, dtype)
        a = make_arrays(shape, layout, dtype)
        self.x, self.dy = a["x"], a["dy"]
        module_class = _MODULES[len(parse_shape(shape))]
        self.module = module_class(self.x.shape[-1 if layout == "NHWC" else 1],
                                   channels_last=layout == "NHWC", dtype=self.x.dtype)
        self.module.train()

    def peakmem_training_step(self, shape, layout, dtype):
        self.module.forward(self.x)
        self.module.backward(self.dy)


# Runs in a fresh interpreter: times the first call of each op, which compiles the kernels
# (cold cache) or loads them from NUMBA_CACHE_DIR (warm cache). The ops run in the order of
# training (forward, backward) and then eval, so eval's number excludes the helpers the
# others already compiled.
_FIRST_CALL_SCRIPT = r"""
import json, sys, time
import numpy as np
shape, channels_last = tuple(json.loads(sys.argv[1])), sys.argv[2] == "NHWC"
import fastbn
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
n_channels = shape[-1] if channels_last else shape[1]
rm, rv = np.zeros(n_channels, np.float32), np.ones(n_channels, np.float32)
seconds = {}
start = time.perf_counter()
y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv,
                                            channels_last=channels_last)
seconds["train_forward"] = time.perf_counter() - start
start = time.perf_counter()
fastbn.batch_norm_backward(x, x, mean, invstd, channels_last=channels_last)
seconds["backward"] = time.perf_counter() - start
start = time.perf_counter()
fastbn.batch_norm(x, rm, rv, training=False, channels_last=channels_last)
seconds["eval_forward"] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def _first_call_seconds(layout, cache_dir):
    # (8, 64, 28, 28): large enough for the parallel kernels, small enough to fill at once.
    shape = (8, 28, 28, 64) if layout == "NHWC" else (8, 64, 28, 28)
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_SCRIPT, json.dumps(shape), layout],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


class FirstCallLatency:
    """Seconds from first call to result in a fresh process: 'cold' compiles into an empty
    NUMBA_CACHE_DIR, 'warm' is the next process, which loads what 'cold' cached."""

    # A cold start compiles for 5-30 s, so the smoke run checks one layout only.
    params = [["train_forward", "eval_forward", "backward"], LAYOUTS[:1] if SMOKE else LAYOUTS,
              ["cold", "warm"]]
    param_names = ["op", "layout", "cache"]
    unit = "seconds"
    timeout = 600

    def setup_cache(self):
        # Two interpreters per layout serve all twelve results; each compiles a handful of
        # kernels, so this costs tens of seconds once.
        latencies = {}
        for layout in self.params[1]:
            cache_dir = tempfile.mkdtemp(prefix="fastbn-numba-cache-")
            try:
                latencies[layout, "cold"] = _first_call_seconds(layout, cache_dir)
                latencies[layout, "warm"] = _first_call_seconds(layout, cache_dir)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
        return latencies

    def track_first_call(self, latencies, op, layout, cache):
        return latencies[layout, cache][op]
