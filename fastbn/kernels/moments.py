"""Per-channel moments as mergeable partials, and the per-channel coefficient arithmetic.

A partial is (count, mean, M2) with M2 = sum((x - mean)**2), always in float64, whatever the
input dtype. Each block of input yields one partial in a single pass: with d = x - s, where the
shift s is the block's first value, the block sums d and d**2, and
mean = s + sum(d)/n, M2 = sum(d**2) - sum(d)**2/n.
This is not the unstable E[x**2] - E[x]**2: because s is one of the block's own values,
n*(s - mean)**2 <= n*M2, so the cancellation costs at most a factor of about n in relative
error; n is at most a few thousand per block, which bounds M2's relative error near 1e-12 in
float64. A constant block gives d == 0 exactly, hence its exact value as the mean and M2 == 0,
so a constant channel normalizes to exactly beta; offsets such as 1e6 cost nothing either.
Blocks are combined with Chan et al.'s pairwise update in a fixed order, so a result never
depends on how many threads produced the partials. A later cross-process SyncBatchNorm
exchanges exactly these partials.

Everything here is a small @njit helper that the kernels inline; nothing validates.
"""

import numpy as np

from .jit import helper, parallel_kernel, reduction
from .lowp import decode, deviation, encode


@helper
def finite_or_zero(value):
    """A block's shift: its first value, unless that is inf or NaN.

    An infinite shift would turn the block's other infinities into inf - inf = NaN, where
    PyTorch's plain sum gives an infinite mean.
    """
    return value if np.isfinite(value) else 0.0


@reduction
def run_moment_sums(fmt, run, shift):
    """(sum(d), sum(d**2)) over a contiguous run, d = x - shift, in float64; `fmt` is the
    storage format of run's values (see lowp), as in every kernel below.

    Loops run over views from 0: Numba guards signed indices against negative wraparound, and
    only an induction variable that starts at 0 lets LLVM drop the guard and vectorize.
    """
    sum_d = 0.0
    sum_d2 = 0.0
    for i in range(run.size):
        d = np.float64(decode(fmt, run[i])) - shift
        sum_d += d
        sum_d2 += d * d
    return sum_d, sum_d2


@reduction
def run_grad_sums(fmt, dy, x, shift):
    """(sum(dy), sum(dy * (x - shift))) over a contiguous run, in float64."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        grad = np.float64(decode(fmt, dy[i]))
        sum_dy += grad
        sum_dy_dev += grad * deviation(fmt, x[i], shift)
    return sum_dy, sum_dy_dev


@reduction
def run_eval_grad(fmt, dy, x, dx, shift, alpha):
    """dx = dy * alpha, and run_grad_sums, in one pass."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        grad = decode(fmt, dy[i])
        dx[i] = encode(fmt, grad * alpha)
        sum_dy += np.float64(grad)
        sum_dy_dev += np.float64(grad) * deviation(fmt, x[i], shift)
    return sum_dy, sum_dy_dev


@reduction
def run_relu_grad_sums(fmt, dy, x, shift, alpha, beta):
    """run_grad_sums of the ReLU-masked dy (see relu_masked)."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        grad = np.float64(relu_masked(decode(fmt, dy[i]), decode(fmt, x[i]), shift, alpha,
                                      beta))
        sum_dy += grad
        sum_dy_dev += grad * deviation(fmt, x[i], shift)
    return sum_dy, sum_dy_dev


@reduction
def run_relu_eval_grad(fmt, dy, x, dx, shift, alpha, mask_alpha, mask_beta):
    """run_eval_grad of the ReLU-masked dy; mask_alpha and mask_beta are the forward's."""
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for i in range(x.size):
        grad = relu_masked(decode(fmt, dy[i]), decode(fmt, x[i]), shift, mask_alpha, mask_beta)
        dx[i] = encode(fmt, grad * alpha)
        sum_dy += np.float64(grad)
        sum_dy_dev += np.float64(grad) * deviation(fmt, x[i], shift)
    return sum_dy, sum_dy_dev


@helper
def shifted_moments(shift, count, sum_d, sum_d2):
    """(mean, M2) of a block from its sums of d = x - shift and d**2."""
    mean_offset = sum_d / count
    m2 = sum_d2 - sum_d * mean_offset
    if m2 < 0.0:  # rounding only; `not >=` would also catch NaN, which must propagate
        m2 = 0.0
    return shift + mean_offset, m2


