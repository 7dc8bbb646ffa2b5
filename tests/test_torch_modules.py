"""fastbn.torch as a drop-in: the modules behave as torch modules, convert() replaces exactly
torch's batch norms and shares their state, torch.compile compiles them, and fastbn itself
never needs torch."""

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as ft  # noqa: E402
from torch_cases import assert_same_step, compiled_copy, random_tensor  # noqa: E402

pytestmark = pytest.mark.torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Stack(torch.nn.Module):
    """Blocks held in a ModuleList, the other container convert must walk."""

    def __init__(self, channels, depth):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(channels) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class MyBatchNorm(torch.nn.BatchNorm2d):
    """A user's subclass: its forward may do more than batch norm, so convert leaves it."""

    def forward(self, x):
        return super().forward(x) * 2


def nested_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(Block(4), Stack(4, 2)),
        MyBatchNorm(4),
        torch.nn.Flatten(2),
        torch.nn.BatchNorm1d(4, affine=False),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 36, 5),
        torch.nn.BatchNorm1d(5, track_running_stats=False),
    )


def batch_norms(model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_constructor_and_identity_are_torchs():
    module = ft.BatchNorm2d(8, eps=1e-3, momentum=None, affine=True, track_running_stats=True,
                            device="cpu", dtype=torch.float64)
    reference = torch.nn.BatchNorm2d(8, eps=1e-3, momentum=None, dtype=torch.float64)
    assert isinstance(module, torch.nn.BatchNorm2d)
    assert isinstance(ft.BatchNorm1d(3), torch.nn.BatchNorm1d)
    assert isinstance(ft.BatchNorm3d(3), torch.nn.BatchNorm3d)
    assert list(module.state_dict()) == list(reference.state_dict())
    assert isinstance(module.weight, torch.nn.Parameter) and module.weight.dtype == torch.float64
    assert dict(module.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert repr(module) == repr(reference)


HOOK_CALLS = []


def record_output_dtype(module, inputs, output):
    HOOK_CALLS.append(output.dtype)


def test_to_double_save_load_deepcopy_and_hooks(tmp_path, rng):
    module = ft.BatchNorm2d(3)
    HOOK_CALLS.clear()
    module.register_forward_hook(record_output_dtype)
    module.double()
    assert module.weight.dtype == module.running_mean.dtype == torch.float64
    x = random_tensor(rng, (4, 3, 5, 5), np.float64)
    module(x)
    assert HOOK_CALLS == [torch.float64]
    path = tmp_path / "bn.pt"
    torch.save(module, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is ft.BatchNorm2d
    for other in (loaded, copy.deepcopy(module)):
        assert torch.equal(other.running_mean, module.running_mean)
        assert torch.equal(other.running_var, module.running_var)
        assert int(other.num_batches_tracked) == 1
        other.eval()
        module.eval()
        torch.testing.assert_close(other(x), module(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    plain = torch.nn.BatchNorm2d(3).double()
    plain.load_state_dict(torch.load(buffer))
    assert torch.equal(plain.running_var, module.running_var)


def test_convert_replaces_exactly_torchs_batch_norms():
    model = nested_model()
    before = {name: (type(m), m) for name, m in model.named_modules()}
    originals = dict(batch_norms(model))
    converted = ft.convert(model)
    assert converted is model  # containers are changed in place, like torch's converter
    replaced = {torch.nn.BatchNorm1d: ft.BatchNorm1d, torch.nn.BatchNorm2d: ft.BatchNorm2d}
    for name, module in model.named_modules():
        kind, original = before[name]
        if kind in replaced:
            assert type(module) is replaced[kind], name
            assert module is not original
            assert module.training == original.training
            assert list(module.parameters()) == list(original.parameters()) or all(
                a is b for a, b in zip(module.parameters(), original.parameters()))
            for key, buffer in original.named_buffers():
                assert getattr(module, key) is buffer, (name, key)
            for key, param in original.named_parameters():
                assert getattr(module, key) is param, (name, key)
        else:
            assert type(module) is kind, name
    assert type(model[3]) is MyBatchNorm
    assert len(originals) == 7


def test_convert_keeps_mode_counters_and_hooks():
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    bn.eval()
    seen = []
    bn.register_forward_pre_hook(lambda m, inputs: seen.append(type(m)))
    fast = ft.convert(bn)  # a bare batch norm is itself replaced
    assert type(fast) is ft.BatchNorm2d and not fast.training
    assert fast.num_batches_tracked is bn.num_batches_tracked
    assert int(fast.num_batches_tracked) == 1
    fast(torch.randn(4, 3, 2, 2))
    assert seen == [ft.BatchNorm2d]
    # The replacement's containers are its own: registering on it leaves the original alone.
    fast.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(bn.named_buffers())
    assert ft.convert(fast) is fast  # already converted: left alone


def test_optimizer_built_before_convert_trains_the_converted_model(rng):
    model = nested_model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    ft.convert(model)
    x = random_tensor(rng, (8, 3, 6, 6), np.float32)
    target = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(0))
    for net, opt in ((model, optimizer), (reference, reference_optimizer)):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), target).backward()
            opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(p, nested_model().state_dict()[name]), f"{name} never moved"
    for (name, b), (_, c) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


# torch's own import chain under torch.compile warns about its deprecated TorchScript pieces.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_matches_eager(rng):
    model = ft.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(2), torch.nn.BatchNorm1d(4)))
    eager = copy.deepcopy(model)
    warmup = random_tensor(rng, (2, 3, 6, 6), np.float32)
    compiled = compiled_copy(model, warmup)
    eager(warmup)  # the same batches as the compiled copy
    for mode, memory_format in [(True, "contiguous"), (True, "channels_last"),
                                (False, "contiguous")]:
        eager.train(mode)
        compiled.train(mode)
        assert_same_step(eager, compiled,
                         random_tensor(rng, (4, 3, 10, 10), np.float32, memory_format),
                         (1e-5, 1e-5), (1e-4, 1e-4))
    for (name, b), (_, c) in zip(eager.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **env})


def test_import_fastbn_never_imports_torch():
    proc = run_python("import sys, fastbn; fastbn.BatchNorm2d(3); "
                      "print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_import_fastbn_torch_without_torch_names_the_extra():
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ImportError('No module named ' + repr(name))\n"
               "sys.meta_path.insert(0, Block())\n"
               "import fastbn\n"
               "try:\n"
               "    import fastbn.torch\n"
               "except ImportError as error:\n"
               "    print(error)\n")
    proc = run_python(blocker)
    assert proc.returncode == 0, proc.stderr
    assert "fastbn[torch]" in proc.stdout


def test_kernels_run_with_torchs_thread_count(monkeypatch):
    import numba

    from fastbn import functional

    seen = []
    original = functional.batch_norm_forward

    def recording(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "batch_norm_forward", recording)
    previous = torch.get_num_threads()
    before = numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        ft.BatchNorm2d(3)(torch.randn(4, 3, 5, 5))
    finally:
        torch.set_num_threads(previous)
    assert seen == [1]
    assert numba.get_num_threads() == before  # restored after the call
