"""Numba kernels: pure arithmetic on buffers the functional layer validated and planned.

One module per layout (nchw: long channel planes, nchw_short: short planes, nhwc: rows of C
channels), the per-channel moment arithmetic they share (moments), and the compilation and
thread policy (jit). Nothing here validates input or decides allocation.
"""
