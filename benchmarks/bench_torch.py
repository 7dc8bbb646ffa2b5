"""PyTorch's CPU batch norm beside fastbn on the dashboard; skipped (n/a) without torch.

asv runs every benchmark in a process of its own, so torch's OpenMP pool never shares a
process with Numba's here. torch gets Numba's thread count. torch has no out=, so its times
include allocating the result. Backward calls the aten kernel autograd uses,
native_batch_norm_backward, on saved statistics: no forward and no autograd engine inside the
timing. torch is imported in setup, not at module level, so that asv's benchmark discovery
and the fastbn suites never load it.
"""

from .common import (EPS, MOMENTUM, PARAM_NAMES, PARAMS, import_torch, make_arrays,
                     numba_threads, torch_view)


class TorchPeer:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, shape, layout, dtype):
        torch = import_torch()
        torch.set_num_threads(numba_threads())
        a = make_arrays(shape, layout, dtype)
        self.torch = torch
        self.F = torch.nn.functional
        self.x, self.dy = torch_view(torch, a["x"], layout), torch_view(torch, a["dy"], layout)
        self.w, self.b = torch.from_numpy(a["weight"]), torch.from_numpy(a["bias"])
        self.rm, self.rv = torch.from_numpy(a["running_mean"]), torch.from_numpy(a["running_var"])
        _, self.save_mean, self.save_invstd = torch.ops.aten.native_batch_norm(
            self.x, self.w, self.b, self.rm.clone(), self.rv.clone(), True, MOMENTUM, EPS)
        self.time_train_forward(shape, layout, dtype)
        self.time_eval_forward(shape, layout, dtype)
        self.time_backward(shape, layout, dtype)

    def time_train_forward(self, shape, layout, dtype):
        with self.torch.no_grad():
            self.F.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True, MOMENTUM, EPS)

    def time_eval_forward(self, shape, layout, dtype):
        with self.torch.no_grad():
            self.F.batch_norm(self.x, self.rm, self.rv, self.w, self.b, False, MOMENTUM, EPS)

    def time_backward(self, shape, layout, dtype):
        self.torch.ops.aten.native_batch_norm_backward(
            self.dy, self.x, self.w, self.rm, self.rv, self.save_mean, self.save_invstd, True,
            EPS, [True, True, True])
