"""fastbn for PyTorch: drop-in batch norm modules running fastbn's kernels on CPU tensors.

    import fastbn.torch
    model = fastbn.torch.convert(model)   # every nn.BatchNorm1d/2d/3d now runs on fastbn

The modules subclass torch's, so everything that works with ``nn.BatchNorm2d`` (state dicts,
``.to()``, hooks, optimizers, ``torch.save``) works with them. CPU float32 and float64 tensors,
and bfloat16 and float16 ones with float32 parameters (torch's mixed precision), run on
fastbn's kernels through registered custom ops (autograd, ``torch.compile`` and
``torch.library.opcheck`` understand them); anything else runs torch's own implementation, see
:func:`fastbn.torch.functional.covered_by_kernels`.

This subpackage is the only part of fastbn that imports torch.
"""

try:
    import torch as _torch  # noqa: F401  (absolute import: the real torch, not this package)
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("fastbn.torch needs PyTorch; install it with the extra: "
                      "pip install 'fastbn[torch]' (which pins torch==2.13.0)") from error

from .functional import batch_norm, batch_norm_relu, covered_by_kernels
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BNReLU1d, BNReLU2d, BNReLU3d, convert
from .sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert",
           "covered_by_kernels", "SyncBatchNorm", "convert_sync_batchnorm", "BNReLU1d",
           "BNReLU2d", "BNReLU3d", "batch_norm_relu"]
