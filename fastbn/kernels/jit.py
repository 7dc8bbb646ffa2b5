"""How fastbn compiles its kernels, and when it may run them in parallel.

Every kernel is compiled twice from one Python function: a parallel twin and a serial twin.
The serial twin serves inputs too small to pay for a parallel-region launch, and processes
forked from a parent whose GNU OpenMP pool is live (such a child is killed the moment it
enters a parallel region). Both twins walk the same fixed work partition and merge in the
same order, so they give bitwise identical results.

Nothing here changes a global Numba setting: the threading layer stays whatever the host
application (or Numba's own default) chose. Instead, each call picks a twin that is safe under
that layer:

- tbb, or omp in a process that never forked after starting its pool: the parallel twin, from
  any number of Python threads at once.
- omp in a child forked after the parent's GNU OpenMP pool started: the serial twin, because
  GNU OpenMP kills such a child in its next parallel region. Installing ``tbb`` (the
  ``fastbn[tbb]`` extra) makes Numba pick TBB by default and keeps forked children parallel.
- workqueue (Numba's fallback when neither TBB nor OpenMP loads): the parallel twin for one
  thread at a time; a thread that finds the pool busy runs the serial twin, since workqueue
  aborts the process when two threads enter it.

Under load (see ``free_cores``), a call runs on the cores other processes leave free: the
serial twin when none is free, or when one is and the call is not short (SHORT_CALL_ELEMENTS).
A parallel region ends when its last thread does, so a thread that the scheduler has taken off
its core stalls the whole region for a time slice (4 ms here), once per region a call enters.
"""

import hashlib
import os
import pickle
import threading
import time
import types
from contextlib import contextmanager

import numba
from numba import njit
from numba.core.caching import FunctionCache

# Kernels and their inlined helpers use no fast-math flags: their arithmetic is exactly what
# the source says, and NaN and inf propagate as in PyTorch. The only exception is the `run_*`
# reductions (see `reduction`).
FASTMATH = False
# Reassociation lets LLVM vectorize a float64 sum with several accumulators (4-5x faster than
# any order spelled out in the source). It is confined to small functions compiled on their
# own, so the serial and parallel twins call the same code and agree to the bit.
REDUCTION_FASTMATH = {"reassoc"}

# Division by zero gives inf or NaN, as in NumPy, instead of raising: Python's error model
# guards every float division with a branch that keeps LLVM from vectorizing the per-channel
# loops (sqrt and divide over 1024 channels took 4 us scalar, 1.4 us vectorized). No kernel
# divides by a value that can be zero for validated input, so no result changes.
ERROR_MODEL = "numpy"

# Below this many elements a parallel-region launch costs more than the work itself.
SERIAL_BELOW_ELEMENTS = 1 << 15
# With one core left free by other processes, a call below this many elements still runs on
# two threads: its regions (up to a few hundred microseconds) mostly end before the scheduler
# hands the shared core back to the busy process. Beside one busy process (python -m fastbn
# --under-load), module calls on (128, 1024) and (1024, 1024) took 0.81-1.33x and 0.99-1.08x
# their time alone this way, against 1.35-1.53x in the serial twins; calls on (32, 64, 56, 56),
# which last milliseconds, took 1.06-1.66x in the serial twins and 0.85-7.4x in torch's
# parallel kernels, so larger calls go serial.
SHORT_CALL_ELEMENTS = 1 << 20

_forked_child = False
_pool_lock = threading.Lock()
_exclusive_pool = None  # known once the pool has started


def _mark_forked_child():
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


# Kernels inline helpers from other modules, but Numba invalidates a cached kernel only when
# the kernel's own file changes. Keying every kernel's cache entry on all of these sources too
# means an edited helper can never be served from a stale cache. Every module of this package
# counts, so a kernel module added later is covered without being listed.
_source_digest = None


def _kernel_source_digest():
    global _source_digest
    if _source_digest is None:
        digest = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
            with open(os.path.join(here, name), "rb") as source:
                digest.update(source.read())
        _source_digest = digest.hexdigest()
    return _source_digest


