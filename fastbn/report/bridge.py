"""fastbn.torch measured as PyTorch users run it: `python -m fastbn --bridge` (per layer) and
`python -m fastbn --bridge-model` (a ResNet-18-shaped network, end to end).

Per layer: torch's ``nn.BatchNorm*d`` against fastbn.torch's, forward + backward through
autograd, float32, over the report grid in both memory formats. Each implementation runs in a
worker process of its own, both alive at once and asked cell by cell, so that their OpenMP
pools never share a process and each fastbn cell is timed right beside torch's.

End to end: a ResNet-18-shaped CNN (written here; no torchvision) trains at batch 32 on
112x112 inputs, in NCHW and channels_last, with torch's batch norm and converted, and runs
inference in eval mode. Batch norm's share of the step is measured as the step time minus that
of the same network with every batch norm replaced by an identity. Every configuration runs in
a fresh process, under each OpenMP wait policy asked for, because torch's OpenMP pool and
Numba's share the cores and the policy decides how long an idle pool keeps spinning.
"""

import json
import os
import subprocess
import sys

import numpy as np

from .heap import KEPT_HEAP_ENV
from .timing import DEFAULT_SHAPES, time_op

MEMORY_FORMATS = ("contiguous", "channels_last")
IMPLEMENTATIONS = ("torch", "fastbn")


# ----------------------------------------------------------------------------- workers

def _module_for(torch, impl, shape):
    rank = len(shape)
    if impl == "fastbn":
        import fastbn.torch as ft
        family = {2: ft.BatchNorm1d, 3: ft.BatchNorm1d, 4: ft.BatchNorm2d, 5: ft.BatchNorm3d}
    else:
        nn = torch.nn
        family = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    return family[rank](shape[1])


def _tensor(torch, shape, memory_format, seed):
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=generator) * 2.0 + 0.5
    if memory_format == "channels_last" and t.dim() >= 4:
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


def layer_worker(impl):
    """Serve timing requests for one implementation as JSON lines on stdin/stdout."""
    import torch

    cell = {}  # the last cell's module and tensors: a cell is asked for several rounds
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "hello":
            torch.set_num_threads(request["threads"])
            reply = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        else:
            shape = tuple(request["shape"])
            key = (shape, request["memory_format"])
            if cell.get("key") != key:
                cell.clear()
                cell.update(key=key, module=_module_for(torch, impl, shape),
                            x=_tensor(torch, shape, key[1], 0).requires_grad_(),
                            dy=_tensor(torch, shape, key[1], 1))
            module, x, dy = cell["module"], cell["x"], cell["dy"]

            def step():
                module(x).backward(dy)
                x.grad = None

            reply = time_op(step, budget_s=request["budget_s"])
            if impl == "fastbn":
                import fastbn.torch as ft
                # Which kernels fastbn.torch chose: its own, or torch's (small batches,
                # channels-last tensors of many channels; see fastbn.torch.functional).
                reply["kernels"] = ("fastbn" if ft.covered_by_kernels(
                    x, module.weight, module.bias, module.running_mean, module.running_var)
                    else "torch")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self, impl, threads, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastbn.report.bridge", "layer-worker", impl],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        self.hello = self.ask({"cmd": "hello", "threads": threads})

    def ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a bridge benchmark worker exited (see stderr)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# Each cell is timed in this many rounds, the two workers taking turns in alternating order,
# and each implementation's time is the median of its rounds. One block of 0.5 s per worker,
# back to back, let the machine's drift into the ratio: the same torch kernel, run by both
# workers, read 0.81-1.18x in single blocks.
LAYER_ROUNDS = 5


def run_layers(shapes=DEFAULT_SHAPES, threads=None, budget_s=0.5, out=sys.stdout,
               heap="kept"):
    """Table of forward + backward times per layer; returns the rows as dicts. budget_s: the
    time per implementation and cell, split over LAYER_ROUNDS rounds. heap: "kept" starts both
    workers with glibc keeping freed memory (see report/heap.py), "trimmed" with glibc's
    defaults."""
    import numba

    threads = threads or numba.get_num_threads()
    workers = {impl: _Worker(impl, threads, HEAPS[heap]) for impl in IMPLEMENTATIONS}
    rows = []
    try:
        out.write(f"fastbn.torch per layer: forward + backward through autograd, float32, "
                  f"{threads} threads, torch {workers['torch'].hello['torch']}, heap {heap}\n")
        out.write(f"{'shape':>20} {'memory format':>14} {'torch ms':>10} {'fastbn ms':>10} "
                  f"{'speedup':>8}  fastbn.torch ran\n")
        for shape in shapes:
            for memory_format in MEMORY_FORMATS:
                if memory_format == "channels_last" and len(shape) < 4:
                    continue  # torch has no channels-last format below 4-D
                replies = {impl: [] for impl in IMPLEMENTATIONS}
                for round_ in range(LAYER_ROUNDS):
                    for impl in IMPLEMENTATIONS[::-1] if round_ % 2 else IMPLEMENTATIONS:
                        replies[impl].append(workers[impl].ask(
                            {"cmd": "time", "shape": list(shape),
                             "memory_format": memory_format,
                             "budget_s": budget_s / LAYER_ROUNDS}))
                times = {impl: float(np.median([r["median_s"] for r in rounds]))
                         for impl, rounds in replies.items()}
                row = dict(shape=list(shape), memory_format=memory_format,
                           torch_s=times["torch"], fastbn_s=times["fastbn"],
                           speedup=times["torch"] / times["fastbn"],
                           kernels=replies["fastbn"][0]["kernels"])
                rows.append(row)
                out.write(f"{'x'.join(map(str, shape)):>20} {memory_format:>14} "
                          f"{1e3 * row['torch_s']:10.3f} {1e3 * row['fastbn_s']:10.3f} "
                          f"{row['speedup']:7.2f}x  {row['kernels']}'s kernels\n")
                out.flush()
    finally:
        for worker in workers.values():
            worker.close()
    first = [r["speedup"] for r in rows if r["memory_format"] == "contiguous"]
    last = [r["speedup"] for r in rows if r["memory_format"] == "channels_last"]
    out.write(f"median speedup: channels-first {np.median(first):.2f}x"
              + (f", channels_last {np.median(last):.2f}x" if last else "")
              + f"; slowest cell {min(r['speedup'] for r in rows):.2f}x\n")
    return rows


