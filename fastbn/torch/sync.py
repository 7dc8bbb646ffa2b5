"""SyncBatchNorm for CPU tensors over torch.distributed (gloo), and convert_sync_batchnorm.

A thin adapter over the NumPy side. The exchange, its failure status and the rank-order merge
are fastbn.distributed's, run over a torch.distributed process group through
:class:`ProcessGroupComm` (one ``all_gather_single``, formerly ``all_gather_into_tensor``, of
float64 rows per training forward and one per backward). The arithmetic is
fastbn.functional's split training phases on zero-copy NumPy views of the tensors
(fastbn.torch.tensors), inside a torch.autograd.Function.

torch 2.13's ``nn.SyncBatchNorm`` refuses CPU tensors, and DistributedDataParallel refuses CPU
modules that contain it; this class subclasses ``_BatchNorm`` instead, and patches nothing.
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from .. import phases as P
from ..distributed.exchange import Exchange
from .functional import KERNEL_DTYPES
from .modules import _FastForward
from .ops import _torch_thread_count
from .tensors import array_in_layout, as_array, empty_output, in_kernel_layout

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "ProcessGroupComm"]


class ProcessGroupComm:
    """mpi4py's buffer interface (Get_rank, Get_size, Allgather) over a process group."""

    def __init__(self, group=None):
        self.group = group

    def Get_rank(self):
        return dist.get_rank(self.group)

    def Get_size(self):
        return dist.get_world_size(self.group)

    def Allgather(self, sendbuf, recvbuf):
        # all_gather_single is torch 2.13's name for all_gather_into_tensor (now deprecated).
        # gloo takes the concatenated form: rank r's row lands in row r of recvbuf, in place.
        dist.all_gather_single(torch.from_numpy(recvbuf).view(-1), torch.from_numpy(sendbuf),
                               group=self.group)


class _Step:
    """What the autograd function needs besides tensors: settings and the saved statistics."""

    __slots__ = ("exchange", "num_features", "eps", "factor", "running_mean", "running_var",
                 "channels_last", "mean", "invstd", "count")


def _check_local(x, weight, num_features):
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
    if x.shape[1] != num_features:
        raise ValueError(f"input has {x.shape[1]} channels (dim 1) but SyncBatchNorm has "
                         f"num_features={num_features}; shape {tuple(x.shape)}")
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        raise TypeError("fastbn.torch.SyncBatchNorm runs on CPU float32 and float64 tensors, "
                        f"got {x.dtype} on {x.device}")
    if weight is not None and weight.dtype != x.dtype:
        raise TypeError(f"input dtype {x.dtype} differs from the parameters' {weight.dtype}")


class _SyncBatchNormFunction(torch.autograd.Function):
    # Kernels run with torch's thread count, as everywhere in the bridge.
    @staticmethod
    @_torch_thread_count
    def forward(ctx, x, weight, bias, step):
        n = step.num_features

        def local():
            _check_local(x, weight, n)
            x_kernel, channels_last = in_kernel_layout(x)
            x_array = as_array(x_kernel, channels_last)
            if x_array.size == 0:
                zeros = np.zeros(n)
                return (x_kernel, channels_last), Exchange.moments_payload(0, zeros, zeros)
            count, mean, m2 = P._channel_moments(x_array, channels_last)
            return (x_kernel, channels_last), Exchange.moments_payload(count[0], mean, m2)

        (x, channels_last), rows = step.exchange.gather("SyncBatchNorm forward", 2 * n + 1,
                                                         local)
        count, mean, m2 = Exchange.merged_moments(rows)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 "
                             f"value per channel over all {step.exchange.size} ranks")
        y = empty_output(x)
        if count == 0:  # every shard empty: as batch norm on an empty batch
            mean = invstd = np.full(n, np.nan)
        else:
            update = step.running_mean is not None
            invstd = P._merged_stats(count, mean, m2, step.eps, step.factor,
                                     as_array(step.running_mean) if update else None,
                                     as_array(step.running_var) if update else None)
            P._normalize(as_array(x, channels_last), mean, invstd,
                         None if weight is None else as_array(weight),
                         None if bias is None else as_array(bias), channels_last,
                         as_array(y, channels_last))
        step.channels_last, step.mean, step.invstd, step.count = channels_last, mean, invstd, count
        ctx.step = step
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_torch_thread_count
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        step = ctx.step
        channels_last = step.channels_last
        x_array = as_array(x, channels_last)
        dy_array = array_in_layout(grad_y, channels_last)

        def local():
            sums = P._grad_sums(dy_array, x_array, step.mean, channels_last)
            return sums, sums.reshape(-1)

        n = step.num_features
        local_sums, rows = step.exchange.gather("SyncBatchNorm backward", 2 * n, local)
        total = Exchange.summed(rows).reshape(2, n)
        dx = empty_output(x)
        P._grad_input(dy_array, x_array, step.mean, step.invstd,
                      None if weight is None else as_array(weight), total, step.count,
                      channels_last, as_array(dx, channels_last))
        grad_weight = grad_bias = None
        if weight is not None:
            # This rank's contributions, as in torch: DDP's all-reduce gives the global ones.
            grad_weight = torch.from_numpy(local_sums[1] * step.invstd).to(weight.dtype)
            grad_bias = torch.from_numpy(local_sums[0].copy()).to(weight.dtype)
        return dx, grad_weight, grad_bias, None


class SyncBatchNorm(_FastForward, _BatchNorm):
    """Batch normalization with the statistics of the batch of every rank of a process group.

    ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None)`` takes (N, C, ...)
    CPU tensors of 2 to 5 dimensions in either memory format. In training, with
    torch.distributed initialized, each forward and backward makes one collective on
    ``process_group`` (the default group when None), exactly as the NumPy
    :class:`fastbn.SyncBatchNorm` over MPI: same merge, same bits on every rank, same failure
    protocol (bad input on one rank raises on every rank and changes nothing). The gradients of
    weight and bias are the rank's local contributions, which DistributedDataParallel's
    all-reduce turns into the global ones. Eval, or training without an initialized process
    group, normalizes locally like fastbn.torch.BatchNorm2d.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.process_group = process_group
        self._exchange = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _get_exchange(self):
        group = self.process_group
        if self._exchange is None or self._exchange.comm.group is not group:
            self._exchange = Exchange(ProcessGroupComm(group))
        return self._exchange

    def forward(self, input):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        update = self.track_running_stats and self.num_batches_tracked is not None
        step = _Step()
        step.exchange = self._get_exchange()
        step.num_features = self.num_features
        step.eps = self.eps
        step.factor = 0.0
        if update:
            step.factor = (1.0 / (int(self.num_batches_tracked) + 1) if self.momentum is None
                           else self.momentum)
        step.running_mean = self.running_mean if update else None
        step.running_var = self.running_var if update else None
        y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, step)
        if update:
            self.num_batches_tracked.add_(1)
        return y


def convert_sync_batchnorm(module, process_group=None):
    """Replace every batch norm layer in module (any ``_BatchNorm``: torch's BatchNorm1d/2d/3d,
    fastbn.torch's, their subclasses) with a :class:`SyncBatchNorm`, like torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layer is handed the same Parameter and
    buffer objects, mode and qconfig; containers change in place; a batch norm passed in itself
    is replaced and the replacement returned."""
    output = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        output = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    return output
