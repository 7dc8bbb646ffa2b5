"""``BatchNorm1d/2d/3d`` on fastbn's kernels, as subclasses of torch's, and :func:`convert`.

Only ``forward`` changes: construction, parameters, buffers, state dicts, hooks and modes are
torch's own, so a converted model saves, loads, moves and trains exactly as before.
``BNReLU1d/2d/3d`` are the same modules with a ReLU fused into the normalize pass.
"""

from torch import nn

from .functional import batch_norm, batch_norm_relu

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNReLU1d", "BNReLU2d", "BNReLU3d",
           "convert"]


class _FastForward:
    """torch's _BatchNorm.forward (momentum=None as a cumulative average, num_batches_tracked,
    batch statistics when training or not tracking), calling fastbn's batch_norm (or
    batch_norm_relu, for the BNReLU modules)."""

    _relu = False

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
        normalize = batch_norm_relu if self._relu else batch_norm
        return normalize(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          use_batch_stats, factor, self.eps)


class BatchNorm1d(_FastForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: (N, C, H, W) input, either memory format."""


class BatchNorm3d(_FastForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: (N, C, D, H, W) input, either memory
    format."""


class BNReLU1d(BatchNorm1d):
    """torch.nn.BatchNorm1d followed by torch.nn.ReLU, fused in fastbn's kernels: the ReLU
    costs no pass of its own and its backward keeps no extra tensor (the mask is recomputed
    from the input). Parameters, buffers and state_dict keys are BatchNorm1d's (unlike
    torch.ao.nn.intrinsic.BNReLU2d, a Sequential whose keys start with "0.")."""

    _relu = True


class BNReLU2d(BatchNorm2d):
    """torch.nn.BatchNorm2d followed by torch.nn.ReLU, fused (see BNReLU1d)."""

    _relu = True


class BNReLU3d(BatchNorm3d):
    """torch.nn.BatchNorm3d followed by torch.nn.ReLU, fused (see BNReLU1d)."""

    _relu = True


_REPLACEMENT = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                nn.BatchNorm3d: BatchNorm3d}
_FUSED = {nn.BatchNorm1d: BNReLU1d, nn.BatchNorm2d: BNReLU2d, nn.BatchNorm3d: BNReLU3d}


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


def convert(module, fuse_relu=False):
    """Replace every torch.nn.BatchNorm1d/2d/3d inside module with fastbn's, and return it.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: a bare batch norm module passed in
    is itself replaced and the replacement returned; containers are changed in place. Only
    modules whose type is exactly torch's are replaced: subclasses (yours, or already
    converted ones) are left alone, since their forward may do more than batch norm.

    With ``fuse_relu=True``, a batch norm immediately followed by an ``nn.ReLU`` inside an
    ``nn.Sequential`` becomes a BNReLU module and the ReLU an ``nn.Identity`` (so indices and
    state_dict keys stay as they were). It only sees that structure: a ReLU applied in a
    ``forward`` (``F.relu``, ``torch.relu``, or a ReLU module called there, as in torchvision's
    ResNet blocks), a ReLU that is not the next child of the same Sequential, other
    activations (ReLU6, LeakyReLU), and a batch norm or ReLU with forward hooks (whose output
    the fusion would change) are left as ``convert(model)`` leaves them.
    """
    cls = _REPLACEMENT.get(type(module))
    if cls is not None:
        return _replace(module, cls)
    children = list(module.named_children())
    fused_relus = set()
    if fuse_relu and isinstance(module, nn.Sequential):
        for (name, child), (next_name, following) in zip(children, children[1:]):
            if (type(child) in _FUSED and type(following) is nn.ReLU
                    and not _has_forward_hooks(child) and not _has_forward_hooks(following)):
                module.add_module(name, _replace(child, _FUSED[type(child)]))
                module.add_module(next_name, nn.Identity())
                fused_relus.add(next_name)
    for name, child in children:
        if name in fused_relus:
            continue
        current = module._modules[name]
        converted = convert(current, fuse_relu) if current is child else current
        if converted is not current:
            module.add_module(name, converted)
    return module


def _has_forward_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks)
