"""``python -m fastbn``: fastbn against the one-pass bound, torch and NumPy, cell by cell.

Every (shape, layout, op) cell is timed four ways in one go: fastbn's module call (allocating
its output, as users call it), torch's module call right after it in a worker process with the
same thread count (fastbn/report/torch_peer.py), fastbn's functional ``out=`` call interleaved
with the op's one-pass bound on the same buffers (fastbn/report/bound.py), and a NumPy
reference. The machine's read+write bandwidth is sampled beside each cell. ``--under-load``
times a few cells beside busy processes instead (fastbn/report/load.py). Progress goes to
stderr and the report to stdout, so ``python -m fastbn > report.md`` keeps just the report.
"""

import argparse
import json
import sys
import time

import numpy as np

from .report import ops as O
from .report import table as T
from .report import timing as R

# time_op settings. The default run stays under 3 minutes on 2 cores, the largest shape
# included: NumPy on it costs ~0.2-0.5 s a call, so its repeats are few.
TIMING = {
    "default": {"fastbn": dict(budget_s=0.8, min_repeats=5, max_repeats=100),
                "numpy": dict(budget_s=0.4, min_repeats=3, max_repeats=20),
                "bandwidth": dict(n_bytes=R.BANDWIDTH_BYTES, repeats=9),
                "bandwidth_per_cell": 3},
    "quick": {"fastbn": dict(budget_s=0.1, min_repeats=3, max_repeats=20),
              "numpy": dict(budget_s=0.05, min_repeats=1, max_repeats=5, warmup=False),
              "bandwidth": dict(n_bytes=R.BANDWIDTH_BYTES // 2, repeats=5),
              "bandwidth_per_cell": 1},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m fastbn",
        description="Time fastbn's training forward, eval forward and backward over a grid of "
                    "shapes in NCHW and NHWC, against the machine's memory bandwidth, a NumPy "
                    "reference and PyTorch (when installed).")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and a smaller bandwidth buffer (about 30 s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="Numba and torch threads (default: Numba's current count)")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                        default="float32",
                        help="input dtype; float16 and bfloat16 (the lowp extra) run with "
                             "float32 parameters, torch's mixed precision, in torch as well")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="(batch, channels, *spatial) shapes such as 32x64x56x56 128x1024 "
                             "(default: the built-in grid of 8 shapes)")
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the roofline fraction and the speedup against "
                             "torch per shape (needs the 'plot' extra: matplotlib)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    parser.add_argument("--under-load", action="store_true",
                        help="instead of the grid, time module calls alone and beside 1 and 2 "
                             "busy processes and report the slowdowns of fastbn and torch "
                             "(default shapes: 32x64x56x56 128x1024)")
    parser.add_argument("--bridge", action="store_true",
                        help="instead of the kernel report: fastbn.torch against torch's "
                             "nn.BatchNorm, per layer, forward + backward through autograd, "
                             "in both memory formats (needs the 'torch' extra)")
    parser.add_argument("--bridge-model", action="store_true",
                        help="instead of the kernel report: a ResNet-18-shaped CNN trained "
                             "and run for inference with torch's batch norm and with "
                             "fastbn.torch, under the default and the passive OpenMP wait "
                             "policy (needs the 'torch' extra; about 10 minutes)")
    parser.add_argument("--trim-heap", action="store_true",
                        help="leave glibc's heap trimming on in the timing processes; by "
                             "default they keep freed memory, so that allocating calls are "
                             "not timed faulting in fresh pages (see fastbn/report/heap.py)")
    parser.add_argument("--steps", type=int, default=20, metavar="N",
                        help="training steps per configuration for --bridge-model")
    parser.add_argument("--rounds", type=int, default=2, metavar="N",
                        help="interleaved rounds for --bridge-model; each configuration "
                             "keeps its fastest")
    args = parser.parse_args(argv)
    from .report.load import DEFAULT_SHAPES as LOAD_SHAPES

    defaults = LOAD_SHAPES if args.under_load else R.DEFAULT_SHAPES
    try:
        args.shapes = [R.parse_shape(s) for s in args.shapes] if args.shapes else \
            [tuple(s) for s in defaults]
    except ValueError as exc:
        parser.error(str(exc))
    try:
        R.resolve_dtype(args.dtype)
    except ImportError as exc:  # bfloat16 without the lowp extra
        parser.error(str(exc))
    return parser, args


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per step in logs."""

    def __init__(self, total):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.terminal = R.stderr_is_terminal()

    def note(self, text):
        self._write(text)

    def step(self, text):
        self.done += 1
        self._write(f"[{self.done:>3}/{self.total}] {text}")

    def _write(self, text):
        text = f"{time.perf_counter() - self.started:6.1f}s  {text}"
        if self.terminal:
            print(f"\r{text:<100}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.terminal:
            print(file=sys.stderr, flush=True)


def time_cells(shapes, dtype, timing, progress, probe, peer):
    """A result dict per (shape, layout, op): fastbn's module call, torch's right after it (when
    peer is not None), fastbn's out= call interleaved with the one-pass bound, NumPy, and the
    bandwidth sampled just before."""
    from .report.bound import OnePass

    results = []
    for shape in shapes:
        progress.note(f"filling {R.shape_label(shape)}")
        problem = R.make_problem(shape, dtype)
        if peer:
            peer.load(shape)
        for layout in R.LAYOUTS:
            arrays = problem[layout]
            x, dy = arrays["x"], arrays["dy"]
            y, dx = np.zeros_like(x), np.zeros_like(x)
            fast, ref = O.fastbn_ops(arrays, layout, y, dx), O.numpy_ops(arrays, layout)
            module = O.module_ops(arrays, layout)
            one_pass = OnePass(shape, layout, x, dy, y, dx)
            for op in R.OPS:
                label = f"{op:<13} {layout} {R.shape_label(shape)}"
                progress.note(f"bandwidth before {label}")
                cell_bandwidth = probe.sample(timing["bandwidth_per_cell"])
                progress.note(f"fastbn {label}")
                module_t = R.time_op(module[op], **timing["fastbn"])
                peer_t = None
                if peer:
                    progress.note(f"torch  {label}")
                    peer_t = peer.time(layout, op, timing["fastbn"])
                progress.note(f"out= and one pass {label}")
                pair = R.time_interleaved({"out": fast[op], "one_pass": one_pass.for_op(op)},
                                          **timing["fastbn"])
                progress.note(f"numpy  {label}")
                ref_t = R.time_op(ref[op], **timing["numpy"])
                torch_text = f"  torch {peer_t['median_s'] * 1e3:9.3f} ms" if peer_t else ""
                progress.step(f"{label:<40} fastbn {module_t['median_s'] * 1e3:9.3f} ms"
                              f"{torch_text}  out= {pair['out']['median_s'] * 1e3:9.3f} ms  "
                              f"1-pass {pair['one_pass']['median_s'] * 1e3:9.3f} ms")
                results.append({"shape": list(shape), "layout": layout, "op": op,
                                "array_shape": list(R.layout_shape(shape, layout)),
                                "bytes": x.nbytes, "passes": R.PASSES[op],
                                "one_pass_walk": one_pass.kind,
                                "bandwidth_bytes_per_s": cell_bandwidth,
                                "module": module_t, "torch": peer_t, "out": pair["out"],
                                "one_pass": pair["one_pass"], "numpy": ref_t})
            del arrays, fast, ref, module, one_pass, x, dy, y, dx
        del problem
    return results


def add_ratios(results, last_level_cache_bytes):
    for row in results:
        module_s, out_s = row["module"]["median_s"], row["out"]["median_s"]
        one_pass_s = row["one_pass"]["median_s"]
        row["effective_bytes_per_s"] = row["passes"] * row["bytes"] / out_s
        row["one_pass_fraction"] = one_pass_s / out_s
        row["module_one_pass_fraction"] = one_pass_s / module_s
        # The DRAM roofline only means something for a tensor that cannot stay in cache.
        row["roofline_fraction"] = (
            R.roofline_fraction(row["passes"], row["bytes"], row["bandwidth_bytes_per_s"],
                                out_s)
            if row["bytes"] >= 2 * last_level_cache_bytes else None)
        row["speedup_vs_numpy"] = row["numpy"]["median_s"] / module_s
        peer = row["torch"]
        row["speedup_vs_torch"] = peer["median_s"] / module_s if peer else None


def _bridge_main(parser, args, threads):
    """The PyTorch-bridge measurements (see fastbn/report/bridge.py)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        parser.exit(2, "python -m fastbn: --bridge needs torch; install the torch extra: "
                       "pip install 'fastbn[torch]'\n")
    from .report import bridge

    results = {}
    heap = "trimmed" if args.trim_heap else "kept"
    if args.bridge:
        results["layers"] = bridge.run_layers(args.shapes, threads,
                                              budget_s=0.2 if args.quick else 0.5, heap=heap)
    if args.bridge_model:
        results["model"] = bridge.run_model(steps=args.steps, rounds=args.rounds, heap=heap)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv=None):
    import os

    import numba

    from .kernels.jit import num_threads
    from .report.heap import keep_heap
    from .report.plot import matplotlib_or_none, write_plot
    from .report.torch_peer import TorchPeer

    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_args(argv)
    plt = None
    if args.plot and not args.under_load:
        plt = matplotlib_or_none()
        if plt is None:  # fail before the long run, not after it
            parser.exit(2, "python -m fastbn: --plot needs matplotlib, which is not installed; "
                           "install the plot extra: pip install 'fastbn[plot]'\n")
    threads = args.threads or numba.get_num_threads()
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                     "(NUMBA_NUM_THREADS)")
    if args.bridge or args.bridge_model:
        return _bridge_main(parser, args, threads)
    heap_kept = not args.trim_heap and keep_heap()
    timing = TIMING["quick" if args.quick else "default"]
    settings = {"dtype": args.dtype, "threads": threads, "quick": args.quick,
                "heap_kept": heap_kept,
                "shapes": [list(s) for s in args.shapes], "layouts": list(R.LAYOUTS),
                "ops": list(R.OPS), "timing": timing, "eps": R.EPS, "momentum": R.MOMENTUM,
                "command": " ".join(["python -m fastbn", *argv]).strip()}
    progress = Progress(len(args.shapes) * len(R.LAYOUTS) * len(R.OPS))
    started = time.perf_counter()
    peer, torch_note = None, "skipped (--no-torch)"
    if not args.no_torch:
        progress.note(f"starting the torch worker with {threads} threads")
        peer, reason = TorchPeer.start(args.dtype, threads, keep_heap=heap_kept)
        torch_note = (f"torch {peer.version} module calls in a worker process, {peer.threads} "
                      "threads, each cell timed right after fastbn's" if peer
                      else f"not measured: {reason}")
        if reason:
            print(f"torch comparison skipped: {reason}", file=sys.stderr)
    try:
        with num_threads(threads):
            if args.under_load:
                return under_load(args, settings, progress, peer, torch_note, started)
            progress.note("measuring memory bandwidth")
            probe = R.BandwidthProbe(timing["bandwidth"]["n_bytes"])
            probe.sample(timing["bandwidth"]["repeats"])
            machine = R.machine_info()
            results = time_cells(args.shapes, args.dtype, timing, progress, probe, peer)
            bandwidth = probe.result()
    finally:
        if peer:
            peer.close()
    progress.close()
    settings["load_average_end"] = list(os.getloadavg())
    add_ratios(results, machine["last_level_cache_bytes"])
    report = {"machine": machine, "bandwidth": bandwidth, "passes": dict(R.PASSES),
              "settings": settings, "torch_note": torch_note, "results": results,
              "summary": T.summarize(results), "elapsed_s": time.perf_counter() - started}
    print("\n".join(T.header_lines(machine, bandwidth, settings, torch_note) + [""]
                    + T.table_lines(results) + T.summary_lines(report["summary"])))
    write_json(args.json, report)
    if plt is not None:
        write_plot(plt, args.plot, report)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"done in {report['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


def under_load(args, settings, progress, peer, torch_note, started):
    import os

    from .report import load

    timing = load.TIMING["quick" if args.quick else "default"]
    settings["timing"] = timing
    machine = R.machine_info()
    results = load.time_under_load(args.shapes, args.dtype, timing, progress, peer)
    progress.close()
    settings["load_average_end"] = list(os.getloadavg())
    m = machine
    lines = [f"# fastbn {m['fastbn']} under load", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, Numba {m['numba_threads']} threads, "
             f"threading layer {m['threading_layer']}, load average {m['load_average'][0]:.2f} "
             f"at the start and {settings['load_average_end'][0]:.2f} at the end",
             f"- dtype {args.dtype}; module calls that allocate their output; torch: "
             f"{torch_note}",
             "- busy = processes spinning on a core each beside the timed call; "
             "× = time(beside them) / time(alone)",
             f"- command: {settings['command']}", ""]
    print("\n".join(lines + load.table_lines(results) + load.verdict_lines(results)))
    write_json(args.json, {"machine": machine, "settings": settings, "torch_note": torch_note,
                           "under_load": results, "elapsed_s": time.perf_counter() - started})
    return 0


def write_json(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
