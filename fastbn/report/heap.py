"""glibc's heap trimming, and the page faults it puts into the timings of allocating calls.

glibc's malloc serves a large block from fresh memory whenever it has just given memory back to
the kernel: blocks above M_MMAP_THRESHOLD (which adapts, up to 32 MiB) are mapped and unmapped
one by one, and once M_TRIM_THRESHOLD bytes are free at the top of the heap it shrinks the
heap. The next call that allocates its output then faults the output's pages in, one 4 KiB
page at a time, each zeroed by the kernel. Which calls pay this depends on the order of
everything the process allocates and frees, not on the batch norm: in the report's loop
torch's channels-last backward of (32, 64, 56, 56) faulted 6,239 pages per call and took
7.34 ms, against 1.83 ms once the heap was kept, while fastbn's NumPy module calls faulted
none either way. So the timing processes keep freed memory in their heaps (the two settings
below, which the README also recommends for training), and ``time_op`` counts the page faults
of the calls it times, so that a report shows when allocation, not the op, was timed.
"""

import ctypes
import ctypes.util

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# glibc's environment form of the settings, for child processes (read when they start).
KEPT_HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                 "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_heap():
    """Apply KEPT_HEAP_ENV to this already running process through mallopt; True when glibc
    took both settings, False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(KEPT_HEAP_ENV["MALLOC_MMAP_THRESHOLD_"]))
                and mallopt(_M_TRIM_THRESHOLD, int(KEPT_HEAP_ENV["MALLOC_TRIM_THRESHOLD_"])))


def minor_faults():
    """Page faults this process has taken so far that needed no disk (fresh or reclaimed
    pages), or None where the platform does not count them."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
