"""The text of ``python -m fastbn``: header, the per-cell table and the summary, as Markdown."""

import numpy as np

from . import timing as R

# Cells this large or larger are held to the one-pass targets (issue 12); smaller ones are
# dominated by per-call costs, which the speedup against torch measures instead.
TARGET_BYTES = 1 << 20


def format_seconds(seconds):
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"


def format_ratio(value):
    if value is None:
        return "—"
    if value < 0.01:  # a peer's stall-free sample against a stalled baseline, say
        return f"{value:.1g}×"
    return f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def format_fraction(value):
    return "—" if value is None else f"{value:.2f}"


def geometric_mean(values):
    values = [v for v in values if v]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "geometric_mean": None}
    return {"median": float(np.median(values)), "min": float(min(values)),
            "geometric_mean": geometric_mean(values)}


def summarize(results):
    """Per op: the speedups against torch and NumPy over every cell, and the one-pass fraction
    over the cells of TARGET_BYTES or more."""
    summary = {}
    for op in R.OPS:
        rows = [r for r in results if r["op"] == op]
        large = [r for r in rows if r["bytes"] >= TARGET_BYTES]
        summary[op] = {"speedup_vs_torch": _stats([r["speedup_vs_torch"] for r in rows]),
                       "speedup_vs_numpy": _stats([r["speedup_vs_numpy"] for r in rows]),
                       "one_pass_fraction": _stats([r["one_pass_fraction"] for r in large]),
                       "module_one_pass_fraction": _stats(
                           [r["module_one_pass_fraction"] for r in large])}
    summary["faults_per_call"] = {
        side: max((r[side]["faults_per_call"] for r in results
                   if r[side] and r[side].get("faults_per_call") is not None), default=None)
        for side in ("module", "torch")}
    return summary


def header_lines(machine, bandwidth, settings, torch_note):
    m = machine
    torch = f", torch {m['torch']}" if m["torch"] else ""
    busy = m["load_average"] and m["load_average"][0] > (m["usable_cores"] or m["cores"])
    llc = m["last_level_cache_bytes"]
    return [
        f"# fastbn {m['fastbn']} report",
        "",
        *(["**warning: the load average exceeded the core count: other work shared the "
           "cores, so these timings are contended**", ""] if busy else []),
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{llc >> 20} MiB last-level cache, Numba {m['numba_threads']} threads, threading "
        f"layer {m['threading_layer']}"
        + (f", load average {m['load_average'][0]:.2f} at the start and "
           f"{settings['load_average_end'][0]:.2f} at the end" if m["load_average"] else ""),
        f"- versions: Python {m['python']}, numpy {m['numpy']}, numba {m['numba']}{torch}",
        f"- dtype {settings['dtype']}; module = a module call that allocates its output, as "
        "users call it; out= = the functional call into a preallocated buffer",
        f"- torch: {torch_note}; vs torch and vs NumPy = time(peer) / time(fastbn module)",
        "- 1-pass = the op's unavoidable traffic as one plain streaming pass on the same "
        "buffers, same process and threads (serial or parallel by fastbn's own rule, which "
        "goes serial when other work keeps the cores busy), timed interleaved with out=: "
        "y = a*x + b "
        "(forwards), dx = a*dy + b*x + c (backward), per-channel a, b, c; "
        "fraction = time(1-pass) / time(out=)",
        f"- bandwidth: parallel y = a*x + b over {bandwidth['bytes_moved'] // 2 >> 20} MiB into "
        "a reused buffer, read + write, sampled beside each cell (median over the run "
        f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s); DRAM roofline = "
        "(P * bytes / bandwidth) / time(out=) with P = "
        + ", ".join(f"{p} ({R.OP_TITLES[op]})" for op, p in R.PASSES.items())
        + ", shown only for tensors of at least twice the last-level cache",
        "- heap: " + ("freed memory kept in the heap in both processes (glibc M_MMAP_THRESHOLD "
                      "and M_TRIM_THRESHOLD), so an allocating call reuses warm pages"
                      if settings.get("heap_kept") else
                      "glibc's defaults: a call may fault its output's pages in afresh")
        + " (see fastbn/report/heap.py)",
        f"- command: {settings['command']}",
    ]


def table_lines(results):
    columns = ["op", "layout", "shape", "MB", "module", "torch", "vs torch", "out=", "1-pass",
               "fraction", "GB/s", "DRAM roof", "vs NumPy"]
    rows = []
    for op in R.OPS:
        for layout in R.LAYOUTS:
            for r in (r for r in results if r["op"] == op and r["layout"] == layout):
                peer = r["torch"]
                rows.append([R.OP_TITLES[op], layout, R.shape_label(r["shape"]),
                             f"{r['bytes'] / 1e6:.3g}", format_seconds(r["module"]["median_s"]),
                             format_seconds(peer["median_s"] if peer else None),
                             format_ratio(r["speedup_vs_torch"]),
                             format_seconds(r["out"]["median_s"]),
                             format_seconds(r["one_pass"]["median_s"]),
                             format_fraction(r["one_pass_fraction"]),
                             f"{r['bandwidth_bytes_per_s'] / 1e9:.1f}",
                             format_fraction(r["roofline_fraction"]),
                             format_ratio(r["speedup_vs_numpy"])])
    return markdown_table(columns, rows, right_from=3)


def markdown_table(columns, rows, right_from):
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i >= right_from else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return [line(columns), rule] + [line(row) for row in rows]


def summary_lines(summary):
    lines = ["", "Over the grid (speedups: every cell; one-pass fractions: cells of "
             f"{TARGET_BYTES >> 20} MB or more):", ""]
    for op in R.OPS:
        values = summary[op]
        torch, frac = values["speedup_vs_torch"], values["one_pass_fraction"]
        module_frac = values["module_one_pass_fraction"]
        lines.append(
            f"- {R.OP_TITLES[op]}: vs torch median {format_ratio(torch['median'])}, min "
            f"{format_ratio(torch['min'])}, geometric mean {format_ratio(torch['geometric_mean'])}"
            f"; one-pass fraction (out=) min {format_fraction(frac['min'])}, median "
            f"{format_fraction(frac['median'])}; (module) min "
            f"{format_fraction(module_frac['min'])}; vs NumPy geometric mean "
            f"{format_ratio(values['speedup_vs_numpy']['geometric_mean'])}")
    faults = summary.get("faults_per_call", {})
    if any(v is not None for v in faults.values()):
        lines.append("- page faults per timed module call, most in any cell: "
                     + ", ".join(f"{side if side == 'torch' else 'fastbn'} {v:.0f}"
                                 for side, v in faults.items() if v is not None))
    return lines
