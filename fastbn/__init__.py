"""fastbn: fast, PyTorch-exact batch normalization for NumPy arrays on the CPU."""

from .distributed import SyncBatchNorm
from .fold import fold_batch_norm
from .functional import (batch_norm, batch_norm_backward, batch_norm_forward,
                         batch_norm_grad_input, batch_norm_grad_sums, batch_norm_merged_stats,
                         batch_norm_normalize, batch_norm_relu, batch_norm_relu_backward,
                         batch_norm_relu_forward, channel_moments, merge_moments)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BNReLU1d, BNReLU2d, BNReLU3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "batch_norm_forward",
           "batch_norm_backward", "channel_moments", "merge_moments", "SyncBatchNorm",
           "batch_norm_merged_stats", "batch_norm_normalize", "batch_norm_grad_sums",
           "batch_norm_grad_input", "batch_norm_relu", "batch_norm_relu_forward",
           "batch_norm_relu_backward", "BNReLU1d", "BNReLU2d", "BNReLU3d", "fold_batch_norm"]
__version__ = "0.1.0"
