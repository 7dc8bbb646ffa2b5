"""The PyTorch peer of the roofline report, timed in a process of its own.

torch's OpenMP pool and Numba's would fight over the same cores if both ran in one process, so
the report starts ``python -m fastbn.report.torch_peer`` once and asks it for one timing at a time,
as JSON lines on stdin and stdout: each torch cell is timed right after the same fastbn cell.
The machine's bandwidth drifts by tens of percent within minutes, so timing the two within a
second of each other keeps the ratio honest where two separate sweeps would not. The parent
waits on the pipe while the worker runs (and the worker while the parent runs), so the two
never compete for the cores. Progress goes to stderr, shared with the parent.

What is timed, per op, on the same values fastbn sees (built by ``timing.make_problem``): torch's
modules called as a training script calls them, each call allocating its output, like fastbn's
module calls in the parent.
- train_forward: ``module(x)`` in training mode with autograd recording (x, weight and bias
  require grad, as they do in training), updating the running statistics.
- eval_forward: ``module(x)`` in eval mode under ``torch.no_grad()``, as inference runs.
- backward: ``torch.autograd.grad(y, (x, weight, bias), dy)`` on the graph of one training
  forward (kept with ``retain_graph``): the autograd engine and
  ``native_batch_norm_backward``, with all three gradients, as ``loss.backward()`` pays them.

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

from .._validate import resolve_dtype
from .heap import KEPT_HEAP_ENV
from .timing import EPS, MOMENTUM, make_problem, time_op


class TorchPeer:
    """The worker process, driven one request at a time. ``TorchPeer.start`` gives
    (peer, None), or (None, reason) when torch is missing or the worker cannot start."""

    def __init__(self, proc, version, threads):
        self._proc, self.version, self.threads = proc, version, threads

    @classmethod
    def start(cls, dtype, threads, seed=0, keep_heap=True):
        """keep_heap: start the worker with glibc keeping freed memory, as the report's own
        process does (see report/heap.py)."""
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   **(KEPT_HEAP_ENV if keep_heap else {}))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "fastbn.report.torch_peer"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env)
        except OSError as exc:
            return None, f"could not start the torch worker: {exc}"
        peer = cls(proc, None, threads)
        try:
            hello = peer._ask({"cmd": "hello", "dtype": resolve_dtype(dtype).name,
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


def torch_view(tensor, layout):
    """The (N, C, *spatial) view torch's modules take of a tensor stored in layout."""
    if layout == "NHWC" and tensor.ndim > 2:
        return tensor.permute(0, tensor.ndim - 1, *range(1, tensor.ndim - 1))
    return tensor


def torch_tensor(array):
    """A tensor sharing array's memory; 16-bit arrays (torch.from_numpy knows no bfloat16)
    through an int16 view of their bits."""
    import torch

    if array.dtype.itemsize != 2:
        return torch.from_numpy(array)
    bits = torch.from_numpy(array.view(np.int16))
    return bits.view(torch.float16 if array.dtype == np.float16 else torch.bfloat16)


def torch_ops(arrays, layout):
    import torch

    module_class = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                    5: torch.nn.BatchNorm3d}[arrays["x"].ndim]
    # Parameters in the weight's dtype: float32 beside 16-bit input, torch's mixed precision.
    dtype = torch.from_numpy(arrays["weight"][:0]).dtype
    leaf = torch_tensor(arrays["x"]).requires_grad_(True)
    x = torch_view(leaf, layout)
    dy = torch_view(torch_tensor(arrays["dy"]), layout)
    state = {key: torch.from_numpy(arrays[key].copy())
             for key in ("weight", "bias", "running_mean", "running_var")}
    modules = []
    for _ in range(3):
        module = module_class(arrays["weight"].size, eps=EPS, momentum=MOMENTUM, dtype=dtype)
        module.load_state_dict(dict(state, num_batches_tracked=torch.tensor(0)))
        modules.append(module)
    train, inference, differentiated = modules
    inference.eval()
    y = differentiated(x)
    inputs = (leaf, differentiated.weight, differentiated.bias)

    def eval_forward():
        with torch.no_grad():
            inference(x)

    def backward():
        torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return {"train_forward": lambda: train(x), "eval_forward": eval_forward,
            "backward": backward}


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
