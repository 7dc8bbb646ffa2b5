"""The median of several report runs: ``python -m fastbn.report.combine a.json b.json c.json``.

One run of ``python -m fastbn`` on a shared machine moves a cell's ratio by tens of percent, so
targets are judged on the median of three runs. Every ratio is first taken within its own run
(fastbn and its peer timed seconds apart), then the median over runs is taken cell by cell;
times shown are the medians of the runs' medians. The summary and the table are those of a
single run, computed from these medians.
"""

import argparse
import copy
import json
import sys

import numpy as np

from . import table as T

RATIOS = ("speedup_vs_torch", "speedup_vs_numpy", "one_pass_fraction",
          "module_one_pass_fraction", "roofline_fraction", "bandwidth_bytes_per_s",
          "effective_bytes_per_s")
TIMINGS = ("module", "torch", "out", "one_pass", "numpy")


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def combine(reports):
    """One report dict whose results hold, per cell, the medians over the given reports."""
    keyed = [{(tuple(r["shape"]), r["layout"], r["op"]): r for r in rep["results"]}
             for rep in reports]
    cells = [key for key in keyed[0] if all(key in k for k in keyed)]
    results = []
    for key in cells:
        rows = [k[key] for k in keyed]
        row = copy.deepcopy(rows[0])
        for name in RATIOS:
            row[name] = _median([r.get(name) for r in rows])
        for name in TIMINGS:
            if row.get(name) is not None:
                faults = [r[name].get("faults_per_call") for r in rows if r.get(name)]
                row[name] = {"median_s": _median([r[name]["median_s"] for r in rows
                                                  if r.get(name)]),
                             "runs_s": [r[name]["median_s"] for r in rows if r.get(name)],
                             "faults_per_call": max((f for f in faults if f is not None),
                                                    default=None)}
        results.append(row)
    combined = copy.deepcopy(reports[0])
    combined["results"] = results
    combined["summary"] = T.summarize(results)
    combined["runs"] = [{"command": rep["settings"]["command"],
                         "load_average": rep["machine"]["load_average"],
                         "bandwidth_bytes_per_s": rep["bandwidth"]["bytes_per_s"]}
                        for rep in reports]
    return combined


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn.report.combine",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("reports", nargs="+", metavar="JSON",
                        help="files written by python -m fastbn --json")
    parser.add_argument("--json", metavar="PATH", help="write the combined report to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write its plot to PATH")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    combined = combine(reports)
    lines = [f"Median of {len(reports)} runs of python -m fastbn, cell by cell:", ""]
    for run in combined["runs"]:
        load = run["load_average"][0] if run["load_average"] else float("nan")
        lines.append(f"- `{run['command']}`: load average {load:.2f} at its start, bandwidth "
                     f"{run['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    print("\n".join(lines + [""] + T.table_lines(combined["results"])
                    + T.summary_lines(combined["summary"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(combined, f, indent=1)
    if args.plot:
        from .plot import matplotlib_or_none, write_plot

        plt = matplotlib_or_none()
        if plt is None:
            parser.exit(2, "--plot needs matplotlib: pip install 'fastbn[plot]'\n")
        write_plot(plt, args.plot, combined)
    return 0


if __name__ == "__main__":
    sys.exit(main())
