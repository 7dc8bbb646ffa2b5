"""Channels-first kernels on an (N, C, L) view: each (n, c) plane is a contiguous run of L values.

Work is split into fixed items of about ITEM_VALUES values of one channel: a run of `chunk`
values of one plane when planes are long, or `group` whole planes when they are short. Item j
of channel c (j = g * n_chunks + k: plane group g, chunk k) leaves its partial in column j of a
(C, items_per_channel) workspace, and a channel's columns are merged left to right, so results
are the same for any thread count.

Two schedules share that partition. `by_block` runs all items of all channels in one parallel
region, merges serially, and normalizes in a second region; it suits few channels. `by_channel`
gives each thread whole channels and normalizes a channel right after reducing it, one region
in all, so the second read of a channel's planes can come from cache. Both give identical bits.

Kernels do no validation and allocate nothing: the caller passes every buffer. Each takes the
storage format `fmt` of its data arrays first (see lowp).
"""

import numpy as np
from numba import prange

from .jit import helper, parallel_kernel
from .lowp import decode, encode
from .moments import (centered_grad_sums, chan_merge, eval_coefficients, finish_batch_stats,
                       finish_grads, finite_or_zero, given_grad_coefficients,
                       given_stats_coefficients, grad_or_masked, output_value,
                       relu_mask_coefficients, run_eval_grad, run_grad_sums, run_moment_sums,
                       run_relu_eval_grad, run_relu_grad_sums, shifted_moments)


@helper
def item_extent(j, group, chunk, n_batch, length):
    """Planes [n0, n1) and values [lo, hi) of a channel's item j."""
    n_chunks = (length + chunk - 1) // chunk
    g = j // n_chunks
    k = j - g * n_chunks
    n0 = g * group
    lo = k * chunk
    return n0, min(n_batch, n0 + group), lo, min(length, lo + chunk)


@helper
def item_count(j, group, chunk, n_batch, length):
    n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
    return np.float64((n1 - n0) * (hi - lo))


@helper
def item_moments(fmt, x, c, n0, n1, lo, hi):
    """(mean, M2) of one item, in one pass with the item's first value as shift."""
    shift = finite_or_zero(np.float64(decode(fmt, x[n0, c, lo])))
    sum_d = 0.0
    sum_d2 = 0.0
    for n in range(n0, n1):
        run_d, run_d2 = run_moment_sums(fmt, x[n, c, lo:hi], shift)
        sum_d += run_d
        sum_d2 += run_d2
    return shifted_moments(shift, np.float64((n1 - n0) * (hi - lo)), sum_d, sum_d2)


@helper
def merge_channels(part_mean, part_m2, c0, c1, group, chunk, n_batch, length):
    """Merge each channel's item partials in column order into column 0; return the count.

    One call covers a range of channels: Numba's reference counting of array arguments costs
    more than a merge when paid per channel (see moments).
    """
    count = item_count(0, group, chunk, n_batch, length)
    for c in range(c0, c1):
        count = item_count(0, group, chunk, n_batch, length)
        mean = part_mean[c, 0]
        m2 = part_m2[c, 0]
        for j in range(1, part_mean.shape[1]):
            count, mean, m2 = chan_merge(count, mean, m2,
                                         item_count(j, group, chunk, n_batch, length),
                                         part_mean[c, j], part_m2[c, j])
        part_mean[c, 0] = mean
        part_m2[c, 0] = m2
    return count


@helper
def affine_item(fmt, x, y, c, n0, n1, lo, hi, shift, alpha, beta, relu):
    """y = (x - shift) * alpha + beta, or its ReLU when relu, over one item."""
    for n in range(n0, n1):
        src = x[n, c, lo:hi]
        dst = y[n, c, lo:hi]
        for i in range(src.size):
            dst[i] = encode(fmt, output_value(relu, (decode(fmt, src[i]) - shift) * alpha
                                              + beta))


