"""Channels-last kernels on a flat view of a (rows, C) array: value j belongs to channel j % C.

Rows are cut into fixed blocks of `block_rows` rows, and every block keeps its own partials in
a (n_blocks, 2, W) float64 workspace. Inner loops run over W = C * reps "lanes", where reps
divides the row count and, where the row count allows, makes W a multiple of the SIMD width:
lane k always holds channel k % C, so the loop vectorizes across rows even for C = 3, and
every block is a whole number of lane groups. After a block's lanes are folded per channel,
blocks are merged in index order, which makes results independent of the thread count.

Kernels do no validation and no allocation policy: the caller passes every buffer it gets
back; only small per-block lane accumulators are made inside. Each takes the storage format
`fmt` of its data arrays first (see lowp).
"""

import numpy as np
from numba import prange

from .jit import helper, parallel_kernel
from .lowp import decode, deviation, encode
from .prefetch import prefetch_distance, prefetch_values
from .moments import (centered_grad_sums, eval_coefficients, finish_batch_stats, finish_grads,
                       finite_or_zero, given_grad_coefficients, given_stats_coefficients,
                       grad_or_masked, merge_parts, output_value, relu_mask_coefficients,
                       relu_masked, shifted_moments)


@helper
def block_bounds(b, block_rows, n_rows, n_channels):
    """Flat [start, end) of block b."""
    r0 = b * block_rows
    return r0 * n_channels, min(n_rows, r0 + block_rows) * n_channels


