"""Software prefetch for the channels-last statistics pass over tensors read from memory.

The statistics pass is the one pass that only reads, one stream per thread, and the hardware
prefetcher alone kept it at about half the machine's bandwidth once the tensor did not fit in
the cache: channel moments of (32, 56, 56, 64) float32 took 0.79-1.11 ms from memory (23-32
GB/s), and 0.31-0.69 ms asking for each line 16 KB ahead (0.40-0.60 of the time, medians of 60
alternating calls with the cache flushed before each). The passes that read two inputs, or
read one and write one, gained nothing measurable from it and do not use it.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper

# How far ahead a loop step asks for its lines, and from which size on it asks at all: below
# it the data comes from the 32 MiB last-level cache on a repeated call, where the requests
# only cost (a (16, 8, 32, 32, 32) float32 tensor of 16.8 MB was 1.2x slower with them).
PREFETCH_BYTES = 16384
STREAMED_BYTES = 20 << 20
CACHE_LINE_BYTES = 64

_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)


@intrinsic
def prefetch(typingctx, array, index):
    """Ask for the cache line holding array[index] (1-D array), to read, kept in all levels."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = builder.bitcast(builder.gep(ary.data, [args[1]]), _I8P)
        fnty = ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # (address, read = 0, locality = 3: keep in every level, data cache = 1)
        builder.call(fn, [pointer, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                          ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return types.void(array, types.intp), codegen


@helper
def prefetch_distance(flat):
    """Values ahead to prefetch in flat (0: none, when flat is small enough to be read from
    the cache)."""
    if flat.size * flat.itemsize < STREAMED_BYTES:
        return 0
    return PREFETCH_BYTES // flat.itemsize


@helper
def prefetch_values(flat, at, n_values, ahead):
    """Prefetch flat[at + ahead : at + ahead + n_values], one request per cache line."""
    if ahead > 0:
        step = max(1, CACHE_LINE_BYTES // flat.itemsize)
        last = flat.shape[0] - 1
        for p in range(at + ahead, at + ahead + n_values, step):
            prefetch(flat, min(p, last))
