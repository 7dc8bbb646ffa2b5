"""Channels-first kernels for short planes (L below a few thousand values) on an (N, C, L) view.

Items of the long-plane kernels cover one channel at a time, which for short planes means
jumping C * L values between reads. Here an item is a block of samples [n0, n1) and channels
[c0, c1) and is read in memory order; it accumulates per-channel sums and leaves per-channel
partials in row `sample block` of an (n_sample_blocks, 2, C) workspace. Partials are merged over
sample blocks in order, so results do not depend on the thread count.

Kernels do no validation and allocate nothing: the caller passes every buffer. Each takes the
storage format `fmt` of its data arrays first (see lowp).
"""

import numpy as np
from numba import prange

from .jit import helper, parallel_kernel
from .lowp import decode, encode
from .moments import (centered_grad_sums, eval_coefficients, finish_batch_stats, finish_grads,
                       finite_or_zero, given_grad_coefficients, given_stats_coefficients,
                       grad_or_masked, merge_parts, output_value, relu_mask_coefficients,
                       run_eval_grad, run_grad_sums, run_moment_sums, run_relu_eval_grad,
                       run_relu_grad_sums, shifted_moments)


@helper
def item_bounds(item, sample_block, channel_block, n_batch, n_channels):
    """Sample block index, samples [n0, n1) and channels [c0, c1) of an item."""
    n_channel_blocks = (n_channels + channel_block - 1) // channel_block
    sb = item // n_channel_blocks
    c0 = (item - sb * n_channel_blocks) * channel_block
    n0 = sb * sample_block
    return sb, n0, min(n_batch, n0 + sample_block), c0, min(n_channels, c0 + channel_block)


