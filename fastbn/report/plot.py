"""The --plot figure of ``python -m fastbn``: one-pass fraction and speedup per shape.

matplotlib is the optional ``plot`` extra, so it is imported only when a plot is asked for.
"""

import numpy as np

from . import timing as R


def matplotlib_or_none():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def write_plot(plt, path, report):
    results, shapes = report["results"], report["settings"]["shapes"]
    have_torch = any(r["speedup_vs_torch"] for r in results)
    peer_key, peer_name = (("speedup_vs_torch", "torch") if have_torch
                           else ("speedup_vs_numpy", "NumPy (torch not measured)"))
    series = [(op, layout) for op in R.OPS for layout in R.LAYOUTS]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / len(series)
    positions = np.arange(len(shapes))
    for i, (op, layout) in enumerate(series):
        by_shape = {tuple(r["shape"]): r for r in results
                    if r["op"] == op and r["layout"] == layout}
        rows = [by_shape.get(tuple(s)) for s in shapes]
        roof = [r["one_pass_fraction"] if r else np.nan for r in rows]
        peer = [r[peer_key] if r and r[peer_key] else np.nan for r in rows]
        offset = positions + (i - (len(series) - 1) / 2) * width
        label = f"{R.OP_TITLES[op]} {layout}"
        top.bar(offset, roof, width, label=label, color=f"C{R.OPS.index(op)}",
                alpha=1.0 if layout == "NCHW" else 0.55)
        bottom.bar(offset, peer, width, label=label, color=f"C{R.OPS.index(op)}",
                   alpha=1.0 if layout == "NCHW" else 0.55)
    machine = report["machine"]
    top.axhline(1.0, color="black", linewidth=0.8)
    top.set_ylabel("fraction of the one-pass bound\n(out= calls)")
    top.set_title(f"fastbn {machine['fastbn']} ({report['settings']['dtype']}) on {machine['cpu']}"
                  f", {machine['numba_threads']} threads; one pass = y = a*x + b (forwards), "
                  f"dx = a*dy + b*x + c (backward) on the same buffers", fontsize="small")
    top.legend(ncol=3, fontsize="small")
    bottom.axhline(1.0, color="black", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel(f"speedup against {peer_name}\n(module calls)")
    bottom.set_xticks(positions, [R.shape_label(s) for s in shapes], rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