class _SourceKeyedCache(FunctionCache):
    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (_kernel_source_digest(),)

    def load_overload(self, sig, target_context):
        # Numba unpickles a cache index before it checks whether the index is stale, so an
        # index written by another version of fastbn, whose signatures name a class that no
        # longer exists, would raise here on every call. Such an index can never match: start
        # it afresh, and let the kernel compile and be cached again.
        try:
            return super().load_overload(sig, target_context)
        except (AttributeError, ImportError, pickle.UnpicklingError):
            self.flush()
            return None


def _cached_njit(py_func, **options):
    dispatcher = njit(error_model=ERROR_MODEL, **options)(py_func)
    dispatcher._cache = _SourceKeyedCache(py_func)
    return dispatcher


class KernelPair:
    """A parallel and a serial compilation of one kernel function."""

    __slots__ = ("parallel", "serial", "__name__")

    def __init__(self, py_func):
        # Numba keys its on-disk cache by qualified name only, not by compile flags, so the
        # serial twin needs a name of its own or the two would overwrite each other's cache.
        serial_func = types.FunctionType(
            py_func.__code__, py_func.__globals__, py_func.__name__ + "_serial",
            py_func.__defaults__, py_func.__closure__,
        )
        serial_func.__qualname__ = py_func.__qualname__ + "_serial"
        serial_func.__doc__ = py_func.__doc__
        self.parallel = _cached_njit(py_func, parallel=True, nogil=True, fastmath=FASTMATH)
        self.serial = _cached_njit(serial_func, parallel=False, nogil=True, fastmath=FASTMATH)
        self.__name__ = py_func.__name__

    def select(self, n_elements):
        """The twin to run for a tensor of n_elements."""
        if n_elements < SERIAL_BELOW_ELEMENTS or not parallel_is_safe():
            return self.serial
        free = free_cores()
        if free is not None and free < numba.get_num_threads():
            if free == 0 or (free == 1 and n_elements >= SHORT_CALL_ELEMENTS):
                return self.serial
            threads = max(free, 2)
            if threads < numba.get_num_threads():
                return _WithThreads(self.parallel, threads)
        if pool_is_exclusive():
            return self._parallel_unless_busy
        return self.parallel

    def _parallel_unless_busy(self, *args):
        # The workqueue layer aborts the whole process when a second thread enters it. A thread
        # that finds the pool busy runs the serial twin instead, which gives the same bits.
        if _pool_lock.acquire(blocking=False):
            try:
                return self.parallel(*args)
            finally:
                _pool_lock.release()
        return self.serial(*args)


class _WithThreads:
    """A parallel twin run with fewer threads than Numba's count (restored afterwards); the
    partition does not depend on the thread count, so neither do the bits."""

    __slots__ = ("kernel", "threads")

    def __init__(self, kernel, threads):
        self.kernel, self.threads = kernel, threads

    def __call__(self, *args):
        with num_threads(self.threads):
            return self.kernel(*args)


# How often free_cores looks at the scheduler again: reading /proc costs 10-40 us on a quiet
# loop, and far more inside a model, where each batch-norm call finds the caches cold after a
# convolution: in a ResNet-18-shaped training step (fastbn.torch, channels-first) the kernel
# choice took 8-9 us per call at the median but 40-50 us on average, 1.8 ms of a 290 ms step,
# with a reading every 0.05 s. Other processes' load lasts seconds, so a quarter second still
# follows it.
LOAD_SAMPLE_S = 0.25
_load_sample = [-1.0, None, None]  # (when, free cores, the reading before)
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
# /proc/loadavg counts the runnable threads of the whole machine, and inside a container of
# the whole host: they compete for all the host's CPUs, not only for the cores this process
# may use. Counting them against the host's CPUs keeps a container pinned to 2 cores of a busy
# 64-CPU host parallel instead of serial.
_MACHINE_CPUS = os.cpu_count() or _CORES


