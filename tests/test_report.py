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
        for timing in ("module", "out", "one_pass", "numpy"):
            assert row[timing]["median_s"] > 0, timing
        # The out= call and the one-pass bound are sampled in turn, the same number of times.
        assert len(row["out"]["samples_s"]) == len(row["one_pass"]["samples_s"]) >= 3
        assert row["bandwidth_bytes_per_s"] > 0
        assert row["module"]["faults_per_call"] is not None
        module_s = row["module"]["median_s"]
        assert row["one_pass_fraction"] == pytest.approx(
            row["one_pass"]["median_s"] / row["out"]["median_s"])
        assert row["module_one_pass_fraction"] == pytest.approx(
            row["one_pass"]["median_s"] / module_s)
        # A 2 KB tensor stays in cache: no DRAM roofline for it.
        assert row["roofline_fraction"] is None
        assert row["speedup_vs_numpy"] == pytest.approx(row["numpy"]["median_s"] / module_s)
        if HAS_TORCH:
            assert row["torch"]["median_s"] > 0
            assert row["speedup_vs_torch"] == pytest.approx(row["torch"]["median_s"] / module_s)
        else:
            assert row["torch"] is None and row["speedup_vs_torch"] is None
    if HAS_TORCH:
        assert "module calls in a worker process" in report["torch_note"]
        speedups = [r["speedup_vs_torch"] for r in results if r["op"] == "backward"]
        assert report["summary"]["backward"]["speedup_vs_torch"]["min"] == min(speedups)
    assert "| train fwd | NCHW   | 2x4x8x8" in proc.stdout
    assert "Over the grid" in proc.stdout
    assert report["settings"]["heap_kept"] is (sys.platform == "linux")
    assert "page faults per timed module call" in proc.stdout


@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (2, 3, 5, 5), (4, 5, 6), (8, 16),
                                   (3, 2, 4, 4, 5), (64, 8, 8, 8)])
def test_one_pass_bound_computes_the_affine_maps(shape):
    # The bound must do the work it stands for, in every walk it can take (planes, sample
    # rows, channel rows; serial and parallel twins).
    import numpy as np

    from fastbn.report.bound import OnePass
    from fastbn.report.timing import make_problem

    problem = make_problem(shape, np.float64)
    for layout in ("NCHW", "NHWC"):
        x, dy = problem[layout]["x"], problem[layout]["dy"]
        y, dx = np.zeros_like(x), np.zeros_like(x)
        one_pass = OnePass(shape, layout, x, dy, y, dx)
        shape_c = [1] * x.ndim
        shape_c[x.ndim - 1 if layout == "NHWC" else 1] = -1
        a, b, c = (v.reshape(shape_c) for v in one_pass.coefficients)
        np.testing.assert_allclose(y, a * x + b, rtol=1e-14, err_msg=one_pass.kind)
        np.testing.assert_allclose(dx, a * dy + b * x + c, rtol=1e-14, err_msg=one_pass.kind)