@helper
def grouped(flat, start, end, width):
    """flat[start:end] as a (groups, width) view; the plan makes every block a whole number
    of lane groups, so nothing is left over.

    Hot loops index this view from 0: Numba guards signed indices against negative
    wraparound, and only induction variables that start at 0 let LLVM drop the guard and
    vectorize.
    """
    return flat[start:end].reshape((end - start) // width, width)


@helper
def accumulate_moments(fmt, xf, start, body, shift, interleave, sum_d, sum_d2, ahead):
    """Lane sums of d = x - shift and d * d over the groups of body (the block at flat offset
    start), prefetching ahead values ahead of each step when ahead > 0."""
    width = body.shape[1]
    # Four rows per step, with the additions of a one-row loop in the same order (so the same
    # bits): the accumulators are loaded and stored once per four rows, and those stores, not
    # the arithmetic, bound the one-row loop.
    n_groups = body.shape[0]
    full = n_groups - n_groups % 4 if interleave else 0
    for g in range(0, full, 4):
        prefetch_values(xf, start + g * width, 4 * width, ahead)
        for k in range(width):
            h = shift[k]
            d0 = np.float64(decode(fmt, body[g, k])) - h
            d1 = np.float64(decode(fmt, body[g + 1, k])) - h
            d2 = np.float64(decode(fmt, body[g + 2, k])) - h
            d3 = np.float64(decode(fmt, body[g + 3, k])) - h
            sum_d[k] = (((sum_d[k] + d0) + d1) + d2) + d3
            sum_d2[k] = (((sum_d2[k] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
    for g in range(full, n_groups):
        prefetch_values(xf, start + g * width, width, ahead)
        for k in range(width):
            d = np.float64(decode(fmt, body[g, k])) - shift[k]
            sum_d[k] += d
            sum_d2[k] += d * d


@helper
def block_moments(fmt, xf, n_channels, start, end, interleave, partial):
    """Per-channel (mean, M2) of one block of rows, written to partial[0, :C], partial[1, :C];
    with interleave, four lane groups per step (see Plan.interleave_rows).

    The lane accumulators are local arrays rather than rows of the workspace: LLVM cannot
    prove that rows of one array never alias, and would not vectorize the update.
    """
    width = partial.shape[1]
    reps = width // n_channels
    n_rows = np.float64((end - start) // n_channels)
    body = grouped(xf, start, end, width)
    shift = np.empty(width)
    sum_d = np.zeros(width)
    sum_d2 = np.zeros(width)
    # Lane q * C + c holds channel c; nested loops, because an integer modulo per lane cost
    # more than the whole block reduction for large C.
    for c in range(n_channels):
        first = finite_or_zero(np.float64(decode(fmt, xf[start + c])))
        for q in range(reps):
            shift[q * n_channels + c] = first
    # Two copies of the loops: the one without prefetching is the plain loop, unchanged for
    # tensors read from the cache (a branch per step cost small lane groups 5-14%).
    ahead = prefetch_distance(xf)
    if ahead > 0:
        accumulate_moments(fmt, xf, start, body, shift, interleave, sum_d, sum_d2, ahead)
    else:
        accumulate_moments(fmt, xf, start, body, shift, interleave, sum_d, sum_d2, 0)
    for c in range(n_channels):
        total_d = 0.0
        total_d2 = 0.0
        for q in range(reps):
            total_d += sum_d[q * n_channels + c]
            total_d2 += sum_d2[q * n_channels + c]
        partial[0, c], partial[1, c] = shifted_moments(shift[c], n_rows, total_d, total_d2)


@helper
def tile_lanes(coef, coef_lanes, n_channels):
    for i in range(coef_lanes.shape[0]):
        for q in range(coef_lanes.shape[1] // n_channels):
            for c in range(n_channels):
                coef_lanes[i, q * n_channels + c] = coef[i, c]


@helper
def affine_block(fmt, xf, yf, start, end, coef_lanes, relu):
    """y = (x - shift) * alpha + beta, or its ReLU when relu, over one block."""
    width = coef_lanes.shape[1]
    x_body = grouped(xf, start, end, width)
    y_body = grouped(yf, start, end, width)
    shift, alpha, beta = coef_lanes[0], coef_lanes[1], coef_lanes[2]
    for g in range(x_body.shape[0]):
        for k in range(width):
            value = (decode(fmt, x_body[g, k]) - shift[k]) * alpha[k] + beta[k]
            y_body[g, k] = encode(fmt, output_value(relu, value))


@helper
def grad_sums_block(fmt, dyf, xf, start, end, coef_lanes, interleave, lanes, relu, alpha,
                    beta):
    """Lane sums of dy and dy * (x - shift) into lanes[0] and lanes[1] (local accumulators,
    as in block_moments; with interleave, four lane groups per step in the same order); with
    relu, of dy masked by the forward's ReLU (alpha and beta: its lanes, read only then)."""
    width = coef_lanes.shape[1]
    dy_body = grouped(dyf, start, end, width)
    x_body = grouped(xf, start, end, width)
    shift = coef_lanes[0]
    sum_dy = np.zeros(width)
    sum_dy_dev = np.zeros(width)
    n_groups = x_body.shape[0]
    if relu:
        # One group per step, in the same order (so the same bits): the masked four-group
        # step was 3-9x slower than this loop (out-of-cache (64,112,112,64) float32).
        for g in range(n_groups):
            for k in range(width):
                value = x_body[g, k]
                grad = np.float64(relu_masked(decode(fmt, dy_body[g, k]), decode(fmt, value),
                                              shift[k], alpha[k], beta[k]))
                sum_dy[k] += grad
                sum_dy_dev[k] += grad * deviation(fmt, value, shift[k])
        lanes[0, :] = sum_dy
        lanes[1, :] = sum_dy_dev
        return
    full = n_groups - n_groups % 4 if interleave else 0
    for g in range(0, full, 4):
        for k in range(width):
            h = shift[k]
            x0 = x_body[g, k]
            x1 = x_body[g + 1, k]
            x2 = x_body[g + 2, k]
            x3 = x_body[g + 3, k]
            g0 = np.float64(decode(fmt, dy_body[g, k]))
            g1 = np.float64(decode(fmt, dy_body[g + 1, k]))
            g2 = np.float64(decode(fmt, dy_body[g + 2, k]))
            g3 = np.float64(decode(fmt, dy_body[g + 3, k]))
            sum_dy[k] = (((sum_dy[k] + g0) + g1) + g2) + g3
            sum_dy_dev[k] = ((((sum_dy_dev[k] + g0 * deviation(fmt, x0, h))
                               + g1 * deviation(fmt, x1, h))
                              + g2 * deviation(fmt, x2, h))
                             + g3 * deviation(fmt, x3, h))
    for g in range(full, n_groups):
        for k in range(width):
            grad = np.float64(decode(fmt, dy_body[g, k]))
            sum_dy[k] += grad
            sum_dy_dev[k] += grad * deviation(fmt, x_body[g, k], shift[k])
    lanes[0, :] = sum_dy
    lanes[1, :] = sum_dy_dev


@helper
def fold_block_lanes(ws, n_channels):
    """Channel c's totals of lane rows 0 and 1 over all blocks, in a fixed order, left in
    ws[0, 0, c] and ws[0, 1, c] (no later channel reads those two lanes)."""
    reps = ws.shape[2] // n_channels
    for c in range(n_channels):
        total_a = 0.0
        total_b = 0.0
        for b in range(ws.shape[0]):
            for q in range(reps):
                total_a += ws[b, 0, q * n_channels + c]
                total_b += ws[b, 1, q * n_channels + c]
        ws[0, 0, c] = total_a
        ws[0, 1, c] = total_b


@parallel_kernel
def moments_nhwc(fmt, xf, n_channels, block_rows, interleave, ws, count, mean, m2):
    """Per-channel (count, mean, M2) of x: the partials a cross-process merge exchanges."""
    n_rows = xf.shape[0] // n_channels
    for b in prange(ws.shape[0]):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        block_moments(fmt, xf, n_channels, start, end, interleave, ws[b])
    total = merge_parts(ws, n_channels, block_rows, n_rows, 1)
    for c in range(n_channels):
        count[c], mean[c], m2[c] = total, ws[0, 0, c], ws[0, 1, c]


@parallel_kernel
def train_forward_nhwc(fmt, xf, n_channels, weight, bias, eps, momentum, update, running_mean,
                       running_var, block_rows, interleave, ws, save_mean, save_invstd, coef,
                       coef_lanes, relu, yf):
    n_rows = xf.shape[0] // n_channels
    n_blocks = ws.shape[0]
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        block_moments(fmt, xf, n_channels, start, end, interleave, ws[b])
    # Serial on purpose: the merges cost less than another parallel region.
    count = merge_parts(ws, n_channels, block_rows, n_rows, 1)
    finish_batch_stats(0, n_channels, count, ws[0, 0], ws[0, 1], eps, momentum, update,
                       running_mean, running_var, weight, bias, save_mean, save_invstd, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        affine_block(fmt, xf, yf, start, end, coef_lanes, relu)


@parallel_kernel
def eval_forward_nhwc(fmt, xf, n_channels, running_mean, running_var, weight, bias, eps, block_rows,
                      coef, coef_lanes, relu, yf):
    n_rows = xf.shape[0] // n_channels
    n_blocks = (n_rows + block_rows - 1) // block_rows
    eval_coefficients(running_mean, running_var, weight, bias, eps, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        affine_block(fmt, xf, yf, start, end, coef_lanes, relu)


@helper
def grad_input_block(fmt, dyf, xf, dxf, start, end, coef_lanes, relu, alpha, beta):
    width = coef_lanes.shape[1]
    dy_body = grouped(dyf, start, end, width)
    x_body = grouped(xf, start, end, width)
    dx_body = grouped(dxf, start, end, width)
    shift, k_dy, k_x, k_0 = coef_lanes[0], coef_lanes[1], coef_lanes[2], coef_lanes[3]
    for g in range(x_body.shape[0]):
        for k in range(width):
            value = decode(fmt, x_body[g, k])
            grad = grad_or_masked(relu, decode(fmt, dy_body[g, k]), value, shift[k], alpha[k],
                                  beta[k])
            dx_body[g, k] = encode(fmt, grad * k_dy[k] + (value - shift[k]) * k_x[k] + k_0[k])


@parallel_kernel
def train_backward_nhwc(fmt, dyf, xf, n_channels, save_mean, save_invstd, weight, bias, block_rows,
                        interleave, ws, coef, coef_lanes, grad_weight, grad_bias, relu, dxf):
    """The gradient through the batch statistics; with relu, of ReLU(batch norm), bias being
    the forward's (read for the mask only)."""
    n_rows = xf.shape[0] // n_channels
    n_blocks = ws.shape[0]
    count = np.float64(n_rows)
    for c in range(n_channels):
        coef[0, c] = save_mean[c]
    if relu:
        relu_mask_coefficients(0, n_channels, save_mean, save_invstd, weight, bias, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        grad_sums_block(fmt, dyf, xf, start, end, coef_lanes, interleave, ws[b], relu,
                        coef_lanes[4], coef_lanes[5])
    fold_block_lanes(ws, n_channels)
    finish_grads(0, n_channels, count, ws[0, 0], ws[0, 1], save_mean, save_invstd, weight,
                 grad_weight, grad_bias, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        grad_input_block(fmt, dyf, xf, dxf, start, end, coef_lanes, relu, coef_lanes[4],
                         coef_lanes[5])


@helper
def eval_grad_block(fmt, dyf, xf, dxf, start, end, coef_lanes, lanes, relu):
    """dx = dy * alpha, and the lane sums for the parameter gradients, in one pass; with relu,
    of dy masked by the forward's ReLU (coef_lanes[4], [5]: its alpha and beta)."""
    width = coef_lanes.shape[1]
    dy_body = grouped(dyf, start, end, width)
    x_body = grouped(xf, start, end, width)
    dx_body = grouped(dxf, start, end, width)
    shift, alpha = coef_lanes[0], coef_lanes[1]
    mask_alpha, mask_beta = coef_lanes[4], coef_lanes[5]
    sum_dy = np.zeros(width)
    sum_dy_dev = np.zeros(width)
    for g in range(x_body.shape[0]):
        for k in range(width):
            grad = grad_or_masked(relu, decode(fmt, dy_body[g, k]), decode(fmt, x_body[g, k]),
                                  shift[k], mask_alpha[k], mask_beta[k])
            dx_body[g, k] = encode(fmt, grad * alpha[k])
            sum_dy[k] += np.float64(grad)
            sum_dy_dev[k] += np.float64(grad) * deviation(fmt, x_body[g, k], shift[k])
    lanes[0, :] = sum_dy
    lanes[1, :] = sum_dy_dev


@parallel_kernel
def eval_backward_nhwc(fmt, dyf, xf, n_channels, mean, invstd, weight, bias, block_rows, ws, coef,
                       coef_lanes, grad_weight, grad_bias, relu, dxf):
    """Gradient of the fixed affine map y = (x - mean) * invstd * w + b, in one fused pass;
    with relu, of ReLU(y)."""
    n_rows = xf.shape[0] // n_channels
    for c in range(n_channels):
        coef[0, c] = mean[c]
        coef[1, c] = np.float64(weight[c]) * invstd[c]
    if relu:
        relu_mask_coefficients(0, n_channels, mean, invstd, weight, bias, coef)
        tile_lanes(coef, coef_lanes, n_channels)
    else:
        tile_lanes(coef[:2], coef_lanes[:2], n_channels)
    for b in prange(ws.shape[0]):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        eval_grad_block(fmt, dyf, xf, dxf, start, end, coef_lanes, ws[b], relu)
    fold_block_lanes(ws, n_channels)
    for c in range(n_channels):
        sum_dy = ws[0, 0, c]
        grad_weight[c] = (ws[0, 1, c] - (mean[c] - np.float64(coef[0, c])) * sum_dy) * invstd[c]
        grad_bias[c] = sum_dy


# ----------------------------------------------------------------------------- split phases
# A SyncBatchNorm's training step in pieces, with global statistics entering in between.

@parallel_kernel
def normalize_nhwc(fmt, xf, n_channels, mean, invstd, weight, bias, block_rows, coef, coef_lanes,
                   yf):
    """y = (x - mean) * invstd * weight + bias with given float64 statistics; coef_lanes has
    3 rows."""
    n_rows = xf.shape[0] // n_channels
    n_blocks = (n_rows + block_rows - 1) // block_rows
    given_stats_coefficients(mean, invstd, weight, bias, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        affine_block(fmt, xf, yf, start, end, coef_lanes, False)


@parallel_kernel
def grad_sums_nhwc(fmt, dyf, xf, n_channels, mean, block_rows, interleave, ws, coef, coef_lanes,
                   sums):
    """sums[:, c] = (sum(dy), sum(dy * (x - mean))) per channel, in float64; coef_lanes has
    1 row (the shift)."""
    n_rows = xf.shape[0] // n_channels
    for c in range(n_channels):
        coef[0, c] = mean[c]
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(ws.shape[0]):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        grad_sums_block(fmt, dyf, xf, start, end, coef_lanes, interleave, ws[b], False,
                        coef_lanes[0], coef_lanes[0])
    fold_block_lanes(ws, n_channels)
    centered_grad_sums(mean, coef, ws[0, 0], ws[0, 1], sums)


@parallel_kernel
def grad_input_nhwc(fmt, dyf, xf, n_channels, mean, invstd, weight, count, sums, block_rows, coef,
                    coef_lanes, dxf):
    """Training-mode dx from given sums over count values (see given_grad_coefficients)."""
    n_rows = xf.shape[0] // n_channels
    n_blocks = (n_rows + block_rows - 1) // block_rows
    given_grad_coefficients(count, sums, mean, invstd, weight, coef)
    tile_lanes(coef, coef_lanes, n_channels)
    for b in prange(n_blocks):
        start, end = block_bounds(b, block_rows, n_rows, n_channels)
        grad_input_block(fmt, dyf, xf, dxf, start, end, coef_lanes, False, coef_lanes[0],
                         coef_lanes[0])
