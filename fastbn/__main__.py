"""``python -m fastbn``: a memory-bandwidth roofline report of fastbn against NumPy and PyTorch.

The machine's read+write bandwidth is sampled before every shape, in the same run, so every
time is also quoted as a fraction of the bound P * bytes / bandwidth. NumPy runs in this
process; torch runs in a worker process with the same thread count, asked for each cell right
after fastbn's (see fastbn/report/torch_peer.py). Progress goes to
stderr and the table to stdout, so ``python -m fastbn > report.md`` keeps just the report.
"""

import argparse
import json
import sys
import time

import numpy as np

from .report import timing as R

# time_op settings. The default run stays under 3 minutes on 2 cores, the largest shape
# included: NumPy on it costs ~0.2-0.5 s a call, so its repeats are few.
TIMING = {
    "default": {"fastbn": dict(budget_s=0.8, min_repeats=5, max_repeats=100),
                "numpy": dict(budget_s=0.4, min_repeats=3, max_repeats=20),
                "bandwidth": dict(n_bytes=R.BANDWIDTH_BYTES, repeats=9),
                "bandwidth_per_shape": 3},
    "quick": {"fastbn": dict(budget_s=0.1, min_repeats=3, max_repeats=20),
              "numpy": dict(budget_s=0.05, min_repeats=1, max_repeats=5, warmup=False),
              "bandwidth": dict(n_bytes=R.BANDWIDTH_BYTES // 2, repeats=5),
              "bandwidth_per_shape": 1},
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
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="(batch, channels, *spatial) shapes such as 32x64x56x56 128x1024 "
                             "(default: the built-in grid of 8 shapes)")
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of the roofline fraction and the speedup against "
                             "torch per shape (needs the 'plot' extra: matplotlib)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    args = parser.parse_args(argv)
    try:
        args.shapes = [R.parse_shape(s) for s in args.shapes] if args.shapes else \
            [tuple(s) for s in R.DEFAULT_SHAPES]
    except ValueError as exc:
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
    """A result dict per (shape, layout, op), with the timings of fastbn, NumPy and (when peer
    is not None) torch, each cell's three taken back to back; bandwidth samples go to probe
    before each shape."""
    results = []
    for shape in shapes:
        progress.note(f"filling {R.shape_label(shape)}")
        problem = R.make_problem(shape, dtype)
        if peer:
            peer.load(shape)
        progress.note("measuring memory bandwidth")
        probe.sample(timing["bandwidth_per_shape"])
        for layout in R.LAYOUTS:
            arrays = problem[layout]
            fast, ref = R.fastbn_ops(arrays, layout), R.numpy_ops(arrays, layout)
            for op in R.OPS:
                label = f"{op:<13} {layout} {R.shape_label(shape)}"
                progress.note(f"fastbn {label}")
                fast_t = R.time_op(fast[op], **timing["fastbn"])
                peer_t = None
                if peer:
                    progress.note(f"torch  {label}")
                    peer_t = peer.time(layout, op, timing["fastbn"])
                progress.note(f"numpy  {label}")
                ref_t = R.time_op(ref[op], **timing["numpy"])
                torch_text = f"  torch {peer_t['median_s'] * 1e3:9.3f} ms" if peer_t else ""
                progress.step(f"{label:<40} fastbn {fast_t['median_s'] * 1e3:9.3f} ms  "
                              f"numpy {ref_t['median_s'] * 1e3:9.3f} ms{torch_text}")
                results.append({"shape": list(shape), "layout": layout, "op": op,
                                "array_shape": list(R.layout_shape(shape, layout)),
                                "bytes": arrays["x"].nbytes, "passes": R.PASSES[op],
                                "fastbn": fast_t, "numpy": ref_t, "torch": peer_t})
        del problem, arrays, fast, ref
    return results


def add_ratios(results, bytes_per_s):
    for row in results:
        seconds = row["fastbn"]["median_s"]
        row["effective_bytes_per_s"] = row["passes"] * row["bytes"] / seconds
        row["roofline_fraction"] = R.roofline_fraction(row["passes"], row["bytes"],
                                                       bytes_per_s, seconds)
        row["speedup_vs_numpy"] = row["numpy"]["median_s"] / seconds
        peer = row["torch"]
        row["speedup_vs_torch"] = peer["median_s"] / seconds if peer else None


def geometric_mean(values):
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def summarize(results):
    summary = {}
    for op in R.OPS:
        rows = [r for r in results if r["op"] == op]
        summary[op] = {key: geometric_mean([r[key] for r in rows])
                       for key in ("roofline_fraction", "speedup_vs_numpy", "speedup_vs_torch")}
    return summary


def format_seconds(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"


def format_ratio(value):
    return "—" if value is None else f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def header_lines(machine, bandwidth, settings, torch_note):
    m = machine
    torch = f", torch {m['torch']}" if m["torch"] else ""
    busy = m["load_average"] and m["load_average"][0] > (m["usable_cores"] or m["cores"])
    return [
        f"# fastbn {m['fastbn']} roofline report",
        "",
        *(["**warning: the load average exceeded the core count: other work shared the "
           "cores, so these timings are contended**", ""] if busy else []),
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Numba {m['numba_threads']} threads, threading layer {m['threading_layer']}"
        + (f", load average {m['load_average'][0]:.2f} at the start" if m["load_average"]
           else ""),
        f"- versions: Python {m['python']}, numpy {m['numpy']}, numba {m['numba']}{torch}",
        f"- memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (parallel "
        f"y = a*x + b over {bandwidth['bytes_moved'] // 2 >> 20} MiB into a reused buffer, "
        f"read + write, median of {len(bandwidth['samples_s'])} samples spread over the run)",
        f"- dtype {settings['dtype']}; roofline = (P * bytes / bandwidth) / time with P = "
        + ", ".join(f"{p} ({R.OP_TITLES[op]})" for op, p in R.PASSES.items())
        + "; GB/s = P * bytes / time",
        f"- speedups are time(peer) / time(fastbn), medians of one run; torch: {torch_note}",
        "- a roofline fraction above 1 means the tensor stayed in cache between passes",
        f"- command: {settings['command']}",
    ]


def table_lines(results):
    columns = ["op", "layout", "shape", "MB", "fastbn", "GB/s", "roofline", "vs NumPy",
               "vs torch"]
    rows = []
    for op in R.OPS:
        for layout in R.LAYOUTS:
            for r in (r for r in results if r["op"] == op and r["layout"] == layout):
                rows.append([R.OP_TITLES[op], layout, R.shape_label(r["shape"]),
                             f"{r['bytes'] / 1e6:.3g}", format_seconds(r["fastbn"]["median_s"]),
                             f"{r['effective_bytes_per_s'] / 1e9:.1f}",
                             f"{r['roofline_fraction']:.2f}", format_ratio(r["speedup_vs_numpy"]),
                             format_ratio(r["speedup_vs_torch"])])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    right = {3, 4, 5, 6, 7, 8}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return [line(columns), rule] + [line(row) for row in rows]


def summary_lines(summary):
    lines = ["", "Geometric means over the shapes:", ""]
    for op, values in summary.items():
        lines.append(f"- {R.OP_TITLES[op]}: roofline {values['roofline_fraction']:.2f}, "
                     f"{format_ratio(values['speedup_vs_numpy'])} NumPy, "
                     f"{format_ratio(values['speedup_vs_torch'])} torch")
    return lines


def main(argv=None):
    import numba

    from .report.plot import matplotlib_or_none, write_plot
    from .report.torch_peer import TorchPeer
    from .kernels.jit import num_threads

    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args = parse_args(argv)
    plt = None
    if args.plot:
        plt = matplotlib_or_none()
        if plt is None:  # fail before the long run, not after it
            parser.exit(2, "python -m fastbn: --plot needs matplotlib, which is not installed; "
                           "install the plot extra: pip install 'fastbn[plot]'\n")
    threads = args.threads or numba.get_num_threads()
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                     "(NUMBA_NUM_THREADS)")
    timing = TIMING["quick" if args.quick else "default"]
    settings = {"dtype": args.dtype, "threads": threads, "quick": args.quick,
                "shapes": [list(s) for s in args.shapes], "layouts": list(R.LAYOUTS),
                "ops": list(R.OPS), "timing": timing, "eps": R.EPS, "momentum": R.MOMENTUM,
                "command": " ".join(["python -m fastbn", *argv]).strip()}
    progress = Progress(len(args.shapes) * len(R.LAYOUTS) * len(R.OPS))
    started = time.perf_counter()
    peer, torch_note = None, "skipped (--no-torch)"
    if not args.no_torch:
        progress.note(f"starting the torch worker with {threads} threads")
        peer, reason = TorchPeer.start(args.dtype, threads)
        torch_note = (f"torch {peer.version} in a worker process, {peer.threads} threads, "
                      "each cell timed right after fastbn's" if peer
                      else f"not measured: {reason}")
        if reason:
            print(f"torch comparison skipped: {reason}", file=sys.stderr)
    try:
        with num_threads(threads):
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
    add_ratios(results, bandwidth["bytes_per_s"])
    report = {"machine": machine, "bandwidth": bandwidth, "passes": dict(R.PASSES),
              "settings": settings, "torch_note": torch_note, "results": results,
              "summary": summarize(results), "elapsed_s": time.perf_counter() - started}
    print("\n".join(header_lines(machine, bandwidth, settings, torch_note) + [""]
                    + table_lines(results) + summary_lines(report["summary"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if plt is not None:
        write_plot(plt, args.plot, report)
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"done in {report['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
