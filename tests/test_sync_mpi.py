"""SyncBatchNorm on real MPI: ``mpiexec -n K`` for K = 1, 2, 3 (3 oversubscribes 2 cores).

One launch per K runs every check in tests/mpi_sync_worker.py and each rank reports JSON; a
hang fails the test through the subprocess timeout instead of stalling CI.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_sync_exchange import check_equivalence

pytest.importorskip("mpi4py", reason="needs the fastbn[mpi] extra (mpi4py, mpich)")

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "mpi_sync_worker.py"
# Generous: a cold run compiles every kernel in every rank at once, on 2 shared cores.
LAUNCH_TIMEOUT = 900


def mpiexec():
    """mpiexec next to this Python (the mpich wheel installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpi4py is installed but mpiexec is not; install fastbn[mpi]")
    return found


def launch(size, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH", "")]))
    # MPICH's hydra runs as root without extra flags and oversubscribes silently; -hosts keeps
    # every rank on the loopback interface.
    command = [mpiexec(), "-hosts", "127.0.0.1", "-n", str(size), sys.executable, str(WORKER),
               str(tmp_path)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n {size} hung for {LAUNCH_TIMEOUT} s: {exc.stderr!r}")
    assert done.returncode == 0, f"mpiexec -n {size} failed:\n{done.stdout}\n{done.stderr}"
    reports = []
    for rank in range(size):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
        assert report["rank"] == rank and report["size"] == size
        reports.append(report)
    return reports


@pytest.mark.parametrize("size", [1, 2, 3])
def test_sync_batch_norm_under_mpiexec(size, tmp_path):
    reports = launch(size, tmp_path)
    # y pieces, running statistics, dx and the sum over ranks of grad_weight and grad_bias
    # against a plain BatchNorm on the concatenated batch, within 1e-12 of scale; every
    # rank's running statistics bitwise identical.
    check_equivalence([report["equivalence"] for report in reports])
    # Each rank's results do not depend on its Numba thread count (1 or 2), nor, for the
    # global statistics, on which rank computed them.
    for report in reports:
        for case in report["thread_counts"]:
            assert case["threads"] >= 2, "the check needs 2 Numba threads"
            assert case["digests"][0] == case["digests"][1], (report["rank"], case)
    if size == 1:
        return
    bad = size - 1
    for report in reports:
        rank = report["rank"]
        outcomes = report["bad_input"]
        for step, own in (("channels", "ValueError"), ("dtype", "TypeError"),
                          ("dy_shape", "ValueError")):
            raised = outcomes[step]["raised"]
            assert raised == (own if rank == bad else "Peer" + own), (rank, step, raised)
            if rank != bad:
                assert f"failed on rank {bad} of {size}" in outcomes[step]["message"]
        assert outcomes["state_unchanged"] and outcomes["backward_after"]
        assert outcomes["later_step_ok"]


def readme_example(heading):
    """The first ```python block after `heading` in README.md, exactly as written there."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_readme_mpi_example_runs_as_written(tmp_path):
    script = tmp_path / "sync_example.py"
    script.write_text(readme_example("## Training across processes"))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([mpiexec(), "-hosts", "127.0.0.1", "-n", "3", sys.executable,
                           str(script)], env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for rank, n in ((0, 4), (1, 3), (2, 3)):
        assert f"rank {rank}: {n} samples, y and gradients match" in done.stdout


def test_a_rank_that_dies_ends_the_job_instead_of_hanging(tmp_path):
    """What the README promises: the survivors block in the collective and mpiexec (Hydra)
    ends the job once a rank exits without finalizing; nothing hangs."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os\n"
        "import numpy as np\n"
        "from mpi4py import MPI\n"
        "import fastbn\n"
        "comm = MPI.COMM_WORLD\n"
        "bn = fastbn.SyncBatchNorm(3, comm=comm)\n"
        "x = np.arange(12, dtype=np.float32).reshape(4, 3)\n"
        "bn(x)\n"
        "if comm.Get_rank() == 1:\n"
        "    os._exit(3)\n"
        "bn(x)\n"
        "print('survivor returned', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([mpiexec(), "-hosts", "127.0.0.1", "-n", "3", sys.executable,
                           str(script)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert done.returncode != 0, done.stdout + done.stderr  # 3, or 9 for the killed peers
    assert "survivor returned" not in done.stdout
