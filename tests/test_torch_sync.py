"""fastbn.torch.SyncBatchNorm: DDP training over 2 and 3 gloo processes on 127.0.0.1 tracks a
single process on the whole batch; in-process checks over a one-rank gloo group (gradcheck,
parity, convert_sync_batchnorm, no communication in eval)."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fastbn.torch as ft  # noqa: E402
from fastbn.distributed import Exchange  # noqa: E402

pytestmark = pytest.mark.torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "torch_sync_worker.py"
TIMEOUT = 600
# gloo connects ranks on the interface of the host name unless told otherwise: keep to lo.
LOOPBACK_ENV = {"PYTHONPATH": str(REPO_ROOT), "GLOO_SOCKET_IFNAME": "lo"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world, tmp_path):
    env = dict(os.environ, **LOOPBACK_ENV, NUMBA_NUM_THREADS="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path))
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a gloo rank hung for {TIMEOUT} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{output}"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    for rank, report in enumerate(reports):
        assert "error" not in report, f"rank {rank}:\n{report['error']}"
    return reports


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_tracks_one_process_on_the_whole_batch(world, tmp_path):
    reports = launch(world, tmp_path)
    for layout in ("contiguous", "channels_last"):
        for report in reports:
            deviations = report[layout]["deviations"]
            assert len(deviations) == 5
            for step, deviation in enumerate(deviations):
                for name, value in deviation.items():
                    assert value <= 1e-10, (layout, report["rank"], step, name, value)
        assert len({report[layout]["running"] for report in reports}) == 1, layout
    bad = world - 1
    for rank, report in enumerate(reports):
        outcomes = report["bad_input"]
        for name, own in (("channels", "ValueError"), ("dtype", "TypeError")):
            kind, message = outcomes[name]
            assert kind == (own if rank == bad else "Peer" + own), (rank, name, kind)
            if rank != bad:
                assert f"failed on rank {bad} of {world}" in message
        assert outcomes["state_unchanged"] and outcomes["later_step_ok"]


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class CountingComm:
    """A one-rank communicator that counts collectives (the group attribute matches the
    module's process_group, so the module keeps this exchange)."""

    group = None

    def __init__(self):
        self.calls = 0

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, sendbuf, recvbuf):
        self.calls += 1
        recvbuf[0] = sendbuf


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_one_rank_matches_torch_batch_norm(one_rank_group, memory_format):
    torch.manual_seed(1)
    x = (torch.randn(5, 4, 3, 6, dtype=torch.float64) * 3 + 1).contiguous(
        memory_format=memory_format)
    dy = torch.randn(5, 4, 3, 6, dtype=torch.float64)
    ours = ft.SyncBatchNorm(4, momentum=None, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
    results = []
    for module in (ours, theirs):
        for _ in range(2):
            xi = x.detach().clone().requires_grad_()
            y = module(xi)
            y.backward(dy)
        results.append((y, xi.grad, module.weight.grad, module.bias.grad, module.running_mean,
                        module.running_var))
    for name, a, b in zip(("y", "dx", "grad_weight", "grad_bias", "running_mean",
                           "running_var"), *results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert results[0][0].is_contiguous(memory_format=memory_format)


def test_gradcheck_through_the_exchange(one_rank_group):
    bn = ft.SyncBatchNorm(3, dtype=torch.float64, track_running_stats=False)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    # weight and bias are the module's own parameters: gradcheck perturbs them in place.
    assert torch.autograd.gradcheck(lambda x, weight, bias: bn(x), (x, bn.weight, bn.bias))


def test_one_collective_per_training_step_and_none_in_eval(one_rank_group):
    bn = ft.SyncBatchNorm(3, dtype=torch.float64)
    comm = CountingComm()
    bn._exchange = Exchange(comm)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    bn(x).sum().backward()
    assert comm.calls == 2
    bn.eval()
    bn(x).sum().backward()
    assert comm.calls == 2
    assert int(bn.num_batches_tracked) == 1


def test_is_a_batch_norm_but_not_torch_sync_batch_norm():
    bn = ft.SyncBatchNorm(3)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(bn, torch.nn.SyncBatchNorm)
    # Without a process group, training normalizes locally, like BatchNorm.
    x = torch.randn(6, 3)
    torch.testing.assert_close(bn(x), torch.nn.BatchNorm1d(3)(x))


def test_convert_sync_batchnorm_hands_over_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4, affine=False)),
                                ft.BatchNorm3d(2))
    model.eval()
    originals = [model[1], model[2][0], model[3]]
    converted = ft.convert_sync_batchnorm(copy.copy(model), process_group=None)
    replaced = [converted[1], converted[2][0], converted[3]]
    for old, new in zip(originals, replaced):
        assert type(new) is ft.SyncBatchNorm and not new.training
        assert new.running_mean is old.running_mean and new.running_var is old.running_var
        assert new.num_batches_tracked is old.num_batches_tracked
        assert new.weight is old.weight and new.bias is old.bias
        assert (new.num_features, new.eps, new.momentum, new.affine) == (
            old.num_features, old.eps, old.momentum, old.affine)
    bare = torch.nn.BatchNorm2d(5)
    assert type(ft.convert_sync_batchnorm(bare)) is ft.SyncBatchNorm
    already = ft.SyncBatchNorm(5)
    assert ft.convert_sync_batchnorm(already) is already


def test_bad_input_raises_locally_with_one_rank(one_rank_group):
    bn = ft.SyncBatchNorm(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="input has 4 channels"):
        bn(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="differs from the parameters"):
        bn(torch.zeros(2, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.zeros(1, 3, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_var.numpy(), np.ones(3))


def test_readme_torch_example_runs_as_written(tmp_path):
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("**PyTorch, over torch.distributed.**"):]
    start = section.index("```python\n") + len("```python\n")
    script = tmp_path / "sync_torch_example.py"
    script.write_text(section[start:section.index("```", start)])
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, **LOOPBACK_ENV),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    # With PYTHONUNBUFFERED a print is two writes (text, then newline), so the two ranks' lines
    # can interleave on the shared pipe: find the reports anywhere in the output.
    reports = sorted(re.findall(r"rank (\d): running_mean\[:3\] = (\[[^\]]*\])", done.stdout))
    assert [rank for rank, _ in reports] == ["0", "1"], done.stdout
    assert reports[0][1] == reports[1][1]  # bitwise, as printed
