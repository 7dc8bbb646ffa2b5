"""The roofline report, ``python -m fastbn``, end to end on one tiny shape.

Speed itself is not asserted here (timed unit tests on a shared machine only measure the
neighbours); these check that the report runs, that every number it prints comes from a
measurement, and that the torch worker answers cell by cell when torch is installed.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_report(*args):
    return subprocess.run([sys.executable, "-m", "fastbn", *args], capture_output=True,
                          text=True, timeout=600)


def test_quick_report_measures_every_cell(tmp_path):
    path = tmp_path / "report.json"
    proc = run_report("--quick", "--shapes", "2x4x8x8", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(path.read_text())
    results = report["results"]
    assert {(r["layout"], r["op"]) for r in results} == {
        (layout, op) for layout in ("NCHW", "NHWC")
        for op in ("train_forward", "eval_forward", "backward")}
    assert report["bandwidth"]["bytes_per_s"] > 0
    for row in results:
        assert row["shape"] == [2, 4, 8, 8]
        assert row["bytes"] == 2 * 4 * 8 * 8 * 4
        assert row["fastbn"]["median_s"] > 0 and row["numpy"]["median_s"] > 0
        seconds = row["fastbn"]["median_s"]
        assert row["speedup_vs_numpy"] == pytest.approx(row["numpy"]["median_s"] / seconds)
        if HAS_TORCH:
            assert row["torch"]["median_s"] > 0
            assert row["speedup_vs_torch"] == pytest.approx(row["torch"]["median_s"] / seconds)
        else:
            assert row["torch"] is None and row["speedup_vs_torch"] is None
    if HAS_TORCH:
        assert "worker process" in report["torch_note"]
    assert "| train fwd | NCHW   | 2x4x8x8" in proc.stdout
    assert "Geometric means over the shapes" in proc.stdout


def test_report_without_torch_says_so(tmp_path):
    path = tmp_path / "report.json"
    proc = run_report("--quick", "--no-torch", "--shapes", "2x4x8x8", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(path.read_text())
    assert report["torch_note"] == "skipped (--no-torch)"
    assert all(row["torch"] is None for row in report["results"])


@pytest.mark.parametrize("shape", ["2x", "0x4", "1x4", "axb"])
def test_report_rejects_a_bad_shape(shape):
    proc = run_report("--shapes", shape)
    assert proc.returncode == 2
    assert "shape" in proc.stderr and shape in proc.stderr
