"""fastbn.torch against torch's own nn.BatchNorm, as PyTorch users call them: module forward
plus backward through autograd, float32. Skipped (n/a) where torch is not installed, which
includes asv's own environments; run it with ``asv run --python=same`` in an environment
that has the torch extra. asv times each benchmark in a process of its own, so the two
implementations never share a process.
"""

from .common import LAYOUTS, SHAPES, import_torch, numba_threads, parse_shape


class TorchBridgeLayer:
    params = [SHAPES, LAYOUTS, ["torch", "fastbn"]]
    param_names = ["shape", "layout", "batch_norm"]

    def setup(self, shape, layout, batch_norm):
        torch = import_torch()
        if batch_norm == "fastbn":
            try:
                import fastbn.torch as family
            except ImportError:  # a commit from before the bridge existed
                raise NotImplementedError("this fastbn has no fastbn.torch") from None
        else:
            family = torch.nn
        torch.set_num_threads(numba_threads())
        dims = parse_shape(shape)
        module = {2: family.BatchNorm1d, 4: family.BatchNorm2d,
                  5: family.BatchNorm3d}[len(dims)](dims[1])
        x = torch.randn(dims, generator=torch.Generator().manual_seed(0))
        if layout == "NHWC" and x.dim() >= 4:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        self.module, self.x, self.dy = module, x.requires_grad_(), torch.ones_like(x)
        self.time_forward_backward(shape, layout, batch_norm)

    def time_forward_backward(self, shape, layout, batch_norm):
        self.module(self.x).backward(self.dy)
        self.x.grad = None
