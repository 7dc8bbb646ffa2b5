"""SyncBatchNorm checks that run on every rank of a communicator and report plain data.

The same functions run under ``mpiexec`` (tests/mpi_sync_worker.py, real MPI) and in threads
over an in-process communicator (test_sync_exchange.py). Each rank builds the same seeded
global batch, takes its shard, and compares what SyncBatchNorm gives it with a plain
``fastbn`` BatchNorm run on the whole batch in float64, within 1e-12 of the scale of each
quantity (tests/reference.py). Results that need every rank (the sum of grad_weight over
ranks, bitwise equality of running statistics) are returned for the caller to combine.
"""

import hashlib

import numba
import numpy as np

import fastbn
import reference as ref
from fastbn.kernels.jit import num_threads

N_GLOBAL = 7
# Shard sizes along N per number of ranks: uneven, and with an empty shard wherever K > 1.
SPLITS = {1: [[7]], 2: [[3, 4], [7, 0]], 3: [[2, 0, 5]], 4: [[0, 3, 1, 3]]}
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}
N_CHANNELS = 3
PLAIN = {2: fastbn.BatchNorm1d, 3: fastbn.BatchNorm1d, 4: fastbn.BatchNorm2d,
         5: fastbn.BatchNorm3d}


def _physical(n, ndim, channels_last, n_channels=N_CHANNELS):
    spatial = SPATIAL[ndim]
    return (n,) + spatial + (n_channels,) if channels_last else (n, n_channels) + spatial


def global_batch(seed, ndim, channels_last, n=N_GLOBAL, n_channels=N_CHANNELS):
    """Seeded (x, dy) of the whole batch: every rank draws the same values."""
    rng = np.random.default_rng(seed)
    shape = _physical(n, ndim, channels_last, n_channels)
    axis = -1 if channels_last else 1
    loc = np.expand_dims(rng.uniform(-3, 3, n_channels), [a for a in range(len(shape))
                                                         if a != axis % len(shape)])
    x = rng.standard_normal(shape) * 1.5 + loc
    dy = rng.standard_normal(shape)
    return x, dy


