"""The PyTorch peer of the roofline report, timed in a process of its own.

torch's OpenMP pool and Numba's would fight over the same cores if both ran in one process, so
the report starts ``python -m fastbn._bench_torch``, sends the grid as JSON on stdin, and reads
JSON timings from stdout; progress goes to stderr, which the child shares with the parent.
The child runs no Numba kernel (importing the package loads Numba but starts no threads).

What is timed, per op, on the same values fastbn sees (built by ``_report.make_problem``):
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

from ._report import EPS, MOMENTUM, make_problem, shape_label, stderr_is_terminal, time_op


def time_torch(shapes, ops, layouts, dtype, threads, timing, seed=0):
    """Run the torch worker: (result dict, None), or (None, reason) when torch is missing or
    the worker fails. timing holds time_op's keyword arguments."""
    request = {"shapes": [list(s) for s in shapes], "ops": list(ops), "layouts": list(layouts),
               "dtype": np.dtype(dtype).name, "threads": threads, "timing": timing,
               "seed": seed}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "fastbn._bench_torch"],
                              input=json.dumps(request), stdout=subprocess.PIPE, text=True,
                              env=env, check=False)
    except OSError as exc:
        return None, f"could not start the torch worker: {exc}"
    if proc.returncode == 3:
        return None, "torch is not installed"
    if proc.returncode != 0:
        return None, f"torch worker failed with exit code {proc.returncode} (see stderr)"
    return json.loads(proc.stdout), None


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
    request = json.load(sys.stdin)
    try:
        import torch
    except ImportError:
        sys.exit(3)
    torch.set_num_threads(request["threads"])
    cells = [(tuple(s), layout, op) for s in request["shapes"] for layout in request["layouts"]
             for op in request["ops"]]
    terminal = stderr_is_terminal()
    results = []
    problem, ops = {}, {}
    for index, (shape, layout, op) in enumerate(cells, 1):
        if shape not in problem:
            problem.clear()  # release the previous arrays before filling the next ones
            ops.clear()
            problem[shape] = make_problem(shape, request["dtype"], request["seed"])
        if layout not in ops:
            ops[layout] = torch_ops(problem[shape][layout], layout)
        timing = time_op(ops[layout][op], **request["timing"])
        label = f"torch  [{index:>3}/{len(cells)}] {op:<13} {layout} {shape_label(shape)}"
        print(("\r" if terminal else "") + f"{label:<60} {timing['median_s'] * 1e3:9.3f} ms",
              end="" if terminal else "\n", file=sys.stderr, flush=True)
        results.append({"shape": list(shape), "layout": layout, "op": op, **timing})
    if terminal:
        print(file=sys.stderr)
    json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
               "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
