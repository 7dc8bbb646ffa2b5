"""One rank of a gloo process group on 127.0.0.1, for test_torch_sync.py.

Usage: python tests/torch_sync_worker.py RANK WORLD PORT OUT_DIR
Trains a small float64 CNN with DistributedDataParallel and fastbn.torch's converted
SyncBatchNorm on this rank's shard of a fixed batch, next to a single-process copy that sees
the whole batch (torch's own BatchNorm2d), and writes OUT_DIR/rank<r>.json: the largest
deviations of losses and parameters per step, digests of the running statistics, and what
bad input on one rank raised on each rank. A rank that raises writes its traceback instead.
"""

import copy
import hashlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import fastbn.torch

N_GLOBAL = 10
STEPS = 5


def shard_bounds(world, rank):
    sizes = [N_GLOBAL // world + (r < N_GLOBAL % world) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    ).double()


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N_GLOBAL, 3, 6, 5, generator=generator, dtype=torch.float64) * 2 + 0.5
    target = torch.randint(0, 4, (N_GLOBAL,), generator=generator)
    return x, target


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_case(rank, world, memory_format):
    start, stop = shard_bounds(world, rank)
    reference = make_model()
    model = fastbn.torch.convert_sync_batchnorm(copy.deepcopy(reference))
    assert sum(isinstance(m, fastbn.torch.SyncBatchNorm) for m in model.modules()) == 3
    reference = reference.to(memory_format=memory_format)
    model = nn.parallel.DistributedDataParallel(model.to(memory_format=memory_format))
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    deviations = []
    for step in range(STEPS):
        x, target = batch(step)
        x = x.contiguous(memory_format=memory_format)
        opt_ref.zero_grad()
        loss_ref = loss_fn(reference(x), target) / N_GLOBAL
        loss_ref.backward()
        opt_ref.step()
        opt.zero_grad()
        # DDP averages gradients over ranks, so each rank's share of the global mean loss is
        # scaled by the number of ranks.
        local = loss_fn(model(x[start:stop]), target[start:stop]) / N_GLOBAL
        (local * world).backward()
        opt.step()
        loss = local.detach().clone()
        dist.all_reduce(loss)
        with torch.no_grad():
            param_dev = max(float((p - q).abs().max() / (q.abs().max() + 1e-300))
                            for p, q in zip(model.module.parameters(), reference.parameters()))
            buffer_dev = max(float((p - q).abs().max() / (q.abs().max() + 1e-300))
                             for p, q in zip(model.module.buffers(), reference.buffers())
                             if p.is_floating_point())
        deviations.append({"loss": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
                           "parameters": param_dev, "buffers": buffer_dev})
    running = digest(*[b for b in model.module.buffers()])
    return {"deviations": deviations, "running": running}


def bad_input_case(rank, world):
    bn = fastbn.torch.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bn(x).sum().backward()
    before = digest(bn.running_mean, bn.running_var, bn.num_batches_tracked)
    bad = rank == world - 1
    outcomes = {}
    for name, given in (("channels", torch.zeros(4, 5, 2, 2, dtype=torch.float64)),
                        ("dtype", x.float())):
        try:
            bn(given if bad else x)
            outcomes[name] = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcomes[name] = [type(exc).__name__, str(exc)]
    outcomes["state_unchanged"] = before == digest(bn.running_mean, bn.running_var,
                                                   bn.num_batches_tracked)
    y = bn(x)  # and the ranks still train in step
    y.sum().backward()
    outcomes["later_step_ok"] = int(bn.num_batches_tracked) == 2
    return outcomes


def main(rank, world, port, out_dir):
    report = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        report["contiguous"] = train_case(rank, world, torch.contiguous_format)
        report["channels_last"] = train_case(rank, world, torch.channels_last)
        report["bad_input"] = bad_input_case(rank, world)
        # Rank 0 hosts the TCP store: tearing it down while another rank still talks to it
        # aborted rank 0 now and then ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        report["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(report, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
