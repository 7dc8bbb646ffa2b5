"""A real client: a small CNN trained on scikit-learn's digits with torch's batch norm and
with fastbn's (after convert), from the same seeds, step by step.

float64: the losses agree to 1e-9 at every step. float32: every step's loss is within 1e-4 of
torch's float32 run or of the float64 run (torch's own float32 runs drift from float64 by
more than that over a long run, so either is a fair yardstick), and the final accuracies match.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

import fastbn.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 60
BATCH = 64


def digits():
    images, labels = datasets.load_digits(return_X_y=True)
    images = (images / 16.0 - 0.5).reshape(-1, 1, 8, 8)
    return torch.from_numpy(images), torch.from_numpy(labels)


def make_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 32), torch.nn.BatchNorm1d(32, momentum=None),
        torch.nn.ReLU(), torch.nn.Linear(32, 10))


def train(model, images, labels, dtype, memory_format):
    """Losses of STEPS SGD steps, and the final accuracy over the whole set in eval mode."""
    model = model.to(dtype=dtype, memory_format=memory_format)
    images = images.to(dtype).contiguous(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(STEPS):
        batch = order[(step * BATCH) % (len(labels) - BATCH):][:BATCH]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    return np.array(losses), accuracy


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_digits_training_tracks_torch(memory_format):
    images, labels = digits()
    model = make_cnn()
    runs = {}
    for name, dtype in (("64", torch.float64), ("32", torch.float32)):
        runs["torch" + name] = train(copy.deepcopy(model), images, labels, dtype, memory_format)
        fast = ft.convert(copy.deepcopy(model))
        assert sum(isinstance(m, (ft.BatchNorm1d, ft.BatchNorm2d)) for m in fast.modules()) == 3
        runs["fastbn" + name] = train(fast, images, labels, dtype, memory_format)
    losses64, accuracy64 = runs["fastbn64"]
    np.testing.assert_allclose(losses64, runs["torch64"][0], rtol=0, atol=1e-9)
    assert accuracy64 == runs["torch64"][1]
    losses32, accuracy32 = runs["fastbn32"]
    off_torch32 = np.abs(losses32 - runs["torch32"][0])
    off_float64 = np.abs(losses32 - runs["torch64"][0])
    worst = np.max(np.minimum(off_torch32, off_float64))
    assert worst <= 1e-4, f"float32 loss off by {worst:.3g} from both torch runs"
    assert accuracy32 == runs["torch32"][1]
    assert losses64[-1] < 0.5 * losses64[0] and accuracy64 > 0.9  # it really learned
