"""Shared fixtures: a tiny, fast configuration on the embedded dataset (real MNIST digits)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
torch.set_num_threads(2)

# The shared keys every script defines, at their script defaults, shrunk for speed.
TINY = dict(dataset="mnist_5k", model="cnn", width=0.25, noise=0.1, seed=0, model_seed=0, epochs=2,
            batch_size=64, lr=0.05, schedule="triangle", warmup=0.25, momentum=0.9, weight_decay=5e-4,
            augment=False, device="cpu", runs_dir="runs", amp=True, overwrite=False, download=False)


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(**overrides) -> a config namespace whose runs_dir is a fresh temporary directory."""
    def make(**overrides):
        return SimpleNamespace(**{**TINY, "runs_dir": str(tmp_path / "runs"), **overrides})
    return make


@pytest.fixture(scope="session")
def mnist_small():
    """512 training / 256 test examples of mnist_5k with 10% label noise (seed 0), on the CPU."""
    from common.data import load_data
    return load_data(SimpleNamespace(**TINY)).subset(512, 256)