@helper
def grad_sums_item(fmt, dy, x, c, n0, n1, lo, hi, shift, relu, alpha, beta):
    """(sum(dy), sum(dy * (x - shift))) over one item, accumulated in float64; with relu, of
    dy masked by the forward's ReLU (alpha and beta are the forward's)."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for n in range(n0, n1):
        if relu:
            run_dy, run_dy_dev = run_relu_grad_sums(fmt, dy[n, c, lo:hi], x[n, c, lo:hi], shift,
                                                    alpha, beta)
        else:
            run_dy, run_dy_dev = run_grad_sums(fmt, dy[n, c, lo:hi], x[n, c, lo:hi], shift)
        sum_dy += run_dy
        sum_dy_dev += run_dy_dev
    return sum_dy, sum_dy_dev


@helper
def grad_input_item(fmt, dy, x, dx, c, n0, n1, lo, hi, shift, k_dy, k_x, k_0, relu, alpha, beta):
    for n in range(n0, n1):
        grad = dy[n, c, lo:hi]
        src = x[n, c, lo:hi]
        dst = dx[n, c, lo:hi]
        for i in range(src.size):
            value = decode(fmt, src[i])
            masked = grad_or_masked(relu, decode(fmt, grad[i]), value, shift, alpha, beta)
            dst[i] = encode(fmt, masked * k_dy + (value - shift) * k_x + k_0)


@helper
def eval_grad_item(fmt, dy, x, dx, c, n0, n1, lo, hi, shift, alpha, relu, mask_alpha, mask_beta):
    """dx = dy * alpha, and the sums for the parameter gradients, in one pass; with relu, of
    dy masked by the forward's ReLU."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for n in range(n0, n1):
        if relu:
            run_dy, run_dy_dev = run_relu_eval_grad(fmt, dy[n, c, lo:hi], x[n, c, lo:hi],
                                                    dx[n, c, lo:hi], shift, alpha, mask_alpha,
                                                    mask_beta)
        else:
            run_dy, run_dy_dev = run_eval_grad(fmt, dy[n, c, lo:hi], x[n, c, lo:hi],
                                               dx[n, c, lo:hi], shift, alpha)
        sum_dy += run_dy
        sum_dy_dev += run_dy_dev
    return sum_dy, sum_dy_dev


@helper
def sum_channels(part_a, part_b, c0, c1):
    """Each channel's item sums, in column order, into column 0."""
    for c in range(c0, c1):
        total_a = 0.0
        total_b = 0.0
        for j in range(part_a.shape[1]):
            total_a += part_a[c, j]
            total_b += part_b[c, j]
        part_a[c, 0] = total_a
        part_b[c, 0] = total_b


