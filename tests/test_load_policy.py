"""Under load, calls run on the cores other processes leave free (fastbn.kernels.jit).

The scheduler's view comes from /proc; here it is replaced by fixed counts, so these tests
check the choice and its bits without depending on how busy the machine is.
"""

import numba
import numpy as np
import pytest

import fastbn
import fastbn.kernels.jit as jit
from fastbn.kernels.jit import free_cores as real_free_cores

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="Numba has fewer than 2 threads here")


@pytest.fixture
def scheduler(monkeypatch):
    """Set how many threads of other processes are runnable; free_cores sees it at once."""
    monkeypatch.setattr(jit, "free_cores", real_free_cores)
    monkeypatch.setattr(jit, "_CORES", 4)
    monkeypatch.setattr(jit, "_MACHINE_CPUS", 4)
    monkeypatch.setattr(jit, "_load_sample", [-1.0, None, None])
    elsewhere = {"count": 0}
    monkeypatch.setattr(jit, "_running_elsewhere", lambda: elsewhere["count"])

    def set_elsewhere(count):
        elsewhere["count"] = count
        jit._load_sample[0] = -1.0  # sample again on the next call,
        jit._load_sample[2] = None  # as the first reading (see the hysteresis test)
    return set_elsewhere


def test_twin_follows_free_cores(scheduler):
    pair = jit.KernelPair.__new__(jit.KernelPair)
    pair.parallel, pair.serial = "parallel", "serial"
    big = jit.SERIAL_BELOW_ELEMENTS
    with jit.num_threads(2):
        scheduler(0)
        assert pair.select(big) == "parallel"
        scheduler(2)  # two of four cores free: still enough for two threads
        assert pair.select(big) == "parallel"
        scheduler(3)  # one core free: short calls stay on two threads, longer ones go serial
        assert pair.select(big) == "parallel"
        assert pair.select(jit.SHORT_CALL_ELEMENTS - 1) == "parallel"
        assert pair.select(jit.SHORT_CALL_ELEMENTS) == "serial"
        scheduler(9)  # no core free: serial at every size
        assert jit.free_cores() == 0 and pair.select(big) == "serial"
        assert pair.select(big - 1) == "serial"
    with jit.num_threads(min(4, numba.config.NUMBA_NUM_THREADS)):
        if numba.get_num_threads() > 2:
            scheduler(2)
            chosen = pair.select(big)
            assert isinstance(chosen, jit._WithThreads) and chosen.threads == 2
            scheduler(3)  # one core free: a short call takes two threads, not all of them
            chosen = pair.select(big)
            assert isinstance(chosen, jit._WithThreads) and chosen.threads == 2


def test_runnable_threads_count_against_the_whole_machine(scheduler, monkeypatch):
    """In a container /proc/loadavg is the host's: 40 runnable threads on a 64-CPU host leave
    a process pinned to 4 of its cores all 4, not 1."""
    monkeypatch.setattr(jit, "_MACHINE_CPUS", 64)
    scheduler(40)
    assert jit.free_cores() == 4
    scheduler(62)
    assert jit.free_cores() == 2
    scheduler(200)
    assert jit.free_cores() == 0


def test_a_single_busy_reading_is_not_believed(scheduler, monkeypatch):
    """Fewer cores only once two consecutive readings say so: a pool that spins for a few
    milliseconds after its last region must not send calls to the serial twin."""
    readings = iter([0, 3, 0, 3, 3, 3, 0, 0])
    monkeypatch.setattr(jit, "_running_elsewhere", lambda: next(readings))
    seen = []
    for _ in range(8):
        jit._load_sample[0] = -1.0
        seen.append(jit.free_cores())
    assert seen == [4, 4, 4, 4, 1, 1, 4, 4]  # 4 cores, 4 CPUs: 3 elsewhere leave 1


def test_load_is_sampled_at_most_once_per_interval(scheduler, monkeypatch):
    calls = []
    monkeypatch.setattr(jit, "_running_elsewhere", lambda: calls.append(1) or 0)
    for _ in range(100):
        jit.free_cores()
    assert len(calls) == 1


def test_fewer_threads_restores_the_count():
    seen = []

    def kernel(value):
        seen.append(numba.get_num_threads())
        return value

    before = numba.get_num_threads()
    assert jit._WithThreads(kernel, 1)(7) == 7
    assert seen == [1] and numba.get_num_threads() == before


def test_running_elsewhere_reads_the_scheduler():
    count = jit._running_elsewhere()
    assert count is None or count >= 0


@needs_two_threads
@pytest.mark.parametrize("channels_last", [False, True])
def test_busy_machine_gives_the_same_bits(scheduler, channels_last):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 16, 16, 17)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def step():
        bn = fastbn.BatchNorm2d(16 if not channels_last else 17, channels_last=channels_last)
        return [bn(x), bn.backward(dy), bn.running_mean, bn.running_var]

    with jit.num_threads(2):
        scheduler(0)
        idle = step()
        scheduler(3)  # one core free of four: serial twins
        busy = step()
    for a, b in zip(idle, busy):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