# ----------------------------------------------------------------------------- end to end

def resnet18_shaped(torch, num_classes=10):
    """ResNet-18's layout: a 7x7 stem, four stages of two basic blocks (64-512 channels,
    1x1 downsampling convolutions with their own batch norm), 20 batch norms in all."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = None
            if stride != 1 or c_in != c_out:
                self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def model_worker(impl, memory_format, batch_norm, steps, batch=32, size=112):
    """Train and infer one configuration; print the median step and inference times."""
    import torch

    torch.manual_seed(0)
    model = resnet18_shaped(torch)
    if batch_norm == "identity":
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    module.add_module(child_name, torch.nn.Identity())
    elif impl == "fastbn":
        import fastbn.torch as ft
        model = ft.convert(model)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    import time
    for _ in range(2):  # compilation, allocator warm-up
        train_step()
    train = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step()
        train.append(time.perf_counter() - start)
    model.eval()
    infer = []
    with torch.no_grad():
        model(x)
        for _ in range(max(3, steps // 2)):
            start = time.perf_counter()
            model(x)
            infer.append(time.perf_counter() - start)
    print(json.dumps({"train_s": float(np.median(train)), "infer_s": float(np.median(infer)),
                      "threads": torch.get_num_threads()}))


WAIT_POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
HEAPS = {"kept": KEPT_HEAP_ENV, "trimmed": {}}


CONFIGURATIONS = (("torch", "batchnorm"), ("fastbn", "batchnorm"), ("torch", "identity"))


def _run_model_worker(impl, memory_format, batch_norm, steps, policy, heap, timeout):
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn.report.bridge", "model-worker", impl, memory_format,
         batch_norm, str(steps)],
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, **WAIT_POLICIES[policy], **HEAPS[heap]))
    if proc.returncode != 0:
        raise RuntimeError(f"model worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_model(steps=20, policies=("default", "passive"), rounds=2, out=sys.stdout,
              timeout=1800, heap="kept"):
    """The end-to-end table: step and inference times, batch norm's share, speedups.

    Every configuration runs once per round, in a fresh process, one after the other. Times are
    the fastest round's (other processes on the machine only add time). Speedups are the median
    over rounds of each round's ratio, torch's time over the converted model's: this machine's
    speed drifts by several percent over minutes, which the two processes of one round share
    and the fastest rounds of the two need not."""
    rows = []
    out.write(f"ResNet-18-shaped CNN, batch 32, 3x112x112, {steps} training steps "
              f"(median step; time: best of {rounds} interleaved rounds, speedup: median of "
              f"the rounds' ratios), float32, heap {heap}\n")
    out.write(f"{'wait policy':>11} {'format':>14} {'batch norm':>10} {'train ms':>9} "
              f"{'infer ms':>9} {'BN share':>9} {'train speedup':>14} {'infer speedup':>14}\n")
    for policy in policies:
        for memory_format in MEMORY_FORMATS:
            runs = {"torch": [], "fastbn": [], "none": []}
            for _ in range(rounds):
                for impl, batch_norm in CONFIGURATIONS:
                    key = impl if batch_norm == "batchnorm" else "none"
                    runs[key].append(_run_model_worker(impl, memory_format, batch_norm, steps,
                                                       policy, heap, timeout))
            best = {key: {k: min(r[k] for r in results) for k in ("train_s", "infer_s")}
                    for key, results in runs.items()}

            def ratios(impl, k):
                return [t[k] / r[k] for t, r in zip(runs["torch"], runs[impl])]

            base = best["none"]
            for impl in ("torch", "fastbn"):
                r = best[impl]
                share = (r["train_s"] - base["train_s"]) / r["train_s"]
                row = dict(policy=policy, memory_format=memory_format, batch_norm=impl,
                           train_s=r["train_s"], infer_s=r["infer_s"], bn_share=share,
                           train_speedup=float(np.median(ratios(impl, "train_s"))),
                           infer_speedup=float(np.median(ratios(impl, "infer_s"))),
                           train_ratios=ratios(impl, "train_s"))
                rows.append(row)
                out.write(f"{policy:>11} {memory_format:>14} {impl:>10} "
                          f"{1e3 * r['train_s']:9.1f} {1e3 * r['infer_s']:9.1f} "
                          f"{100 * share:8.1f}% {row['train_speedup']:13.2f}x "
                          f"{row['infer_speedup']:13.2f}x\n")
                out.flush()
            out.write(f"{policy:>11} {memory_format:>14} {'(none)':>10} "
                      f"{1e3 * base['train_s']:9.1f} {1e3 * base['infer_s']:9.1f}\n")
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "layer-worker":
        layer_worker(sys.argv[2])
    elif sys.argv[1] == "model-worker":
        model_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(f"unknown worker {sys.argv[1]!r}")
