"""16-bit storage against float32: the time of a bfloat16 (or float16) call over a float32 one.

Not an asv benchmark: asv times each dtype in its own process, while the ratios below need the
dtypes interleaved in one run on this noisy machine. Run it as

    python benchmarks/lowp_ratio.py                        # (64,64,112,112), both layouts
    python benchmarks/lowp_ratio.py --dtypes bfloat16 float16 --repeat 21

For each layout it fills float32 inputs and their 16-bit copies (same values, rounded), then
times the training forward and the training backward (functional calls into preallocated
buffers, so allocation stays out) of every dtype in turn, repetition by repetition, rotating
which dtype goes first. It prints median times and the medians of the per-repetition ratios
time(16-bit) / time(float32); issue 13's target for bfloat16 is <= 0.6 for both.
"""

import argparse
import os
import sys
import time

import numpy as np


def measure(shape_label, layout, dtypes, repeat):
    # Imported here, not at the top: asv imports every module of benchmarks/ to find suites.
    import fastbn
    from benchmarks.common import make_arrays, numpy_dtype

    base = make_arrays(shape_label, layout, "float32")
    cl = layout == "NHWC"
    cases = {}
    for name in ("float32",) + tuple(dtypes):
        dtype = numpy_dtype(name)
        x = base["x"] if name == "float32" else base["x"].astype(dtype)
        dy = base["dy"] if name == "float32" else base["dy"].astype(dtype)
        y, dx = np.zeros_like(x), np.zeros_like(x)
        _, mean, invstd = fastbn.batch_norm_forward(x, base["weight"], base["bias"],
                                                    channels_last=cl, out=y)
        fastbn.batch_norm_backward(dy, x, mean, invstd, base["weight"], channels_last=cl,
                                   out=dx)  # compile or load, and touch every page
        cases[name] = (x, dy, y, dx, mean, invstd)

    def forward(name):
        x, _, y, _, _, _ = cases[name]
        t0 = time.perf_counter()
        fastbn.batch_norm_forward(x, base["weight"], base["bias"], channels_last=cl, out=y)
        return time.perf_counter() - t0

    def backward(name):
        x, dy, _, dx, mean, invstd = cases[name]
        t0 = time.perf_counter()
        fastbn.batch_norm_backward(dy, x, mean, invstd, base["weight"], channels_last=cl,
                                   out=dx)
        return time.perf_counter() - t0

    names = list(cases)
    times = {(op, name): [] for op in ("forward", "backward") for name in names}
    for i in range(repeat):
        order = names[i % len(names):] + names[:i % len(names)]
        for op, fn in (("forward", forward), ("backward", backward)):
            for name in order:
                times[op, name].append(fn(name))
    results = {}
    for op in ("forward", "backward"):
        f32 = np.array(times[op, "float32"])
        line = [f"{shape_label} {layout} training {op}: float32 {np.median(f32) * 1e3:.1f} ms"]
        for name in dtypes:
            t = np.array(times[op, name])
            ratio = np.median(t / f32)
            q1, q3 = np.percentile(t / f32, [25, 75])
            results[op, name] = ratio
            line.append(f"{name} {np.median(t) * 1e3:.1f} ms, ratio {ratio:.3f} "
                        f"(quartiles {q1:.3f}-{q3:.3f})")
        print("; ".join(line), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64x64x112x112", help="(N, C, *spatial) as NxCxHxW")
    parser.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"],
                        choices=["bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    import numba

    print(f"{numba.get_num_threads()} Numba threads, load average "
          f"{os.getloadavg()[0]:.2f} at the start", flush=True)
    for layout in args.layouts:
        measure(args.shape, layout, args.dtypes, args.repeat)
    print(f"load average {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
