"""Determinism across repeated runs, Python threads, fork, spawn, copy and pickle.

Thread counts 1 vs 2 are covered in test_determinism.py. Here: repeated runs are bitwise
identical; four Python threads running separate modules at once match serial runs; a child made
by os.fork() or multiprocessing after the parent ran a *parallel* kernel computes the same bits
(a crash or hang of the child is detected through its exit status or a timeout); 'spawn' works;
and modules survive copy.deepcopy and pickle.
"""

import copy
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import fastbn
from fastbn.kernels import jit as _jit

# >= 32768 elements, so the parallel kernel twins run (smaller inputs use the serial ones).
BIG_SHAPE = (8, 6, 32, 28)
CHILD_TIMEOUT = 120.0


def _rng(*key):
    return np.random.default_rng(list(key) or [0])


def _physical(shape, channels_last):
    return (shape[0],) + shape[2:] + (shape[1],) if channels_last else shape


def train_steps(seed, channels_last=False, shape=BIG_SHAPE, steps=3, momentum=0.1):
    """Run a fresh BatchNorm2d for a few train steps and one eval step; return every result."""
    rng = _rng(seed, channels_last)
    n_channels = shape[1]
    bn = fastbn.BatchNorm2d(n_channels, momentum=momentum, channels_last=channels_last)
    bn.weight[...] = rng.uniform(0.5, 2.0, n_channels)
    bn.bias[...] = rng.standard_normal(n_channels)
    physical = _physical(shape, channels_last)
    results = []
    for step in range(steps):
        x = (rng.standard_normal(physical) * (step + 1) + step).astype(np.float32)
        dy = rng.standard_normal(physical).astype(np.float32)
        results += [bn(x), bn.backward(dy), bn.grad_weight.copy(), bn.grad_bias.copy()]
    results += [bn.running_mean.copy(), bn.running_var.copy()]
    bn.eval()
    results += [bn(x), bn.backward(dy), bn.grad_weight.copy(), bn.grad_bias.copy()]
    return results


def assert_bitwise_equal(got, expected):
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, index
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"result {index} differs"


def _parallel_pool_started():
    from numba.np.ufunc import parallel

    return parallel._is_initialized


# ----------------------------------------------------------------------------- repeated runs

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [BIG_SHAPE, (3, 5, 7, 6), (4096, 9, 1, 1)],
                         ids=["parallel", "serial", "rows"])
def test_repeated_runs_are_bitwise_identical(shape, channels_last):
    first = train_steps(1, channels_last, shape)
    for _ in range(3):
        assert_bitwise_equal(train_steps(1, channels_last, shape), first)


def test_same_module_same_batch_same_bits():
    rng = _rng(2)
    x = rng.standard_normal(BIG_SHAPE).astype(np.float32)
    dy = rng.standard_normal(BIG_SHAPE).astype(np.float32)
    bn = fastbn.BatchNorm2d(BIG_SHAPE[1], track_running_stats=False)
    first = [bn(x), bn.backward(dy)]
    for _ in range(5):
        assert_bitwise_equal([bn(x), bn.backward(dy)], first)


# ----------------------------------------------------------------------------- threads

@pytest.mark.parametrize("channels_last", [False, True])
def test_four_threads_match_serial_runs(channels_last):
    seeds = [10, 11, 12, 13]
    serial = [train_steps(seed, channels_last, steps=4) for seed in seeds]
    for _ in range(2):
        barrier = threading.Barrier(len(seeds))
        results = [None] * len(seeds)
        errors = []

        def work(i):
            try:
                barrier.wait()
                results[i] = train_steps(seeds[i], channels_last, steps=4)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(seeds))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=CHILD_TIMEOUT)
        assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
        assert not errors, errors
        for got, expected in zip(results, serial):
            assert_bitwise_equal(got, expected)


def _run_python(code, env_extra, timeout=CHILD_TIMEOUT):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


