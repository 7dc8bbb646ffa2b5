"""Per-channel moments as mergeable partials, and the per-channel coefficient arithmetic.

A partial is (count, mean, M2) with M2 = sum((x - mean)**2), always in float64. Each block of
input yields one partial from two passes over the block while it sits in L1: the first finds
the block mean relative to the block's first value, the second sums squared deviations from
that mean. Shifting by a value of the block keeps constant blocks exact (every deviation is 0.0,
so the mean is that value and M2 is exactly 0) and keeps large offsets such as 1e6 from eating
the precision of the deviations. Blocks are combined with Chan's pairwise update in a fixed
order, so a result never depends on how many threads produced the partials. A later
cross-process SyncBatchNorm exchanges exactly these partials.

Everything here is a small @njit helper that the kernels inline; nothing validates.
"""

import numpy as np

from ._jit import helper


@helper
def plane_moments(plane, lo, hi):
    """(mean, M2) of plane[lo:hi], a contiguous run of one channel."""
    shift = np.float64(plane[lo])
    total = 0.0
    for i in range(lo, hi):
        total += np.float64(plane[i]) - shift
    mean_offset = total / (hi - lo)
    m2 = 0.0
    for i in range(lo, hi):
        deviation = (np.float64(plane[i]) - shift) - mean_offset
        m2 += deviation * deviation
    return shift + mean_offset, m2


@helper
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s combination of two partials; counts are float64."""
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = count_b / count
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * count_a * weight_b
    return count, mean, m2


@helper
def inverse_std(var, eps):
    """1/sqrt(var + eps), and 0 where both are 0, as PyTorch's CPU kernel defines it."""
    if var == 0.0 and eps == 0.0:
        return 0.0
    return 1.0 / np.sqrt(var + eps)


@helper
def update_running(running_mean, running_var, c, mean, var_unbiased, momentum):
    """running = (1 - momentum) * running + momentum * batch, computed in float64."""
    keep = 1.0 - momentum
    running_mean[c] = keep * np.float64(running_mean[c]) + momentum * mean
    running_var[c] = keep * np.float64(running_var[c]) + momentum * var_unbiased


@helper
def set_affine_coefficients(coef, c, mean, invstd, weight_c, bias_c):
    """coef[:, c] = (shift, alpha, beta) so that y = (x - shift) * alpha + beta.

    shift is the mean rounded to the input dtype, and the rounding error goes into beta. For
    float32 input x - shift is then exact for x near the mean, which keeps outputs accurate for
    channels whose mean dwarfs their spread (PyTorch's x * alpha + beta form loses them), and a
    constant channel maps to exactly beta.
    """
    alpha = weight_c * invstd
    coef[0, c] = mean  # the store rounds to the input dtype
    mean_remainder = mean - np.float64(coef[0, c])
    coef[1, c] = alpha
    coef[2, c] = bias_c - mean_remainder * alpha


@helper
def set_backward_coefficients(coef, c, mean, invstd, weight_c, sum_dy, sum_dy_xmu, count):
    """coef[:, c] = (shift, k_dy, k_x, k_0) so that dx = dy*k_dy + (x - shift)*k_x + k_0.

    This is the training-mode gradient through the batch statistics,
    dx = w*invstd * (dy - mean(dy) - (x - mean) * invstd**2 * mean(dy * (x - mean))),
    with the same shift split as the forward pass.
    """
    coef[0, c] = mean  # the store rounds to the input dtype
    mean_remainder = mean - np.float64(coef[0, c])
    k_dy = weight_c * invstd
    k_x = -k_dy * invstd * invstd * sum_dy_xmu / count
    k_0 = -k_dy * sum_dy / count - k_x * mean_remainder
    coef[1, c] = k_dy
    coef[2, c] = k_x
    coef[3, c] = k_0


@helper
def finish_batch_channel(c, count, mean, m2, eps, momentum, update, running_mean, running_var,
                         weight, bias, save_mean, save_invstd, coef):
    """From a channel's merged batch moments: saved statistics, running update, coefficients."""
    invstd = inverse_std(m2 / count, eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    if update:
        update_running(running_mean, running_var, c, mean, m2 / (count - 1.0), momentum)
    set_affine_coefficients(coef, c, mean, invstd, np.float64(weight[c]), np.float64(bias[c]))


@helper
def finish_grad_channel(c, count, sum_dy, sum_dy_dev, mean, invstd, weight, grad_weight,
                        grad_bias, coef):
    """From a channel's gradient sums: grad_weight, grad_bias and the dx coefficients.

    sum_dy_dev is sum(dy * (x - shift)); shift differs from the float64 mean by a rounding
    remainder, removed here so that sum_dy_xmu is sum(dy * (x - mean)).
    """
    sum_dy_xmu = sum_dy_dev - (mean - np.float64(coef[0, c])) * sum_dy
    grad_weight[c] = sum_dy_xmu * invstd
    grad_bias[c] = sum_dy
    set_backward_coefficients(coef, c, mean, invstd, np.float64(weight[c]), sum_dy, sum_dy_xmu,
                              count)
