"""What synchronisation costs: a SyncBatchNorm training step against a BatchNorm step.

Not an asv benchmark (it needs mpiexec); run it under MPI, once per process count:

    for k in 1 2 4; do
        NUMBA_NUM_THREADS=1 mpiexec -n $k python benchmarks/sync_overhead.py
    done

Every rank holds the same shard shape (weak scaling, as in data-parallel training). A step is
forward + backward in training mode. The two kinds of step alternate, each after a barrier,
so both see the same machine load; the table gives, per shape, the median over steps of the
slowest rank's time, their ratio, the float64 bytes each rank contributes to the two
Allgathers of a step (it receives K times as many), and the time of one bare Allgather of a
forward row (the latency each of the step's two collectives pays at least).
"""

import argparse
import time

import numpy as np

SHAPES = ["32x64x56x56", "8x256x14x14", "128x1024"]


def step(module, x, dy):
    module(x)
    module.backward(dy)


def measure(comm, shape_label, layout, dtype, repeat):
    import fastbn

    shape = tuple(int(d) for d in shape_label.split("x"))
    channels_last = layout == "NHWC" and len(shape) > 2
    if channels_last:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    rng = np.random.default_rng(comm.Get_rank())
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    n_channels = shape[-1] if channels_last else shape[1]
    plain_type = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
                  5: fastbn.BatchNorm3d}[len(shape)]
    sync = fastbn.SyncBatchNorm(n_channels, comm=comm, channels_last=channels_last, dtype=dtype)
    plain = plain_type(n_channels, channels_last=channels_last, dtype=dtype)
    for module in (sync, plain):  # compile and touch every buffer outside the timing
        step(module, x, dy)
    sent_before = sync.exchange.bytes_sent
    times = {"sync": [], "plain": []}
    for _ in range(repeat):
        for name, module in (("sync", sync), ("plain", plain)):
            comm.Barrier()
            start = time.perf_counter()
            step(module, x, dy)
            elapsed = time.perf_counter() - start
            # The slowest rank sets the pace of a data-parallel step.
            times[name].append(comm.allreduce(elapsed, op=max_op()))
    sent = (sync.exchange.bytes_sent - sent_before) // repeat
    return np.median(times["sync"]), np.median(times["plain"]), sent, allgather_time(
        comm, 2 * n_channels + 2, repeat)


def allgather_time(comm, n_values, repeat):
    """Median time of one bare Allgather of a forward row (the slowest rank's)."""
    send = np.zeros(n_values)
    received = np.empty((comm.Get_size(), n_values))
    times = []
    for _ in range(repeat + 1):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allgather(send, received)
        times.append(comm.allreduce(time.perf_counter() - start, op=max_op()))
    return np.median(times[1:])


def max_op():
    from mpi4py import MPI

    return MPI.MAX


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    import numba
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = []
    for shape in args.shapes:
        for layout in args.layouts:
            if layout == "NHWC" and len(shape.split("x")) == 2:
                continue  # an (N, C) batch has one layout
            rows.append((shape, layout) + measure(comm, shape, layout, args.dtype, args.repeat))
    if comm.Get_rank() == 0:
        print(f"K={comm.Get_size()} processes, {numba.get_num_threads()} Numba thread(s) each, "
              f"{args.dtype}, median of {args.repeat} steps")
        print("| K | shard (N, C, ...) | layout | SyncBatchNorm step | BatchNorm step | ratio "
              "| bytes sent per rank per step | one bare Allgather |")
        print("|---|---|---|---|---|---|---|---|")
        for shape, layout, sync, plain, sent, gather in rows:
            print(f"| {comm.Get_size()} | {shape} | {layout} | {sync * 1e3:.3f} ms "
                  f"| {plain * 1e3:.3f} ms | {sync / plain:.2f}x | {sent} "
                  f"| {gather * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