# Items are numbered channel-major inside a plane group (item = (g * C + c) * n_chunks + k),
# so that consecutive items of a parallel loop touch neighbouring memory.
@helper
def item_of(item, n_channels, n_chunks):
    """(channel, column) of a global item index."""
    k = item % n_chunks
    gc = item // n_chunks
    c = gc % n_channels
    return c, (gc // n_channels) * n_chunks + k


@parallel_kernel
def moments_nchw(fmt, x, group, chunk, part_mean, part_m2, count, mean, m2):
    """Per-channel (count, mean, M2) of x: the partials a cross-process merge exchanges."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    for item in prange(n_channels * part_mean.shape[1]):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        part_mean[c, j], part_m2[c, j] = item_moments(fmt, x, c, n0, n1, lo, hi)
    total = merge_channels(part_mean, part_m2, 0, n_channels, group, chunk, n_batch, length)
    for c in range(n_channels):
        count[c], mean[c], m2[c] = total, part_mean[c, 0], part_m2[c, 0]


@parallel_kernel
def train_forward_nchw_by_block(fmt, x, weight, bias, eps, momentum, update, running_mean,
                                running_var, group, chunk, part_mean, part_m2, save_mean,
                                save_invstd, coef, relu, y):
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    n_items = n_channels * part_mean.shape[1]
    for item in prange(n_items):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        part_mean[c, j], part_m2[c, j] = item_moments(fmt, x, c, n0, n1, lo, hi)
    # Serial on purpose: a few merges per channel cost less than another parallel region.
    count = merge_channels(part_mean, part_m2, 0, n_channels, group, chunk, n_batch, length)
    finish_batch_stats(0, n_channels, count, part_mean[:, 0], part_m2[:, 0], eps, momentum,
                       update, running_mean, running_var, weight, bias, save_mean, save_invstd,
                       coef)
    for item in prange(n_items):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        affine_item(fmt, x, y, c, n0, n1, lo, hi, coef[0, c], coef[1, c], coef[2, c], relu)


@parallel_kernel
def train_forward_nchw_by_channel(fmt, x, weight, bias, eps, momentum, update, running_mean,
                                  running_var, group, chunk, part_mean, part_m2, save_mean,
                                  save_invstd, coef, relu, y):
    n_batch, n_channels, length = x.shape
    for c in prange(n_channels):
        for j in range(part_mean.shape[1]):
            n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
            part_mean[c, j], part_m2[c, j] = item_moments(fmt, x, c, n0, n1, lo, hi)
        count = merge_channels(part_mean, part_m2, c, c + 1, group, chunk, n_batch, length)
        finish_batch_stats(c, c + 1, count, part_mean[:, 0], part_m2[:, 0], eps, momentum,
                           update, running_mean, running_var, weight, bias, save_mean,
                           save_invstd, coef)
        affine_item(fmt, x, y, c, 0, n_batch, 0, length, coef[0, c], coef[1, c], coef[2, c], relu)


@parallel_kernel
def eval_forward_nchw(fmt, x, running_mean, running_var, weight, bias, eps, group, chunk, coef,
                      relu, y):
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    items_per_channel = ((n_batch + group - 1) // group) * n_chunks
    eval_coefficients(running_mean, running_var, weight, bias, eps, coef)
    for item in prange(n_channels * items_per_channel):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        affine_item(fmt, x, y, c, n0, n1, lo, hi, coef[0, c], coef[1, c], coef[2, c], relu)


@parallel_kernel
def train_backward_nchw_by_block(fmt, dy, x, save_mean, save_invstd, weight, bias, group, chunk,
                                 part_a, part_b, coef, grad_weight, grad_bias, relu, dx):
    """The gradient through the batch statistics; with relu, of ReLU(batch norm), bias being
    the forward's (read for the mask only)."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    n_items = n_channels * part_a.shape[1]
    count = np.float64(n_batch * length)
    for c in range(n_channels):
        coef[0, c] = save_mean[c]
    if relu:
        relu_mask_coefficients(0, n_channels, save_mean, save_invstd, weight, bias, coef)
    for item in prange(n_items):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        part_a[c, j], part_b[c, j] = grad_sums_item(fmt, dy, x, c, n0, n1, lo, hi, coef[0, c], relu,
                                                    coef[4, c], coef[5, c])
    sum_channels(part_a, part_b, 0, n_channels)
    finish_grads(0, n_channels, count, part_a[:, 0], part_b[:, 0], save_mean, save_invstd,
                 weight, grad_weight, grad_bias, coef)
    for item in prange(n_items):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        grad_input_item(fmt, dy, x, dx, c, n0, n1, lo, hi, coef[0, c], coef[1, c], coef[2, c],
                        coef[3, c], relu, coef[4, c], coef[5, c])


@parallel_kernel
def train_backward_nchw_by_channel(fmt, dy, x, save_mean, save_invstd, weight, bias, group, chunk,
                                   part_a, part_b, coef, grad_weight, grad_bias, relu, dx):
    n_batch, n_channels, length = x.shape
    count = np.float64(n_batch * length)
    for c in prange(n_channels):
        coef[0, c] = save_mean[c]
        if relu:
            relu_mask_coefficients(c, c + 1, save_mean, save_invstd, weight, bias, coef)
        for j in range(part_a.shape[1]):
            n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
            part_a[c, j], part_b[c, j] = grad_sums_item(fmt, dy, x, c, n0, n1, lo, hi, coef[0, c],
                                                        relu, coef[4, c], coef[5, c])
        sum_channels(part_a, part_b, c, c + 1)
        finish_grads(c, c + 1, count, part_a[:, 0], part_b[:, 0], save_mean, save_invstd,
                     weight, grad_weight, grad_bias, coef)
        grad_input_item(fmt, dy, x, dx, c, 0, n_batch, 0, length, coef[0, c], coef[1, c],
                        coef[2, c], coef[3, c], relu, coef[4, c], coef[5, c])


@parallel_kernel
def eval_backward_nchw(fmt, dy, x, mean, invstd, weight, bias, group, chunk, part_a, part_b, coef,
                       grad_weight, grad_bias, relu, dx):
    """Gradient of the fixed affine map y = (x - mean) * invstd * w + b, in one fused pass;
    with relu, of ReLU(y)."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    for c in range(n_channels):
        coef[0, c] = mean[c]
        coef[1, c] = np.float64(weight[c]) * invstd[c]
    if relu:
        relu_mask_coefficients(0, n_channels, mean, invstd, weight, bias, coef)
    for item in prange(n_channels * part_a.shape[1]):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        part_a[c, j], part_b[c, j] = eval_grad_item(fmt, dy, x, dx, c, n0, n1, lo, hi, coef[0, c],
                                                    coef[1, c], relu, coef[4, c], coef[5, c])
    sum_channels(part_a, part_b, 0, n_channels)
    for c in range(n_channels):
        sum_dy = part_a[c, 0]
        grad_weight[c] = (part_b[c, 0] - (mean[c] - np.float64(coef[0, c])) * sum_dy) * invstd[c]
        grad_bias[c] = sum_dy


# ----------------------------------------------------------------------------- split phases
# A SyncBatchNorm's training step in pieces, with global statistics entering in between.

@parallel_kernel
def normalize_nchw(fmt, x, mean, invstd, weight, bias, group, chunk, coef, y):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    items_per_channel = ((n_batch + group - 1) // group) * n_chunks
    given_stats_coefficients(mean, invstd, weight, bias, coef)
    for item in prange(n_channels * items_per_channel):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        affine_item(fmt, x, y, c, n0, n1, lo, hi, coef[0, c], coef[1, c], coef[2, c], False)


@parallel_kernel
def grad_sums_nchw(fmt, dy, x, mean, group, chunk, part_a, part_b, coef, sums):
    """sums[:, c] = (sum(dy), sum(dy * (x - mean))) per channel, in float64."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    for c in range(n_channels):
        coef[0, c] = mean[c]
    for item in prange(n_channels * part_a.shape[1]):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        part_a[c, j], part_b[c, j] = grad_sums_item(fmt, dy, x, c, n0, n1, lo, hi, coef[0, c],
                                                    False, coef[0, c], coef[0, c])
    sum_channels(part_a, part_b, 0, n_channels)
    centered_grad_sums(mean, coef, part_a[:, 0], part_b[:, 0], sums)


@parallel_kernel
def grad_input_nchw(fmt, dy, x, mean, invstd, weight, count, sums, group, chunk, coef, dx):
    """Training-mode dx from given sums over count values (see given_grad_coefficients)."""
    n_batch, n_channels, length = x.shape
    n_chunks = (length + chunk - 1) // chunk
    items_per_channel = ((n_batch + group - 1) // group) * n_chunks
    given_grad_coefficients(count, sums, mean, invstd, weight, coef)
    for item in prange(n_channels * items_per_channel):
        c, j = item_of(item, n_channels, n_chunks)
        n0, n1, lo, hi = item_extent(j, group, chunk, n_batch, length)
        grad_input_item(fmt, dy, x, dx, c, n0, n1, lo, hi, coef[0, c], coef[1, c], coef[2, c],
                        coef[3, c], False, coef[0, c], coef[0, c])