THREADS_SCRIPT = """
    import threading, numba, numpy as np, fastbn
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((8, 6, 32, 28)).astype(np.float32) for _ in range(4)]
    def run(x):
        bn = fastbn.BatchNorm2d(6)
        out = []
        for _ in range(10):
            out += [bn(x), bn.backward(x)]
        return out + [bn.running_mean, bn.running_var]
    serial = [run(x) for x in xs]
    results = [None] * 4
    barrier = threading.Barrier(4)
    def work(i):
        barrier.wait()
        results[i] = run(xs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    same = all(np.array_equal(a, b) for s, r in zip(serial, results) for a, b in zip(s, r))
    print(numba.threading_layer(), numba.config.THREADING_LAYER, same)
"""


def test_threads_under_the_workqueue_layer():
    # workqueue aborts the process if two threads enter it at once; fastbn must never do that,
    # and must leave the host's choice of layer alone.
    done = _run_python(THREADS_SCRIPT, {"NUMBA_THREADING_LAYER": "workqueue"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workqueue", "workqueue", "True"]


def test_fastbn_changes_no_global_numba_setting():
    code = """
        import numba
        before = (numba.config.THREADING_LAYER, numba.config.THREADING_LAYER_PRIORITY,
                  numba.get_num_threads())
        import numpy as np, fastbn
        bn = fastbn.BatchNorm2d(6)
        bn(np.ones((8, 6, 32, 28), np.float32))
        after = (numba.config.THREADING_LAYER, numba.config.THREADING_LAYER_PRIORITY,
                 numba.get_num_threads())
        print(before == after)
    """
    done = _run_python(code, {})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


# ----------------------------------------------------------------------------- fork / spawn

def _child_results(seed, channels_last):
    """Work a child does: module training with parallel-sized input, and functional calls."""
    return train_steps(seed, channels_last)


@pytest.fixture
def parent_ran_parallel_kernels():
    """The parent has run fastbn's parallel kernels, so its thread pool is live."""
    expected = {cl: train_steps(20, cl) for cl in (False, True)}
    assert _parallel_pool_started()
    assert _jit.parallel_is_safe()
    return expected


def _wait_for(pid, timeout=CHILD_TIMEOUT):
    """The child's exit code; kill it and fail if it takes longer than timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child did not finish within {timeout} s")


def _fork():
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads (Numba's pool is one).
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_os_fork_child_after_parallel_kernels(parent_ran_parallel_kernels):
    expected = parent_ran_parallel_kernels
    pid = _fork()
    if pid == 0:  # child: never return into pytest
        code = 70
        try:
            ok = all(_arrays_equal(_child_results(20, cl), expected[cl]) for cl in (False, True))
            code = 0 if ok else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    exit_code = _wait_for(pid)
    assert exit_code == 0, {1: "child computed different results", 2: "child raised",
                            -signal.SIGABRT: "child aborted"}.get(exit_code, exit_code)
    # The parent still works after the fork.
    assert_bitwise_equal(train_steps(20, False), expected[False])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_grandchild_of_fork(parent_ran_parallel_kernels):
    expected = parent_ran_parallel_kernels[True]
    pid = _fork()
    if pid == 0:
        code = 70
        try:
            ok = _arrays_equal(_child_results(20, True), expected)
            grandchild = _fork()
            if grandchild == 0:
                os._exit(0 if _arrays_equal(_child_results(20, True), expected) else 1)
            _, status = os.waitpid(grandchild, 0)
            code = 0 if ok and os.waitstatus_to_exitcode(status) == 0 else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    assert _wait_for(pid) == 0


def _arrays_equal(got, expected):
    return len(got) == len(expected) and all(
        a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        for a, b in zip(got, expected))


def _pool_results(method, jobs):
    context = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = context.Pool(2)
    try:
        pending = [pool.apply_async(_child_results, job) for job in jobs]
        # A worker that dies is replaced silently and its result never arrives: the timeout
        # turns that into a failure instead of a hang.
        return [result.get(timeout=CHILD_TIMEOUT) for result in pending]
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_multiprocessing_fork_after_parallel_kernels(parent_ran_parallel_kernels):
    expected = parent_ran_parallel_kernels
    jobs = [(20, False), (20, True), (20, False), (20, True)]
    for (_, channels_last), got in zip(jobs, _pool_results("fork", jobs)):
        assert_bitwise_equal(got, expected[channels_last])


def test_multiprocessing_spawn(parent_ran_parallel_kernels):
    expected = parent_ran_parallel_kernels
    jobs = [(20, False), (20, True)]
    for (_, channels_last), got in zip(jobs, _pool_results("spawn", jobs)):
        assert_bitwise_equal(got, expected[channels_last])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_under_the_workqueue_layer():
    code = """
        import os, numpy as np, fastbn
        x = np.random.default_rng(0).standard_normal((8, 6, 32, 28)).astype(np.float32)
        def run():
            bn = fastbn.BatchNorm2d(6)
            return bn(x), bn.backward(x)
        expected = run()
        pid = os.fork()
        if pid == 0:
            got = run()
            os._exit(0 if all(np.array_equal(a, b) for a, b in zip(got, expected)) else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """
    done = _run_python(code, {"NUMBA_THREADING_LAYER": "workqueue"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"


# ----------------------------------------------------------------------------- copy / pickle

def _trained_module(channels_last=False):
    rng = _rng(30, channels_last)
    bn = fastbn.BatchNorm2d(6, momentum=None, eps=1e-3, channels_last=channels_last,
                            dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 2.0, 6)
    bn.bias[...] = rng.standard_normal(6)
    shape = _physical((4, 6, 5, 7), channels_last)
    for _ in range(3):
        x = rng.standard_normal(shape)
        bn(x)
        bn.backward(x)
    return bn, rng, shape


def _assert_same_module(copied, original):
    assert type(copied) is type(original)
    for key in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                "channels_last", "dtype", "training", "num_batches_tracked"):
        assert getattr(copied, key) == getattr(original, key), key
    for key in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        a, b = getattr(copied, key), getattr(original, key)
        assert a is not b and a.dtype == b.dtype and np.array_equal(a, b), key
    assert repr(copied) == repr(original)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_state_and_continue_identically(how, channels_last):
    original, rng, shape = _trained_module(channels_last)
    original.eval()
    if how == "deepcopy":
        copied = copy.deepcopy(original)
    else:
        copied = pickle.loads(pickle.dumps(original, protocol=pickle.HIGHEST_PROTOCOL))
    _assert_same_module(copied, original)

    # The input saved for backward is not copied (torch never pickles autograd state).
    assert copied._saved is None and original._saved is not None
    with pytest.raises(RuntimeError, match="before forward"):
        copied.backward(np.ones(shape))
    original.backward(np.ones(shape))  # the original keeps it

    # Both continue identically, and independently.
    for module in (original, copied):
        module.train()
    x = rng.standard_normal(shape)
    assert np.array_equal(copied(x), original(x))
    assert np.array_equal(copied.backward(x), original.backward(x))
    assert np.array_equal(copied.running_var, original.running_var)
    copied.weight[0] += 1
    assert copied.weight[0] != original.weight[0]


def test_shallow_copy_shares_arrays_like_any_python_object():
    original, _, _ = _trained_module()
    shallow = copy.copy(original)
    assert shallow.running_mean is original.running_mean
    assert shallow._saved is None


def test_pickle_of_a_module_without_affine_or_tracking():
    bn = fastbn.BatchNorm1d(4, affine=False, track_running_stats=False)
    bn(np.ones((3, 4)) * np.arange(3)[:, None])
    copied = pickle.loads(pickle.dumps(bn))
    assert copied.weight is None and copied.running_mean is None
    assert copied.num_batches_tracked is None and copied._saved is None


# ----------------------------------------------------------------------------- long run

@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_long_run_memory_and_running_statistics(channels_last):
    import longrun  # tests/longrun.py, also a script

    lines = []
    ok, numbers = longrun.run(10_000, channels_last, report=lines.append)
    print("\n".join(lines))
    assert numbers["rss_growth_mb"] < longrun.RSS_LIMIT_MB, lines
    assert numbers["mean_error"] <= longrun.STAT_TOLERANCE, lines
    assert numbers["var_rel_error"] <= longrun.STAT_TOLERANCE, lines
    assert ok