@helper
def n_items(sample_block, channel_block, n_batch, n_channels):
    return (((n_batch + sample_block - 1) // sample_block)
            * ((n_channels + channel_block - 1) // channel_block))


@helper
def item_moments(fmt, x, n0, n1, c0, c1, part):
    """Per-channel (mean, M2) of one item into part[0, c] and part[1, c], each channel shifted
    by its first value in the item (see moments for why). part[0] and part[1] hold the
    running sums meanwhile."""
    for c in range(c0, c1):
        part[0, c] = 0.0
        part[1, c] = 0.0
    for n in range(n0, n1):
        for c in range(c0, c1):
            shift = finite_or_zero(np.float64(decode(fmt, x[n0, c, 0])))
            run_d, run_d2 = run_moment_sums(fmt, x[n, c], shift)
            part[0, c] += run_d
            part[1, c] += run_d2
    count = np.float64((n1 - n0) * x.shape[2])
    for c in range(c0, c1):
        shift = finite_or_zero(np.float64(decode(fmt, x[n0, c, 0])))
        part[0, c], part[1, c] = shifted_moments(shift, count, part[0, c], part[1, c])


@helper
def affine_item(fmt, x, y, n0, n1, c0, c1, coef, relu):
    """y = (x - shift) * alpha + beta, or its ReLU when relu, over one item."""
    for n in range(n0, n1):
        for c in range(c0, c1):
            src = x[n, c]
            dst = y[n, c]
            shift, alpha, beta = coef[0, c], coef[1, c], coef[2, c]
            for i in range(src.size):
                dst[i] = encode(fmt, output_value(relu, (decode(fmt, src[i]) - shift) * alpha
                                                  + beta))


@helper
def grad_sums_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, part, fuse_eval_dx, relu):
    """Per-channel sum(dy) and sum(dy * (x - shift)) into part[0, c] and part[1, c]; with
    fuse_eval_dx, also dx = dy * alpha in the same pass (the eval-mode gradient); with relu,
    of dy masked by the forward's ReLU (coef[4] and coef[5] are the forward's alpha, beta)."""
    for c in range(c0, c1):
        part[0, c] = 0.0
        part[1, c] = 0.0
    for n in range(n0, n1):
        for c in range(c0, c1):
            if fuse_eval_dx and relu:
                run_dy, run_dy_dev = run_relu_eval_grad(fmt, dy[n, c], x[n, c], dx[n, c],
                                                        coef[0, c], coef[1, c], coef[4, c],
                                                        coef[5, c])
            elif fuse_eval_dx:
                run_dy, run_dy_dev = run_eval_grad(fmt, dy[n, c], x[n, c], dx[n, c], coef[0, c],
                                                   coef[1, c])
            elif relu:
                run_dy, run_dy_dev = run_relu_grad_sums(fmt, dy[n, c], x[n, c], coef[0, c],
                                                        coef[4, c], coef[5, c])
            else:
                run_dy, run_dy_dev = run_grad_sums(fmt, dy[n, c], x[n, c], coef[0, c])
            part[0, c] += run_dy
            part[1, c] += run_dy_dev


@helper
def grad_input_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, relu):
    for n in range(n0, n1):
        for c in range(c0, c1):
            grad = dy[n, c]
            src = x[n, c]
            dst = dx[n, c]
            shift, k_dy, k_x, k_0 = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
            alpha, beta = coef[4, c], coef[5, c]
            for i in range(src.size):
                value = decode(fmt, src[i])
                masked = grad_or_masked(relu, decode(fmt, grad[i]), value, shift, alpha, beta)
                dst[i] = encode(fmt, masked * k_dy + (value - shift) * k_x + k_0)


@helper
def sum_parts(parts, n_channels):
    """Each channel's sums over sample blocks, in order, into parts[0].

    Sample blocks in the outer loop: the inner loop then reads rows in memory order and
    vectorizes. Channel by channel, the reads jumped a whole row per block: with one sample
    per block, (256, 512, 7, 7) has 256 rows of 8 KB, and this serial fold took longer than
    the parallel pass that filled them. The additions per channel are the same, in the same
    order, starting from 0.0 (which also turns a -0.0 first row into 0.0, as before).
    """
    total_a = parts[0, 0]
    total_b = parts[0, 1]
    for c in range(n_channels):
        total_a[c] = 0.0 + total_a[c]
        total_b[c] = 0.0 + total_b[c]
    for j in range(1, parts.shape[0]):
        row_a = parts[j, 0]
        row_b = parts[j, 1]
        for c in range(n_channels):
            total_a[c] += row_a[c]
            total_b[c] += row_b[c]


@parallel_kernel
def moments_nchw_short(fmt, x, sample_block, channel_block, parts, count, mean, m2):
    """Per-channel (count, mean, M2) of x: the partials a cross-process merge exchanges."""
    n_batch, n_channels, length = x.shape
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        item_moments(fmt, x, n0, n1, c0, c1, parts[sb])
    total = merge_parts(parts, n_channels, sample_block, n_batch, length)
    for c in range(n_channels):
        count[c], mean[c], m2[c] = total, parts[0, 0, c], parts[0, 1, c]


@parallel_kernel
def train_forward_nchw_short(fmt, x, weight, bias, eps, momentum, update, running_mean, running_var,
                             sample_block, channel_block, parts, save_mean, save_invstd, coef,
                             relu, y):
    n_batch, n_channels, length = x.shape
    items = n_items(sample_block, channel_block, n_batch, n_channels)
    for item in prange(items):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        item_moments(fmt, x, n0, n1, c0, c1, parts[sb])
    count = merge_parts(parts, n_channels, sample_block, n_batch, length)
    finish_batch_stats(0, n_channels, count, parts[0, 0], parts[0, 1], eps, momentum, update,
                       running_mean, running_var, weight, bias, save_mean, save_invstd, coef)
    for item in prange(items):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        affine_item(fmt, x, y, n0, n1, c0, c1, coef, relu)


@parallel_kernel
def eval_forward_nchw_short(fmt, x, running_mean, running_var, weight, bias, eps, sample_block,
                            channel_block, coef, relu, y):
    n_batch, n_channels, length = x.shape
    eval_coefficients(running_mean, running_var, weight, bias, eps, coef)
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        affine_item(fmt, x, y, n0, n1, c0, c1, coef, relu)


@parallel_kernel
def train_backward_nchw_short(fmt, dy, x, save_mean, save_invstd, weight, bias, sample_block,
                              channel_block, parts, coef, grad_weight, grad_bias, relu, dx):
    """The gradient through the batch statistics; with relu, of ReLU(batch norm), bias being
    the forward's (read for the mask only)."""
    n_batch, n_channels, length = x.shape
    items = n_items(sample_block, channel_block, n_batch, n_channels)
    count = np.float64(n_batch * length)
    for c in range(n_channels):
        coef[0, c] = save_mean[c]
    if relu:
        relu_mask_coefficients(0, n_channels, save_mean, save_invstd, weight, bias, coef)
    for item in prange(items):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        grad_sums_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, parts[sb], False, relu)
    sum_parts(parts, n_channels)
    finish_grads(0, n_channels, count, parts[0, 0], parts[0, 1], save_mean, save_invstd, weight,
                 grad_weight, grad_bias, coef)
    for item in prange(items):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        grad_input_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, relu)