def test_under_load_reports_slowdowns(tmp_path):
    path = tmp_path / "load.json"
    proc = run_report("--under-load", "--quick", "--shapes", "2x4x8x8", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(path.read_text())["under_load"]
    assert len(rows) == 6
    for row in rows:
        for level in ("1", "2"):
            fast = row["fastbn"][level]["median_s"]
            assert row["fastbn_slowdown"][level] == pytest.approx(
                fast / row["fastbn"]["alone"]["median_s"])
            if HAS_TORCH:
                assert row["torch_slowdown"][level] == pytest.approx(
                    row["torch"][level]["median_s"] / row["torch"]["alone"]["median_s"])
    assert "fastbn ×, 2 busy" in proc.stdout
    assert "(cell, load) pairs" in proc.stdout


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


def test_combine_takes_cell_medians_over_runs(tmp_path):
    from fastbn.report.combine import combine

    path = tmp_path / "report.json"
    proc = run_report("--quick", "--no-torch", "--shapes", "2x4x8x8", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    first = json.loads(path.read_text())
    second, third = json.loads(path.read_text()), json.loads(path.read_text())
    for row in second["results"]:
        row["one_pass_fraction"] *= 2
        row["module"]["median_s"] *= 3
    for row in third["results"]:
        row["one_pass_fraction"] *= 4
        row["module"]["median_s"] *= 5
    combined = combine([first, second, third])
    assert len(combined["results"]) == len(first["results"]) == 6
    for row, original in zip(combined["results"], first["results"]):
        assert row["one_pass_fraction"] == pytest.approx(2 * original["one_pass_fraction"])
        assert row["module"]["median_s"] == pytest.approx(3 * original["module"]["median_s"])
    fractions = [r["one_pass_fraction"] for r in combined["results"] if r["op"] == "backward"]
    assert combined["summary"]["backward"]["one_pass_fraction"]["min"] is None  # < 1 MB cells
    assert min(fractions) > 0
    out = subprocess.run([sys.executable, "-m", "fastbn.report.combine", str(path), str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Median of 2 runs" in out.stdout and "| backward  | NHWC   | 2x4x8x8" in out.stdout


@pytest.mark.skipif(not HAS_TORCH, reason="the bridge benchmark needs torch")
def test_bridge_report_times_both_implementations_per_cell(tmp_path):
    path = tmp_path / "bridge.json"
    proc = run_report("--bridge", "--quick", "--shapes", "2x4x8x8", "8x16x64x64", "--json",
                      str(path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(path.read_text())["layers"]
    # Which kernels fastbn.torch ran: torch's for a small batch and for channels-last memory
    # of 16 channels or more, its own otherwise (fastbn.torch.functional's routing).
    assert [(r["shape"], r["memory_format"], r["kernels"]) for r in rows] == [
        ([2, 4, 8, 8], "contiguous", "torch"), ([2, 4, 8, 8], "channels_last", "torch"),
        ([8, 16, 64, 64], "contiguous", "fastbn"), ([8, 16, 64, 64], "channels_last", "torch")]
    for row in rows:
        assert row["torch_s"] > 0 and row["fastbn_s"] > 0
        assert row["speedup"] == pytest.approx(row["torch_s"] / row["fastbn_s"])
    assert "median speedup" in proc.stdout and "fastbn's kernels" in proc.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (4, 5, 6), (8, 16)])
def test_one_pass_bound_reads_and_writes_16_bit_data(shape, dtype):
    """16-bit data: float32 arithmetic on the decoded values, rounded once, as fastbn's own
    passes do; NumPy's float32 arithmetic and cast give the same bits."""
    import numpy as np

    from fastbn.report.bound import OnePass
    from fastbn.report.timing import make_problem

    problem = make_problem(shape, dtype)
    for layout in ("NCHW", "NHWC"):
        x, dy = problem[layout]["x"], problem[layout]["dy"]
        assert x.dtype.name == dtype and problem[layout]["weight"].dtype == np.float32
        y, dx = np.zeros_like(x), np.zeros_like(x)
        one_pass = OnePass(shape, layout, x, dy, y, dx)
        shape_c = [1] * x.ndim
        shape_c[x.ndim - 1 if layout == "NHWC" else 1] = -1
        a, b, c = (v.reshape(shape_c) for v in one_pass.coefficients)
        assert a.dtype == np.float32
        x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
        np.testing.assert_array_equal(y.view(np.uint16), (a * x32 + b).astype(x.dtype).view(
            np.uint16), err_msg=one_pass.kind)
        np.testing.assert_array_equal(dx.view(np.uint16), (a * dy32 + b * x32 + c).astype(
            x.dtype).view(np.uint16), err_msg=one_pass.kind)


def test_bfloat16_report_moves_half_the_bytes(tmp_path):
    path = tmp_path / "report.json"
    proc = run_report("--quick", "--dtype", "bfloat16", "--shapes", "2x4x8x8", "--json",
                      str(path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(path.read_text())
    assert report["settings"]["dtype"] == "bfloat16"
    assert len(report["results"]) == 6
    for row in report["results"]:
        assert row["bytes"] == 2 * 4 * 8 * 8 * 2
        for timing in ("module", "out", "one_pass", "numpy") + ("torch",) * HAS_TORCH:
            assert row[timing]["median_s"] > 0, timing
    assert "dtype bfloat16" in proc.stdout


ALLOCATION_LOOP = """
import ctypes, sys
from fastbn.report.heap import keep_heap, minor_faults
if sys.argv[1] == "keep":
    assert keep_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 48 << 20  # above glibc's largest adaptive mmap threshold (32 MiB)

def calls(n):
    for _ in range(n):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)  # an output being written
        libc.free(block)

calls(3)
before = minor_faults()
calls(4)
print((minor_faults() - before) / 4)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc and its fault counts")
def test_kept_heap_serves_allocating_calls_without_page_faults():
    """The report's timing processes keep freed memory (report/heap.py): a call that
    allocates and writes a 48 MiB output then reuses warm pages, where glibc's defaults map
    fresh ones on every call and fault each of their 12,288 pages in."""
    faults = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", ALLOCATION_LOOP, mode],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = float(proc.stdout)
    assert faults["default"] > 10000, faults
    assert faults["keep"] < 100, faults


def test_model_table_takes_fastest_times_and_median_of_round_ratios(monkeypatch):
    """--bridge-model: each configuration's time is its fastest round; a speedup is the median
    over rounds of torch's time over the converted model's in the same round (drift lands on
    both). The workers are replaced by recorded times, so no torch is needed."""
    import io

    from fastbn.report import bridge

    # Round by round: torch drifts 100 -> 130 -> 115 ms; fastbn is 90% of torch in rounds 1
    # and 3 and 120% in round 2, so the median ratio is 1/0.9 while best-of would give 1.0.
    train = {"torch": [0.100, 0.130, 0.115], "fastbn": [0.090, 0.156, 0.1035],
             "identity": [0.080, 0.080, 0.080]}
    calls = {key: iter(values) for key, values in train.items()}

    def fake_worker(impl, memory_format, batch_norm, steps, policy, heap, timeout):
        key = impl if batch_norm == "batchnorm" else "identity"
        value = next(calls[key])
        return {"train_s": value, "infer_s": value / 2}

    monkeypatch.setattr(bridge, "MEMORY_FORMATS", ("contiguous",))
    monkeypatch.setattr(bridge, "_run_model_worker", fake_worker)
    rows = bridge.run_model(steps=1, policies=("default",), rounds=3, out=io.StringIO())
    torch_row, fastbn_row = rows
    assert torch_row["train_s"] == 0.100 and fastbn_row["train_s"] == 0.090
    assert fastbn_row["train_speedup"] == pytest.approx(1 / 0.9)
    assert fastbn_row["train_ratios"] == pytest.approx([1 / 0.9, 1 / 1.2, 1 / 0.9])
    assert torch_row["train_speedup"] == 1.0
    assert fastbn_row["bn_share"] == pytest.approx((0.090 - 0.080) / 0.090)
