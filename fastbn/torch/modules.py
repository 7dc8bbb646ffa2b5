"""``BatchNorm1d/2d/3d`` on fastbn's kernels, as subclasses of torch's, and :func:`convert`.

Only ``forward`` changes: construction, parameters, buffers, state dicts, hooks and modes are
torch's own, so a converted model saves, loads, moves and trains exactly as before.
"""

import torch
from torch import nn

from .functional import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _FastForward:
    """torch's _BatchNorm.forward (momentum=None as a cumulative average, num_batches_tracked,
    batch statistics when training or not tracking), calling fastbn's batch_norm."""

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps)


class BatchNorm1d(_FastForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: (N, C, H, W) input, either memory format."""


class BatchNorm3d(_FastForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: (N, C, D, H, W) input, either memory
    format."""


_REPLACEMENT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                nn.BatchNorm3d: BatchNorm3d}


def _replace(module, cls):
    """A cls instance that is module in everything but its forward: it holds the very same
    Parameter and buffer objects (so an optimizer built earlier still updates them), the same
    hooks, mode and attributes, in containers of its own."""
    replacement = cls.__new__(cls)
    state = dict(module.__dict__)
    for key, value in state.items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules, hook tables, ...
            state[key] = type(value)(value) if type(value) is not dict else dict(value)
    replacement.__dict__.update(state)
    return replacement


def convert(module):
    """Replace every torch.nn.BatchNorm1d/2d/3d inside module with fastbn's, and return it.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: a bare batch norm module passed in
    is itself replaced and the replacement returned; containers are changed in place. Only
    modules whose type is exactly torch's are replaced: subclasses (yours, or already
    converted ones) are left alone, since their forward may do more than batch norm.
    """
    cls = _REPLACEMENT.get(type(module))
    if cls is not None:
        return _replace(module, cls)
    for name, child in module.named_children():
        converted = convert(child)
        if converted is not child:
            module.add_module(name, converted)
    return module