def _running_elsewhere():
    """Runnable threads of other processes right now, from /proc (Linux), or None.

    /proc/loadavg counts every runnable thread on the machine; this process's own (the caller,
    and OpenMP workers still spinning after the last region) are subtracted, as they are the
    ones a call would run on.
    """
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                # The state letter follows the command name, which is in parentheses.
                own += f.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def free_cores():
    """Cores the scheduler leaves this process, sampled at most every LOAD_SAMPLE_S; None
    where that cannot be known (no /proc).

    Fewer cores are reported only when two consecutive readings agree: the larger of the last
    two is returned. Another process's OpenMP pool keeps spinning for a few milliseconds after
    its last parallel region, and a single reading taken then would send the next
    LOAD_SAMPLE_S of calls to the serial twin. On a quiet machine, beside a torch process that
    had just finished a call, that was 663 of 1664 calls in `python -m fastbn --quick` over
    three shapes, at up to 2x their parallel time. Busy processes stay busy across readings.
    """
    now = time.monotonic()
    if now - _load_sample[0] >= LOAD_SAMPLE_S:
        elsewhere = _running_elsewhere()
        reading = (None if elsewhere is None
                   else max(0, min(_CORES, _MACHINE_CPUS - elsewhere)))
        before, _load_sample[2] = _load_sample[2], reading
        _load_sample[0] = now
        _load_sample[1] = (reading if before is None or reading is None
                           else max(before, reading))
    return _load_sample[1]


def reduction(py_func):
    """Decorator for a hot 1-D reduction loop: compiled as a function of its own (never inlined
    at Numba IR level) with reassociation allowed, so that every kernel twin runs the same
    vectorized code. It must only reorder sums; nnan/ninf stay off."""
    return njit(nogil=True, fastmath=REDUCTION_FASTMATH, error_model=ERROR_MODEL)(py_func)


def parallel_kernel(py_func):
    """Decorator: compile py_func as a KernelPair (lazily, on first call of each twin)."""
    return KernelPair(py_func)


def helper(py_func):
    """Decorator for the small functions kernels are built from.

    They are inlined into each kernel at Numba IR level rather than compiled as functions of
    their own: separate compilation of every helper for every signature was two thirds of a
    kernel's cold-start compile time. Inlined code takes the kernel's fast-math flags, which
    never include nnan/ninf, so the helpers' inf and NaN tests keep their meaning.
    """
    return njit(nogil=True, fastmath=FASTMATH, error_model=ERROR_MODEL, inline="always")(py_func)



def parallel_is_safe():
    """False in a child forked from a process whose GNU OpenMP pool had already started.

    GNU OpenMP cannot survive fork(): Numba aborts such a child when it next enters a parallel
    region. TBB and the workqueue layer are fork-safe, and a child forked before any parallel
    kernel ran starts its pool from scratch, so only this one case needs the serial twins.
    """
    if not _forked_child:
        return True
    layer = _active_layer()
    # Intel's OpenMP is fork-safe, but Numba does not say which vendor it loaded; staying
    # serial in this rare case costs speed, never correctness.
    return layer != "omp"


def pool_is_exclusive():
    """True when the threading layer must not be entered by two threads at once.

    Only the workqueue layer (Numba's fallback where neither TBB nor OpenMP loads) is like
    that. Before the first parallel launch the layer is unknown, so that launch is guarded too.
    """
    global _exclusive_pool
    if _exclusive_pool is None:
        layer = _active_layer()
        if layer is None:
            return True
        _exclusive_pool = layer == "workqueue"
    return _exclusive_pool


def _active_layer():
    """The threading layer Numba's pool runs on, or None before the pool has started."""
    from numba.np.ufunc import parallel as _parallel

    if not _parallel._is_initialized:
        return None
    try:
        return numba.threading_layer()
    except ValueError:
        return None


@contextmanager
def num_threads(n):
    """Run a block with n Numba threads, restoring the previous count afterwards."""
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
