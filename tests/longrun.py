"""Long run: 10,000 training steps (forward + backward) of BatchNorm2d at (32, 64, 28, 28).

Checks that resident memory grows by less than 5 MB after warm-up, and that the running
statistics equal those of a float64 reference run over the same batches within 1e-5: absolute
error for running_mean, relative error for running_var (whose float32 buffer has an ulp of 7.6e-6
at the largest variances here, ~64).

    python tests/longrun.py [--steps 10000] [--layout both|channels_first|channels_last]

The batches are exact in float32 and their float64 statistics are known without touching the
data again: each step scales one of a few base batches by a power of two and a sign (exact in
float32), so the batch mean scales by the same factor and the variance by its square. The
reference run therefore costs O(C) per step, and the script spends its time in fastbn. Exit
status 0 means both limits held; the slow test in test_concurrency.py runs this.
"""

import argparse
import os
import sys
import time

import numpy as np

import fastbn

SHAPE = (32, 64, 28, 28)
N_BASES = 8
SCALES = [sign * 2.0**e for e in (-2, -1, 0, 1, 2) for sign in (1.0, -1.0)]
RSS_LIMIT_MB = 5.0
STAT_TOLERANCE = 1e-5


def resident_mb():
    """Current resident set size in MB (Linux /proc; falls back to peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(steps=10_000, channels_last=False, warmup=200, momentum=0.1, seed=0, report=print):
    rng = np.random.default_rng([seed, channels_last])
    n_channels = SHAPE[1]
    physical = (SHAPE[0],) + SHAPE[2:] + (SHAPE[1],) if channels_last else SHAPE
    channel_axis = len(physical) - 1 if channels_last else 1
    axes = tuple(a for a in range(len(physical)) if a != channel_axis)

    # Base batches with per-channel means and spreads, and their float64 statistics.
    bases, base_means, base_vars = [], [], []
    shape = [1] * len(physical)
    shape[channel_axis] = n_channels
    for _ in range(N_BASES):
        mean = rng.uniform(-3, 3, n_channels).reshape(shape)
        std = rng.uniform(0.1, 4, n_channels).reshape(shape)
        base = (rng.standard_normal(physical) * std + mean).astype(np.float32)
        base64 = base.astype(np.float64)
        base_means.append(base64.mean(axis=axes))
        base_vars.append(base64.var(axis=axes, ddof=1))
        bases.append(base)
    dys = [rng.standard_normal(physical).astype(np.float32) for _ in range(4)]
    schedule = rng.integers(0, N_BASES, steps), rng.integers(0, len(SCALES), steps)

    bn = fastbn.BatchNorm2d(n_channels, momentum=momentum, channels_last=channels_last)
    ref_mean = np.zeros(n_channels)
    ref_var = np.ones(n_channels)
    x = np.empty(physical, np.float32)
    y = np.empty(physical, np.float32)
    dx = np.empty(physical, np.float32)

    rss_after_warmup = None
    start = time.perf_counter()
    for step in range(steps):
        k, s = schedule[0][step], schedule[1][step]
        np.multiply(bases[k], np.float32(SCALES[s]), out=x)  # exact: a power of two and a sign
        bn.forward(x, out=y)
        bn.backward(dys[step % len(dys)], out=dx)
        ref_mean = (1 - momentum) * ref_mean + momentum * (SCALES[s] * base_means[k])
        ref_var = (1 - momentum) * ref_var + momentum * (SCALES[s] ** 2 * base_vars[k])
        if step + 1 == warmup:
            rss_after_warmup = resident_mb()
            warm_time = time.perf_counter()
    elapsed = time.perf_counter() - warm_time
    rss_end = resident_mb()

    mean_error = np.abs(bn.running_mean - ref_mean).max()
    var_error = np.abs(bn.running_var - ref_var).max()
    var_rel_error = (np.abs(bn.running_var - ref_var) / ref_var).max()
    growth = rss_end - rss_after_warmup
    layout = "channels_last" if channels_last else "channels_first"
    report(f"{layout}: {steps} steps of {physical} float32, "
           f"{1e3 * elapsed / (steps - warmup):.2f} ms/step after warm-up "
           f"({time.perf_counter() - start:.1f} s in all)")
    report(f"  RSS after warm-up {rss_after_warmup:.1f} MB, at end {rss_end:.1f} MB, "
           f"growth {growth:+.2f} MB (limit {RSS_LIMIT_MB} MB)")
    report(f"  running stats vs float64 reference: max |mean error| {mean_error:.3g}, "
           f"max |var error| {var_error:.3g} (relative {var_rel_error:.3g}), "
           f"limit {STAT_TOLERANCE}")
    ok = (growth < RSS_LIMIT_MB and mean_error <= STAT_TOLERANCE
          and var_rel_error <= STAT_TOLERANCE)
    return ok, dict(rss_growth_mb=growth, mean_error=mean_error, var_error=var_error,
                    var_rel_error=var_rel_error, ms_per_step=1e3 * elapsed / (steps - warmup))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layout", choices=["both", "channels_first", "channels_last"],
                        default="both")
    args = parser.parse_args(argv)
    layouts = {"both": [False, True], "channels_first": [False],
               "channels_last": [True]}[args.layout]
    results = [run(args.steps, channels_last)[0] for channels_last in layouts]
    print("PASS" if all(results) else "FAIL")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
