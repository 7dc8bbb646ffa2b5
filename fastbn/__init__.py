"""fastbn: fast, PyTorch-exact batch normalization for NumPy arrays on the CPU."""

from .functional import (batch_norm, batch_norm_backward, batch_norm_forward, channel_moments,
                         merge_moments)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "batch_norm_forward",
           "batch_norm_backward", "channel_moments", "merge_moments"]
__version__ = "0.1.0"
