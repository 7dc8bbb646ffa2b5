"""``python -m fastbn --under-load``: how much slower fastbn and torch get beside busy processes.

A training process rarely has the machine to itself: data-loading workers share its cores. A
parallel region waits for its slowest thread, so a thread that the scheduler takes off its core
stalls the whole region for a time slice. Here each cell is timed alone and then beside K
processes that spin on a core each, fastbn in this process and torch in its worker process, one
right after the other; the slowdown factor is time(beside K) / time(alone).
"""

import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np

from . import ops as O
from . import timing as R
from .table import format_ratio, format_seconds, markdown_table

BUSY_LEVELS = (1, 2)
DEFAULT_SHAPES = ((32, 64, 56, 56), (128, 1024))
# Under load a call's time has a long tail; more samples keep its median steady.
TIMING = {"default": dict(budget_s=1.0, min_repeats=9, max_repeats=100),
          "quick": dict(budget_s=0.1, min_repeats=3, max_repeats=20)}
_SPIN = "while True:\n    pass\n"


@contextmanager
def busy_processes(count):
    """count processes that each keep one core busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(count)]
    try:
        time.sleep(0.3 if count else 0.0)  # let them start spinning before anything is timed
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def time_under_load(shapes, dtype, timing, progress, peer, levels=BUSY_LEVELS):
    """A result per (shape, layout, op): module-call medians alone and beside each level of
    busy processes, for fastbn and (when peer is not None) torch."""
    results = []
    for shape in shapes:
        problem = R.make_problem(shape, dtype)
        if peer:
            peer.load(shape)
        cells = []
        for layout in R.LAYOUTS:
            ops = O.module_ops(problem[layout], layout)
            for op in R.OPS:
                cells.append((layout, op, ops[op]))
        by_level = {}
        for level in (0,) + tuple(levels):
            with busy_processes(level):
                for layout, op, fn in cells:
                    label = f"{R.OP_TITLES[op]} {layout} {R.shape_label(shape)} beside {level}"
                    progress.note(f"fastbn {label}")
                    fast = R.time_op(fn, **timing)
                    peer_t = peer.time(layout, op, timing) if peer else None
                    by_level[(layout, op, level)] = (fast, peer_t)
                    progress.note(f"{label}: fastbn {fast['median_s'] * 1e3:.3f} ms"
                                  + (f", torch {peer_t['median_s'] * 1e3:.3f} ms"
                                     if peer_t else ""))
        for layout, op, _ in cells:
            alone_fast, alone_peer = by_level[(layout, op, 0)]
            row = {"shape": list(shape), "layout": layout, "op": op,
                   "fastbn": {"alone": alone_fast}, "torch": {"alone": alone_peer} if peer else
                   None, "fastbn_slowdown": {}, "torch_slowdown": {}}
            for level in levels:
                fast, peer_t = by_level[(layout, op, level)]
                row["fastbn"][str(level)] = fast
                row["fastbn_slowdown"][str(level)] = fast["median_s"] / alone_fast["median_s"]
                if peer:
                    row["torch"][str(level)] = peer_t
                    row["torch_slowdown"][str(level)] = (peer_t["median_s"]
                                                         / alone_peer["median_s"])
            results.append(row)
        del problem, cells
    return results


def table_lines(results, levels=BUSY_LEVELS):
    columns = ["op", "layout", "shape", "fastbn alone"]
    columns += [f"fastbn ×, {k} busy" for k in levels]
    columns += ["torch alone"] + [f"torch ×, {k} busy" for k in levels]
    rows = []
    for r in results:
        torch = r["torch"]
        cells = [R.OP_TITLES[r["op"]], r["layout"], R.shape_label(r["shape"]),
                 format_seconds(r["fastbn"]["alone"]["median_s"])]
        cells += [format_ratio(r["fastbn_slowdown"][str(k)]) for k in levels]
        cells += [format_seconds(torch["alone"]["median_s"]) if torch else "—"]
        cells += [format_ratio(r["torch_slowdown"].get(str(k))) for k in levels]
        rows.append(cells)
    return markdown_table(columns, rows, right_from=3)


def verdict_lines(results, levels=BUSY_LEVELS):
    worse = [r for r in results for k in levels
             if r["torch_slowdown"] and r["fastbn_slowdown"][str(k)]
             > r["torch_slowdown"][str(k)]]
    total = sum(1 for r in results if r["torch_slowdown"]) * len(levels)
    lines = ["", f"fastbn slowed down more than torch in {len(worse)} of {total} "
                 "(cell, load) pairs."]
    if total:
        # Slowdowns compare each library with itself; under background load the "alone"
        # times are contended too, so the time ratio at each level says as much.
        for level in (0,) + tuple(levels):
            key = "alone" if level == 0 else str(level)
            ratios = [r["torch"][key]["median_s"] / r["fastbn"][key]["median_s"]
                      for r in results if r["torch"]]
            lines.append(f"- beside {level} busy: time(torch) / time(fastbn) median "
                         f"{format_ratio(float(np.median(ratios)))}, min "
                         f"{format_ratio(min(ratios))}")
    return lines