@parallel_kernel
def eval_backward_nchw_short(fmt, dy, x, mean, invstd, weight, bias, sample_block, channel_block,
                             parts, coef, grad_weight, grad_bias, relu, dx):
    """Gradient of the fixed affine map y = (x - mean) * invstd * w + b, in one fused pass;
    with relu, of ReLU(y)."""
    n_batch, n_channels, length = x.shape
    for c in range(n_channels):
        coef[0, c] = mean[c]
        coef[1, c] = np.float64(weight[c]) * invstd[c]
    if relu:
        relu_mask_coefficients(0, n_channels, mean, invstd, weight, bias, coef)
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        grad_sums_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, parts[sb], True, relu)
    sum_parts(parts, n_channels)
    for c in range(n_channels):
        sum_dy = parts[0, 0, c]
        grad_weight[c] = (parts[0, 1, c] - (mean[c] - np.float64(coef[0, c])) * sum_dy) * invstd[c]
        grad_bias[c] = sum_dy


# ----------------------------------------------------------------------------- split phases
# A SyncBatchNorm's training step in pieces, with global statistics entering in between.

@parallel_kernel
def normalize_nchw_short(fmt, x, mean, invstd, weight, bias, sample_block, channel_block, coef, y):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics."""
    n_batch, n_channels, length = x.shape
    given_stats_coefficients(mean, invstd, weight, bias, coef)
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        affine_item(fmt, x, y, n0, n1, c0, c1, coef, False)


@parallel_kernel
def grad_sums_nchw_short(fmt, dy, x, mean, sample_block, channel_block, parts, coef, sums):
    """sums[:, c] = (sum(dy), sum(dy * (x - mean))) per channel, in float64."""
    n_batch, n_channels, length = x.shape
    for c in range(n_channels):
        coef[0, c] = mean[c]
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        grad_sums_item(fmt, dy, x, x, n0, n1, c0, c1, coef, parts[sb], False, False)
    sum_parts(parts, n_channels)
    centered_grad_sums(mean, coef, parts[0, 0], parts[0, 1], sums)


@parallel_kernel
def grad_input_nchw_short(fmt, dy, x, mean, invstd, weight, count, sums, sample_block,
                          channel_block, coef, dx):
    """Training-mode dx from given sums over count values (see given_grad_coefficients)."""
    n_batch, n_channels, length = x.shape
    given_grad_coefficients(count, sums, mean, invstd, weight, coef)
    for item in prange(n_items(sample_block, channel_block, n_batch, n_channels)):
        sb, n0, n1, c0, c1 = item_bounds(item, sample_block, channel_block, n_batch, n_channels)
        grad_input_item(fmt, dy, x, dx, n0, n1, c0, c1, coef, False)
