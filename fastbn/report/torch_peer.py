"""The PyTorch peer of the roofline report, timed in a process of its own.

torch's OpenMP pool and Numba's would fight over the same cores if both ran in one process, so
the report starts ``python -m fastbn.report.torch_peer`` once and asks it for one timing at a time,
as JSON lines on stdin and stdout: each torch cell is timed right after the same fastbn cell.
The machine's bandwidth drifts by tens of percent within minutes, so timing the two within a
second of each other keeps the ratio honest where two separate sweeps would not. The parent
waits on the pipe while the worker runs (and the worker while the parent runs), so the two
never compete for the cores. Progress goes to stderr, shared with the parent.

What is timed, per op, on the same values fastbn sees (built by ``timing.make_problem``):
- train_forward: ``F.batch_norm(..., training=True)`` under ``torch.no_grad()``, updating the
  running statistics like fastbn does.
- eval_forward: ``F.batch_norm(..., training=False)`` under ``torch.no_grad()``.
- backward: ``torch.ops.aten.native_batch_norm_backward`` with the saved statistics of a
  training forward and all three gradients requested. That is the kernel autograd calls, without
  re-running the forward or the autograd engine, so it isolates the backward cost.
torch has no ``out=`` here, so its timings include allocating the output.

Layouts: NHWC arrays are handed to torch as the permuted view of the same memory, which is
torch's channels_last format for 4-D and channels_last_3d for 5-D input. torch has no
channels-last format for 3-D input, so an (N, L, C) array is a non-contiguous (N, C, L) view to
torch (it handles that as it handles any strided input); 2-D (N, C) is one layout in both.
"""

import json
import os
import subprocess
import sys

import numpy as np

from .timing import EPS, MOMENTUM, make_problem, time_op


class TorchPeer:
    """The worker process, driven one request at a time. ``TorchPeer.start`` gives
    (peer, None), or (None, reason) when torch is missing or the worker cannot start."""

    def __init__(self, proc, version, threads):
        self._proc, self.version, self.threads = proc, version, threads

    @classmethod
    def start(cls, dtype, threads, seed=0):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "fastbn.report.torch_peer"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env)
        except OSError as exc:
            return None, f"could not start the torch worker: {exc}"
        peer = cls(proc, None, threads)
        try:
            hello = peer._ask({"cmd": "hello", "dtype": np.dtype(dtype).name,
                               "threads": threads, "seed": seed})
        except RuntimeError:
            code = proc.wait()
            if code == 3:
                return None, "torch is not installed"
            return None, f"torch worker failed with exit code {code} (see stderr)"
        peer.version, peer.threads = hello["torch"], hello["threads"]
        return peer, None

    def _ask(self, request):
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise RuntimeError("the torch worker exited (see stderr)")
        return json.loads(line)

    def load(self, shape):
        """Fill the worker's inputs for shape (the same values as make_problem's)."""
        self._ask({"cmd": "load", "shape": list(shape)})

    def time(self, layout, op, timing):
        """time_op's result for one op of the loaded shape."""
        return self._ask({"cmd": "time", "layout": layout, "op": op, "timing": timing})

    def close(self):
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait()


def torch_view(array, layout):
    """The torch tensor of an (N, C, *spatial) problem, sharing the array's memory."""
    import torch

    tensor = torch.from_numpy(array)
    if layout == "NHWC" and array.ndim > 2:
        return tensor.permute(0, array.ndim - 1, *range(1, array.ndim - 1))
    return tensor


def torch_ops(arrays, layout):
    import torch
    import torch.nn.functional as F

    x, dy = torch_view(arrays["x"], layout), torch_view(arrays["dy"], layout)
    w, b = torch.from_numpy(arrays["weight"]), torch.from_numpy(arrays["bias"])
    running_mean = torch.from_numpy(arrays["running_mean"].copy())
    running_var = torch.from_numpy(arrays["running_var"].copy())
    eval_mean = torch.from_numpy(arrays["running_mean"])
    eval_var = torch.from_numpy(arrays["running_var"])
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, w, b, running_mean.clone(), running_var.clone(), True, MOMENTUM, EPS)

    def train_forward():
        with torch.no_grad():
            F.batch_norm(x, running_mean, running_var, w, b, True, MOMENTUM, EPS)

    def eval_forward():
        with torch.no_grad():
            F.batch_norm(x, eval_mean, eval_var, w, b, False, MOMENTUM, EPS)

    def backward():
        torch.ops.aten.native_batch_norm_backward(dy, x, w, running_mean, running_var,
                                                  save_mean, save_invstd, True, EPS,
                                                  [True, True, True])

    return {"train_forward": train_forward, "eval_forward": eval_forward, "backward": backward}


def main():
    try:
        import torch
    except ImportError:
        sys.exit(3)
    settings, problem, ops = {}, None, {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "hello":
            settings = request
            torch.set_num_threads(request["threads"])
            reply = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        elif request["cmd"] == "load":
            problem = ops = None  # release the previous arrays before filling the next ones
            problem = make_problem(tuple(request["shape"]), settings["dtype"], settings["seed"])
            ops = {layout: torch_ops(problem[layout], layout) for layout in problem}
            reply = {}
        else:
            reply = time_op(ops[request["layout"]][request["op"]], **request["timing"])
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
