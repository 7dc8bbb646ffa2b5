"""Run under ``mpiexec -n K``: every SyncBatchNorm check of sync_checks on real MPI.

Usage: mpiexec -n K python tests/mpi_sync_worker.py OUT_DIR
Each rank writes OUT_DIR/rank<r>.json for test_sync_mpi.py to combine; a rank that raises
writes its traceback instead, so the test reports it rather than a bare exit status.
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numba  # noqa: E402
from mpi4py import MPI  # noqa: E402

import sync_checks  # noqa: E402


def main(out_dir):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    report = {"rank": rank, "size": size}
    try:
        report["equivalence"] = sync_checks.equivalence_cases(comm, size)
        report["thread_counts"] = [sync_checks.thread_count_case(comm, channels_last)
                                   for channels_last in (False, True)]
        report["threading_layer"] = numba.threading_layer()
        if size > 1:
            report["bad_input"] = sync_checks.bad_input_cases(comm, bad_rank=size - 1)
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        report["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    main(sys.argv[1])