def _shard(a, split, rank):
    start = sum(split[:rank])
    return np.ascontiguousarray(a[start:start + split[rank]])


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _error(actual, expected, scale):
    """max |actual - expected| / scale, the quantity that must stay below 1e-12."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.size == 0:
        return 0.0
    scale = np.maximum(np.asarray(scale, np.float64), 1e-300)
    return float(np.max(np.abs(actual - expected) / scale))


def equivalence_case(comm, ndim, channels_last, affine, momentum, split, steps=2):
    """Train `steps` steps (forward + backward) and one eval forward, on this rank's shard.

    Returns this rank's maximal scaled errors against a plain BatchNorm on the whole batch,
    its local grad_weight/grad_bias per step, the plain module's ones and their scales, and
    digests of its running statistics.
    """
    rank = comm.Get_rank()
    kwargs = dict(momentum=momentum, affine=affine, channels_last=channels_last,
                  dtype=np.float64)
    sync = fastbn.SyncBatchNorm(N_CHANNELS, comm=comm, **kwargs)
    plain = PLAIN[ndim](N_CHANNELS, **kwargs)
    if affine:
        rng = np.random.default_rng(11)
        weight, bias = rng.uniform(0.5, 1.5, N_CHANNELS), rng.uniform(-1, 1, N_CHANNELS)
        for module in (sync, plain):
            module.weight[...] = weight
            module.bias[...] = bias
    errors = {"y": 0.0, "dx": 0.0, "running_mean": 0.0, "running_var": 0.0, "eval_y": 0.0}
    grads = []
    for step in range(steps):
        x, dy = global_batch(100 * step + ndim, ndim, channels_last)
        old_mean, old_var = plain.running_mean.copy(), plain.running_var.copy()
        y_full = plain(x)
        y = sync(_shard(x, split, rank))
        _, mean, _, var_unbiased = ref.forward_train(x, plain.weight, plain.bias,
                                                     channels_last=channels_last)
        bias_scale = 0.0 if not affine else 2 * np.max(np.abs(plain.bias))
        errors["y"] = max(errors["y"], _error(y, _shard(y_full, split, rank),
                                              np.max(np.abs(y_full)) + bias_scale))
        errors["running_mean"] = max(errors["running_mean"], _error(
            sync.running_mean, plain.running_mean, np.abs(old_mean) + np.abs(mean)))
        errors["running_var"] = max(errors["running_var"], _error(
            sync.running_var, plain.running_var, np.abs(old_var) + np.abs(var_unbiased)))
        dx_full = plain.backward(dy)
        dx = sync.backward(_shard(dy, split, rank))
        invstd = ref.inverse_std(ref.batch_mean_var(x, channels_last)[1], sync.eps)
        dx_scale, gw_scale, gb_scale = ref.backward_scales(dy, x, mean, invstd, plain.weight,
                                                           channels_last)
        errors["dx"] = max(errors["dx"], _error(dx, _shard(dx_full, split, rank), dx_scale))
        if affine:
            grads.append({"grad_weight": sync.grad_weight.tolist(),
                          "grad_bias": sync.grad_bias.tolist(),
                          "plain_grad_weight": plain.grad_weight.tolist(),
                          "plain_grad_bias": plain.grad_bias.tolist(),
                          "grad_weight_scale": gw_scale.tolist(),
                          "grad_bias_scale": gb_scale.tolist()})
    assert sync.num_batches_tracked == plain.num_batches_tracked == steps
    sync.eval()
    plain.eval()
    x, _ = global_batch(999, ndim, channels_last)
    y_full = plain(x)
    errors["eval_y"] = _error(sync(_shard(x, split, rank)), _shard(y_full, split, rank),
                              np.max(np.abs(y_full)) + 2.0)
    return {"errors": errors, "grads": grads,
            "running": _digest(sync.running_mean, sync.running_var)}


def equivalence_cases(comm, size):
    """Every layout x input rank x affine x momentum case for `size` ranks."""
    results = []
    for split in SPLITS[size]:
        for ndim in (2, 3, 4, 5):
            for channels_last in (False, True):
                for affine, momentum in ((True, 0.1), (False, None), (True, None)):
                    case = dict(ndim=ndim, channels_last=channels_last, affine=affine,
                                momentum=momentum, split=split)
                    results.append({"case": case, **equivalence_case(comm, **case)})
    return results


def thread_count_case(comm, channels_last):
    """Digests of one training step with 1 and with 2 Numba threads, on a shard large enough
    (>= 32768 elements) for the parallel kernel twins."""
    rank = comm.Get_rank()
    size = comm.Get_size()
    rng = np.random.default_rng(5 + rank)
    shape = (4 + rank, 16, 24, 24)
    if channels_last:
        shape = (shape[0], 24, 24, 16)
    x = rng.standard_normal(shape) * 2.0 + 1.0
    dy = rng.standard_normal(shape)
    digests = []
    for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
        with num_threads(threads):
            bn = fastbn.SyncBatchNorm(16, comm=comm, channels_last=channels_last,
                                      dtype=np.float32)
            y = bn(x.astype(np.float32))
            dx = bn.backward(dy.astype(np.float32))
            digests.append(_digest(y, dx, bn.running_mean, bn.running_var, bn.grad_weight,
                                   bn.grad_bias))
    return {"threads": numba.config.NUMBA_NUM_THREADS, "size": size, "digests": digests}


def _outcome(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the kind and message are what is checked
        return {"raised": type(exc).__name__, "message": str(exc),
                "bases": [cls.__name__ for cls in type(exc).__mro__]}
    return {"raised": None}


def bad_input_cases(comm, bad_rank):
    """Bad input on one rank, in forward and in backward; each rank reports what it raised
    and whether its state survived unchanged."""
    rank = comm.Get_rank()
    bn = fastbn.SyncBatchNorm(N_CHANNELS, comm=comm, dtype=np.float64)
    x, dy = global_batch(7, 4, False, n=2 * comm.Get_size())
    x, dy = x[2 * rank:2 * rank + 2], dy[2 * rank:2 * rank + 2]
    bn(x)
    dx_good = bn.backward(dy)
    before = _digest(bn.running_mean, bn.running_var, np.int64(bn.num_batches_tracked))
    bad = rank == bad_rank
    report = {}
    wrong_channels = np.zeros((2, N_CHANNELS + 1, 3, 4))
    report["channels"] = _outcome(lambda: bn(wrong_channels if bad else x))
    report["dtype"] = _outcome(lambda: bn(x.astype(np.int64) if bad else x))
    report["dy_shape"] = _outcome(lambda: bn.backward(dy[:1] if bad else dy))
    report["state_unchanged"] = before == _digest(bn.running_mean, bn.running_var,
                                                  np.int64(bn.num_batches_tracked))
    # The last good forward is still what backward differentiates.
    report["backward_after"] = bool(np.array_equal(bn.backward(dy), dx_good))
    # And the module still trains in step with the others.
    bn(x)
    report["later_step_ok"] = bn.num_batches_tracked == 2
    return report