@helper
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s combination of two partials; counts are float64."""
    count = count_a + count_b
    if mean_a == mean_b:
        # Exact for constant channels, and keeps a same-signed infinite mean.
        return count, mean_a, m2_a + m2_b
    delta = mean_b - mean_a
    weight_b = count_b / count
    if np.isinf(mean_a) or np.isinf(mean_b):
        # PyTorch's plain sum: inf beside finite values stays inf, +inf beside -inf is NaN;
        # the update form below would compute inf - inf.
        mean = mean_a + mean_b
    else:
        mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@helper
def merge_parts(parts, n_channels, units_per_part, total_units, unit_values):
    """Merge the (mean, M2) partials parts[j, 0, :C], parts[j, 1, :C] over j, in order, into
    parts[0]; return the total count.

    Part j covers units [j * units_per_part, ...) of total_units, each unit holding
    unit_values values of every channel. This is Chan's update (see chan_merge) with the
    weights of part j computed once for all channels, and the inner loop over channels.
    """
    count_a = np.float64(min(units_per_part, total_units) * unit_values)
    mean = parts[0, 0]
    m2 = parts[0, 1]
    for j in range(1, parts.shape[0]):
        units_b = min(total_units, (j + 1) * units_per_part) - j * units_per_part
        count_b = np.float64(units_b * unit_values)
        total = count_a + count_b
        weight_b = count_b / total
        weight_m2 = count_a * weight_b
        mean_b = parts[j, 0]
        m2_b = parts[j, 1]
        for c in range(n_channels):
            mean_a = mean[c]
            delta = mean_b[c] - mean_a
            m2[c] = m2[c] + m2_b[c] + delta * delta * weight_m2
            if mean_b[c] != mean_a:  # equal means stay exact, infinite ones included
                if np.isinf(mean_a) or np.isinf(mean_b[c]):
                    mean[c] = mean_a + mean_b[c]  # as in chan_merge
                else:
                    mean[c] = mean_a + delta * weight_b
        count_a = total
    return count_a


@helper
def inverse_std(var, eps):
    """1/sqrt(var + eps), and 0 where both are 0, as PyTorch's CPU kernel defines it."""
    if var == 0.0 and eps == 0.0:
        return 0.0
    return 1.0 / np.sqrt(var + eps)


@helper
def store_affine(coef, c, alpha_row, mean, alpha, bias):
    """coef[0, c] = shift, coef[alpha_row, c] = alpha, coef[alpha_row + 1, c] = beta, for
    y = (x - shift) * alpha + beta with shift the mean rounded by the store to the coefficient
    dtype and the rounding error moved into beta (see finish_batch_stats). The one place this
    formula lives: forwards and the fused ReLU backward's mask must compute the same bits."""
    coef[0, c] = mean
    coef[alpha_row, c] = alpha
    coef[alpha_row + 1, c] = np.float64(bias) - (mean - np.float64(coef[0, c])) * alpha


# The finishing helpers loop over a range of channels themselves. Numba increfs and decrefs
# every array passed to a helper, with atomic operations; called once per channel, that cost
# 40 ns a channel, more than the arithmetic (and most of a (128, 1024) training step).

@helper
def finish_batch_stats(c0, c1, count, means, m2s, eps, momentum, update, running_mean,
                       running_var, weight, bias, save_mean, save_invstd, coef):
    """For channels [c0, c1), from merged batch moments: saved statistics, the running update
    (in float64, with the unbiased variance) and the forward coefficients.

    coef[:, c] = (shift, alpha, beta) so that y = (x - shift) * alpha + beta, with shift the
    mean rounded to the coefficient dtype (the input's, float32 for 16-bit input) and the
    rounding error moved into beta. For float32 input x - shift is then exact for x near the
    mean, which keeps outputs accurate for channels whose mean dwarfs their spread (PyTorch's
    x * alpha + beta form loses them), and a constant channel maps to exactly beta.
    """
    keep = 1.0 - momentum
    for c in range(c0, c1):
        mean = means[c]
        m2 = m2s[c]
        invstd = inverse_std(m2 / count, eps)
        save_mean[c] = mean
        save_invstd[c] = invstd
        if update:
            running_mean[c] = keep * np.float64(running_mean[c]) + momentum * mean
            running_var[c] = keep * np.float64(running_var[c]) + momentum * (m2 / (count - 1.0))
        store_affine(coef, c, 1, mean, np.float64(weight[c]) * invstd, bias[c])


@helper
def eval_coefficients(running_mean, running_var, weight, bias, eps, coef):
    """coef[:, c] = (shift, alpha, beta) from the running statistics, as in finish_batch_stats."""
    for c in range(coef.shape[1]):
        alpha = np.float64(weight[c]) * inverse_std(np.float64(running_var[c]), eps)
        store_affine(coef, c, 1, np.float64(running_mean[c]), alpha, bias[c])


@helper
def relu_mask_coefficients(c0, c1, means, invstd, weight, bias, coef):
    """coef[0, c], coef[4, c], coef[5, c] = the forward's (shift, alpha, beta) for channels
    [c0, c1), rebuilt from the statistics it normalized with (saved batch statistics, or the
    running mean and running_invstd in eval), so that the backward's recomputed
    pre-activation has the forward's bits and its ReLU mask is the forward's exactly."""
    for c in range(c0, c1):
        store_affine(coef, c, 4, means[c], np.float64(weight[c]) * invstd[c], bias[c])


