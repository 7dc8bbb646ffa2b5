"""Channels-first kernels on an (N, C, L) view: each (n, c) plane is a contiguous run of L values.

Work is split into fixed items: plane (n, c) cut into runs of `chunk` values. Each item's
partial lands in column n * n_chunks + k of a (C, N * n_chunks) workspace, and a channel's
columns are merged left to right, so results are the same for any thread count.

Two schedules share that partition. `by_block` spreads all items over the threads and suits
few channels. `by_channel` gives each thread whole channels and normalizes a channel right
after reducing it, so the second read of its planes comes from cache while the channel fits
(a few MB); it suits many channels. Both produce identical bits.

Kernels do no validation and allocate nothing: the caller passes every buffer.
"""

import numpy as np
from numba import prange

from ._jit import helper, parallel_kernel
from ._moments import (chan_merge, finish_batch_channel, finish_grad_channel, inverse_std,
                       run_moments, set_affine_coefficients)


@helper
def run_bounds(k, chunk, length):
    lo = k * chunk
    return lo, min(length, lo + chunk)


@helper
def merge_channel_partials(part_mean, part_m2, c, n_items, chunk, length, n_chunks):
    """Merge channel c's item partials in column order: (count, mean, M2)."""
    lo, hi = run_bounds(0, chunk, length)
    count, mean, m2 = np.float64(hi - lo), part_mean[c, 0], part_m2[c, 0]
    for j in range(1, n_items):
        lo, hi = run_bounds(j % n_chunks, chunk, length)
        count, mean, m2 = chan_merge(count, mean, m2, np.float64(hi - lo),
                                     part_mean[c, j], part_m2[c, j])
    return count, mean, m2


# The run helpers take views and loop from 0: see run_moments for why.

@helper
def affine_run(src, dst, shift, alpha, beta):
    for i in range(src.size):
        dst[i] = (src[i] - shift) * alpha + beta


@helper
def grad_sums_run(dy, x, shift):
    """(sum(dy), sum(dy * (x - shift))) over one run, accumulated in float64."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        g = np.float64(dy[i])
        sum_dy += g
        sum_dy_dev += g * np.float64(x[i] - shift)
    return sum_dy, sum_dy_dev


@helper
def grad_input_run(dy, x, dx, shift, k_dy, k_x, k_0):
    for i in range(x.size):
        dx[i] = dy[i] * k_dy + (x[i] - shift) * k_x + k_0


@helper
def eval_grad_run(dy, x, dx, shift, alpha):
    """dx = dy * alpha, and the sums for the parameter gradients, in one pass."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        g = dy[i]
        dx[i] = g * alpha
        g64 = np.float64(g)
        sum_dy += g64
        sum_dy_dev += g64 * np.float64(x[i] - shift)
    return sum_dy, sum_dy_dev


@helper
def item_position(item, n_channels, n_chunks):
    k = item % n_chunks
    plane = item // n_chunks
    return plane // n_channels, plane % n_channels, k


@parallel_kernel
def moments_nchw(x, chunk, part_mean, part_m2, count, mean, m2):
    """Per-channel (count, mean, M2) of x: the partials a cross-process merge exchanges."""
    n_batch, n_channels, length = x.shape
    n_chunks = part_mean.shape[1] // n_batch
    for item in prange(n_batch * n_channels * n_chunks):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        part_mean[c, n * n_chunks + k], part_m2[c, n * n_chunks + k] = run_moments(x[n, c, lo:hi])
    for c in prange(n_channels):
        count[c], mean[c], m2[c] = merge_channel_partials(part_mean, part_m2, c, part_mean.shape[1],
                                                          chunk, length, n_chunks)


@parallel_kernel
def train_forward_nchw_by_block(x, weight, bias, eps, momentum, update, running_mean, running_var,
                                chunk, part_mean, part_m2, save_mean, save_invstd, coef, y):
    n_batch, n_channels, length = x.shape
    n_chunks = part_mean.shape[1] // n_batch
    n_items = n_batch * n_channels * n_chunks
    for item in prange(n_items):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        part_mean[c, n * n_chunks + k], part_m2[c, n * n_chunks + k] = run_moments(x[n, c, lo:hi])
    for c in prange(n_channels):
        count, mean, m2 = merge_channel_partials(part_mean, part_m2, c, part_mean.shape[1], chunk,
                                                 length, n_chunks)
        finish_batch_channel(c, count, mean, m2, eps, momentum, update, running_mean, running_var,
                             weight, bias, save_mean, save_invstd, coef)
    for item in prange(n_items):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        affine_run(x[n, c, lo:hi], y[n, c, lo:hi], coef[0, c], coef[1, c], coef[2, c])


