"""Fused BatchNorm + ReLU against batch norm followed by a separate ReLU pass.

Not an asv benchmark: asv times each op in its own process, while the ratios below need A and
B interleaved in one run on this noisy machine. Run it as

    python benchmarks/relu_step.py                      # (64,64,112,112) float32, both layouts
    python benchmarks/relu_step.py --shape 32x64x56x56 --repeat 31
    python benchmarks/relu_step.py --forward-only --repeat 101   # the forward pair alone

For each layout it interleaves, repetition by repetition (swapping which goes first):
- forward: batch_norm_relu_forward vs batch_norm_forward alone (the fused ReLU's cost);
- a training step: batch_norm_relu_forward + batch_norm_relu_backward vs batch_norm_forward
  + a separate ReLU pass + a separate mask pass + batch_norm_backward (benchmarks.common's
  Numba passes, in place: the fastest a separate pass gets).
It prints the median times and the medians of the per-repetition ratios.
"""

import argparse
import os
import sys
import time

import numpy as np


def measure(shape_label, layout, dtype, repeat, forward_only=False):
    # Imported here, not at the top: asv imports every module of benchmarks/ to find suites.
    import fastbn
    from benchmarks.common import make_arrays, relu_passes

    a = make_arrays(shape_label, layout, dtype)
    x, dy, w, b = a["x"], a["dy"], a["weight"], a["bias"]
    cl = layout == "NHWC"
    y = np.zeros_like(x)
    dz = np.zeros_like(x)
    dx = np.zeros_like(x)
    relu_inplace, relu_mask_inplace = relu_passes()
    flat = y.reshape(-1), dz.reshape(-1)

    def bn_forward():
        fastbn.batch_norm_forward(x, w, b, channels_last=cl, out=y)

    def fused_forward():
        fastbn.batch_norm_relu_forward(x, w, b, channels_last=cl, out=y)

    def fused_step():
        _, mean, invstd = fastbn.batch_norm_relu_forward(x, w, b, channels_last=cl, out=y)
        fastbn.batch_norm_relu_backward(dy, x, mean, invstd, w, b, channels_last=cl, out=dx)

    def separate_step():
        _, mean, invstd = fastbn.batch_norm_forward(x, w, b, channels_last=cl, out=y)
        relu_inplace(flat[0])
        dz[...] = dy  # the incoming gradient; copied outside the timing below
        relu_mask_inplace(flat[1], flat[0])
        fastbn.batch_norm_backward(dz, x, mean, invstd, w, channels_last=cl, out=dx)

    def timed_separate_step():
        # dz is refilled before the clock starts: the mask pass works in place on it.
        dz[...] = dy
        t0 = time.perf_counter()
        _, mean, invstd = fastbn.batch_norm_forward(x, w, b, channels_last=cl, out=y)
        relu_inplace(flat[0])
        relu_mask_inplace(flat[1], flat[0])
        fastbn.batch_norm_backward(dz, x, mean, invstd, w, channels_last=cl, out=dx)
        return time.perf_counter() - t0

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for fn in (bn_forward, fused_forward, fused_step, separate_step):
        fn()  # compile or load, and touch every page
    if forward_only:
        ratios = []
        for i in range(repeat):
            pair = (bn_forward, fused_forward) if i % 2 == 0 else (fused_forward, bn_forward)
            took = {fn: timed(fn) for fn in pair}
            ratios.append(took[fused_forward] / took[bn_forward])
        q1, median, q3 = np.percentile(ratios, [25, 50, 75])
        print(f"{shape_label} {layout} {dtype}: fused forward / batch norm forward, median "
              f"{median:.3f} (quartiles {q1:.3f}-{q3:.3f}) over {repeat} (target <= 1)",
              flush=True)
        return median, None
    times = {k: [] for k in ("bn_fwd", "fused_fwd", "fused_step", "separate_step")}
    for i in range(repeat):
        # A before B in even repetitions, B before A in odd ones: neither always runs second
        # (on a cache or frequency state the other left behind).
        if i % 2 == 0:
            times["bn_fwd"].append(timed(bn_forward))
            times["fused_fwd"].append(timed(fused_forward))
            times["fused_step"].append(timed(fused_step))
            times["separate_step"].append(timed_separate_step())
        else:
            times["fused_fwd"].append(timed(fused_forward))
            times["bn_fwd"].append(timed(bn_forward))
            times["separate_step"].append(timed_separate_step())
            times["fused_step"].append(timed(fused_step))
    t = {k: np.array(v) for k, v in times.items()}
    med = {k: np.median(v) * 1e3 for k, v in t.items()}
    fwd_ratio = np.median(t["fused_fwd"] / t["bn_fwd"])
    step_ratio = np.median(t["fused_step"] / t["separate_step"])
    print(f"{shape_label} {layout} {dtype}: forward fused {med['fused_fwd']:.1f} ms vs batch "
          f"norm alone {med['bn_fwd']:.1f} ms, ratio {fwd_ratio:.3f} (target <= 1); step fused "
          f"{med['fused_step']:.1f} ms vs separate ReLU {med['separate_step']:.1f} ms, ratio "
          f"{step_ratio:.3f} (target <= 0.75)", flush=True)
    return fwd_ratio, step_ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x64x112x112")
    parser.add_argument("--layout", choices=["NCHW", "NHWC", "both"], default="both")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--forward-only", action="store_true",
                        help="only the forward pair, for many cheap repetitions")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numba

    layouts = ["NCHW", "NHWC"] if args.layout == "both" else [args.layout]
    print(f"numba threads {numba.get_num_threads()}, (N, C, *spatial) {args.shape}")
    for layout in layouts:
        measure(args.shape, layout, args.dtype, args.repeat, args.forward_only)


if __name__ == "__main__":
    main()