@helper
def relu_masked(grad, x, shift, alpha, beta):
    """grad where the pre-activation (x - shift) * alpha + beta is above 0 (or NaN, which
    ReLU passes on), else 0: torch.relu's gradient, which is 0 at exactly 0. A select, not a
    product, so an inf or NaN grad in a masked element gives 0 as in torch.

    `grad > never` is always false (never is +inf, or NaN when alpha is not finite) and
    changes no result, but LLVM cannot prove it: the test reads grad on every path, so a
    vectorized loop loads grad with plain vector loads. Without it LLVM moves the load into
    the unmasked branch and emits masked loads, which the hardware prefetcher does not follow:
    out of cache the masked backward took 2x batch norm's time (run_relu_grad_sums over
    (64, 64, 112, 112) float32: 63-75 ms against 26 ms; 23 ms with this test)."""
    never = alpha * 0 + np.inf
    if (x - shift) * alpha + beta <= 0 and not grad > never:
        return type(grad)(0)
    return grad


@helper
def grad_or_masked(relu, grad, x, shift, alpha, beta):
    """relu_masked(grad, ...) when relu, else grad: the one switch between the plain and the
    fused backward inside a loop (LLVM hoists the loop-invariant test)."""
    if relu:
        return relu_masked(grad, x, shift, alpha, beta)
    return grad


@helper
def output_value(relu, value):
    """relu_value(value) when relu, else value: the forward's switch, as grad_or_masked."""
    if relu:
        return relu_value(value)
    return value


@helper
def relu_value(value):
    """max(value, 0) with NaN passed on, as torch.relu; -0.0 and 0.0 both give 0.0."""
    if value <= 0:
        return type(value)(0)
    return value


@helper
def finish_grads(c0, c1, count, sums_dy, sums_dy_dev, means, invstd, weight, grad_weight,
                 grad_bias, coef):
    """For channels [c0, c1): grad_weight, grad_bias and coef[:, c] = (shift, k_dy, k_x, k_0),
    so that dx = dy*k_dy + (x - shift)*k_x + k_0 is the training-mode gradient through the
    batch statistics,
    dx = w*invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean))).

    sums_dy_dev holds sum(dy * (x - shift)); shift (coef[0, c], set before the reduction)
    differs from the float64 mean by a rounding remainder, removed here.
    """
    for c in range(c0, c1):
        sum_dy = sums_dy[c]
        remainder = means[c] - np.float64(coef[0, c])
        sum_dy_xmu = sums_dy_dev[c] - remainder * sum_dy
        grad_weight[c] = sum_dy_xmu * invstd[c]
        grad_bias[c] = sum_dy
        k_dy = np.float64(weight[c]) * invstd[c]
        k_x = -k_dy * invstd[c] * invstd[c] * sum_dy_xmu / count
        coef[1, c] = k_dy
        coef[2, c] = k_x
        coef[3, c] = -k_dy * sum_dy / count - k_x * remainder


# Split phases: a SyncBatchNorm combines statistics across processes between the passes of a
# training step, so the coefficients come from given global values instead of local sums.

@helper
def given_stats_coefficients(means, invstd, weight, bias, coef):
    """coef[:, c] = (shift, alpha, beta) from given float64 mean and invstd, exactly as
    finish_batch_stats derives them from the batch's own."""
    for c in range(coef.shape[1]):
        store_affine(coef, c, 1, means[c], np.float64(weight[c]) * invstd[c], bias[c])


@helper
def centered_grad_sums(means, coef, sums_dy, sums_dy_dev, sums):
    """sums[:, c] = (sum(dy), sum(dy * (x - mean))) from the sums taken about coef[0, c], the
    mean rounded to the input dtype (as in finish_grads)."""
    for c in range(sums.shape[1]):
        sum_dy = sums_dy[c]
        sums[0, c] = sum_dy
        sums[1, c] = sums_dy_dev[c] - (means[c] - np.float64(coef[0, c])) * sum_dy


@helper
def given_grad_coefficients(count, sums, means, invstd, weight, coef):
    """coef[:, c] = (shift, k_dy, k_x, k_0) from given sums (sum(dy), sum(dy * (x - mean)))
    over count values, as finish_grads derives them from the batch's own."""
    for c in range(coef.shape[1]):
        coef[0, c] = means[c]
        remainder = means[c] - np.float64(coef[0, c])
        k_dy = np.float64(weight[c]) * invstd[c]
        k_x = -k_dy * invstd[c] * invstd[c] * sums[1, c] / count
        coef[1, c] = k_dy
        coef[2, c] = k_x
        coef[3, c] = -k_dy * sums[0, c] / count - k_x * remainder


@parallel_kernel
def finish_merged_moments(count, means, m2s, eps, momentum, update, running_mean, running_var,
                          save_invstd):
    """save_invstd and the running update from merged (count, mean, M2), with the arithmetic
    of finish_batch_stats (so one process gives BatchNorm's bits). Run it serially: it is C
    scalar updates, far too little for a parallel region."""
    keep = 1.0 - momentum
    for c in range(means.shape[0]):
        save_invstd[c] = inverse_std(m2s[c] / count, eps)
        if update:
            running_mean[c] = keep * np.float64(running_mean[c]) + momentum * means[c]
            running_var[c] = (keep * np.float64(running_var[c])
                              + momentum * (m2s[c] / (count - 1.0)))