@parallel_kernel
def train_forward_nchw_by_channel(x, weight, bias, eps, momentum, update, running_mean,
                                  running_var, chunk, part_mean, part_m2, save_mean, save_invstd,
                                  coef, y):
    n_batch, n_channels, length = x.shape
    n_chunks = part_mean.shape[1] // n_batch
    for c in prange(n_channels):
        for n in range(n_batch):
            for k in range(n_chunks):
                lo, hi = run_bounds(k, chunk, length)
                part_mean[c, n * n_chunks + k], part_m2[c, n * n_chunks + k] = run_moments(
                    x[n, c, lo:hi])
        count, mean, m2 = merge_channel_partials(part_mean, part_m2, c, part_mean.shape[1], chunk,
                                                 length, n_chunks)
        finish_batch_channel(c, count, mean, m2, eps, momentum, update, running_mean, running_var,
                             weight, bias, save_mean, save_invstd, coef)
        for n in range(n_batch):
            affine_run(x[n, c], y[n, c], coef[0, c], coef[1, c], coef[2, c])


@parallel_kernel
def eval_forward_nchw(x, running_mean, running_var, weight, bias, eps, chunk, coef, y):
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    for c in range(n_channels):
        invstd = inverse_std(np.float64(running_var[c]), eps)
        set_affine_coefficients(coef, c, np.float64(running_mean[c]), invstd,
                                np.float64(weight[c]), np.float64(bias[c]))
    for item in prange(n_batch * n_channels * n_chunks):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        affine_run(x[n, c, lo:hi], y[n, c, lo:hi], coef[0, c], coef[1, c], coef[2, c])


@helper
def sum_channel_partials(part_a, part_b, c):
    total_a = 0.0
    total_b = 0.0
    for j in range(part_a.shape[1]):
        total_a += part_a[c, j]
        total_b += part_b[c, j]
    return total_a, total_b


@parallel_kernel
def train_backward_nchw_by_block(dy, x, save_mean, save_invstd, weight, chunk, part_a, part_b,
                                 coef, grad_weight, grad_bias, dx):
    n_batch, n_channels, length = x.shape
    n_chunks = part_a.shape[1] // n_batch
    n_items = n_batch * n_channels * n_chunks
    count = np.float64(n_batch * length)
    for c in range(n_channels):
        coef[0, c] = save_mean[c]
    for item in prange(n_items):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        part_a[c, n * n_chunks + k], part_b[c, n * n_chunks + k] = grad_sums_run(
            dy[n, c, lo:hi], x[n, c, lo:hi], coef[0, c])
    for c in prange(n_channels):
        sum_dy, sum_dy_dev = sum_channel_partials(part_a, part_b, c)
        finish_grad_channel(c, count, sum_dy, sum_dy_dev, save_mean[c], save_invstd[c], weight,
                            grad_weight, grad_bias, coef)
    for item in prange(n_items):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        grad_input_run(dy[n, c, lo:hi], x[n, c, lo:hi], dx[n, c, lo:hi], coef[0, c], coef[1, c],
                       coef[2, c], coef[3, c])


@parallel_kernel
def train_backward_nchw_by_channel(dy, x, save_mean, save_invstd, weight, chunk, part_a, part_b,
                                   coef, grad_weight, grad_bias, dx):
    n_batch, n_channels, length = x.shape
    n_chunks = part_a.shape[1] // n_batch
    count = np.float64(n_batch * length)
    for c in prange(n_channels):
        coef[0, c] = save_mean[c]
        for n in range(n_batch):
            for k in range(n_chunks):
                lo, hi = run_bounds(k, chunk, length)
                part_a[c, n * n_chunks + k], part_b[c, n * n_chunks + k] = grad_sums_run(
                    dy[n, c, lo:hi], x[n, c, lo:hi], coef[0, c])
        sum_dy, sum_dy_dev = sum_channel_partials(part_a, part_b, c)
        finish_grad_channel(c, count, sum_dy, sum_dy_dev, save_mean[c], save_invstd[c], weight,
                            grad_weight, grad_bias, coef)
        for n in range(n_batch):
            grad_input_run(dy[n, c], x[n, c], dx[n, c], coef[0, c], coef[1, c],
                           coef[2, c], coef[3, c])


@parallel_kernel
def eval_backward_nchw(dy, x, mean, invstd, weight, chunk, part_a, part_b, coef, grad_weight,
                       grad_bias, dx):
    """Gradient of the fixed affine map y = (x - mean) * invstd * w + b, in one fused pass."""
    n_batch, n_channels, length = x.shape
    n_chunks = part_a.shape[1] // n_batch
    for c in range(n_channels):
        coef[0, c] = mean[c]
        coef[1, c] = np.float64(weight[c]) * invstd[c]
    for item in prange(n_batch * n_channels * n_chunks):
        n, c, k = item_position(item, n_channels, n_chunks)
        lo, hi = run_bounds(k, chunk, length)
        part_a[c, n * n_chunks + k], part_b[c, n * n_chunks + k] = eval_grad_run(
            dy[n, c, lo:hi], x[n, c, lo:hi], dx[n, c, lo:hi], coef[0, c], coef[1, c])
    for c in prange(n_channels):
        sum_dy, sum_dy_dev = sum_channel_partials(part_a, part_b, c)
        grad_weight[c] = (sum_dy_dev - (mean[c] - np.float64(coef[0, c])) * sum_dy) * invstd[c]
        grad_bias[c] = sum_dy
