"""Shared fixtures: a tiny, fast configuration on the embedded dataset (real MNIST digits)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
torch.set_num_threads(2)

import layer_rewinding  # noqa: E402,F401  (declares the scripts' shared knob block)
from common import config, plots  # noqa: E402

# The shared keys every script defines, at their script defaults, shrunk for speed.
TINY = {**config.RUN_DEFAULTS, "model": "cnn", "epochs": 2, "batch_size": 64, "device": "cpu", "download": False}


@pytest.fixture(autouse=True)
def strict_figures(monkeypatch):
    """Every figure a test draws must keep its text inside the canvas (plots.save raises otherwise)."""
    monkeypatch.setattr(plots, "STRICT", True)


@pytest.fixture
def one_thread():
    """One torch thread inside the test: for tests of many tiny kernels, where a second thread's
    hand-offs cost more than the work on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def autocast_spy(monkeypatch):
    """autocast_spy(*modules) -> a list that records the `enabled` flag of every autocast those modules
    enter (each module's `autocast` replaced by a no-op that records)."""
    import contextlib
    seen = []

    def spy(device, enabled=True):
        seen.append(enabled)
        return contextlib.nullcontext()

    def install(*modules):
        for m in modules:
            monkeypatch.setattr(m, "autocast", spy)
        return seen
    return install


@pytest.fixture
def cpu_bf16(monkeypatch):
    """amp autocasts on the CPU too (torch.autocast("cpu", dtype=torch.bfloat16)) inside the test: the
    code path of a CUDA run, e.g. what an in-place weight change inside an autocast region does."""
    from common import precision
    monkeypatch.setattr(precision, "AUTOCAST_DEVICES", (*precision.AUTOCAST_DEVICES, "cpu"))


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


# ----------------------------------------------------------------------------- a tiny memorizing run
# 512 training / 256 test digits of mnist_5k as an npz dataset: with 10% noise a width-0.5 CNN
# memorizes all 51 mislabeled examples in 20 epochs (~6 s on 2 cores; measured noisy acc 1.0, test 0.89).
TINY_RUN = dict(model="cnn", width=0.5, epochs=20, batch_size=64, lr=0.05, device="cpu")


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """Path of an .npz with 512 train / 256 test real digits (taken from mnist_5k, seeded)."""
    import numpy as np
    from common.data import load_arrays
    x, y, xt, yt = load_arrays("mnist_5k", seed=0)
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randperm(len(x), generator=g)[:512], torch.randperm(len(xt), generator=g)[:256]
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x[tr, 0].numpy(), y_train=y[tr].numpy(), x_test=xt[te, 0].numpy(), y_test=yt[te].numpy())
    return path


@pytest.fixture
def tiny_argv(tiny_npz, tmp_path):
    """tiny_argv(runs_dir=None, **overrides) -> command-line arguments for a script on the tiny run."""
    def make(runs_dir=None, **overrides):
        keys = {**TINY_RUN, "dataset": f"npz:{tiny_npz}", "runs_dir": str(runs_dir or tmp_path / "runs"), **overrides}
        return [f"--{k}={v}" for k, v in keys.items()]
    return make


@pytest.fixture(scope="session")
def tiny_trained(tiny_npz, tmp_path_factory):
    """A finished tiny run (shared by the session: copy its directory before changing anything in it).

    Returns (cfg, model, data, run)."""
    from common.training import train_run
    cfg = SimpleNamespace(**{**TINY, **TINY_RUN, "dataset": f"npz:{tiny_npz}",
                             "runs_dir": str(tmp_path_factory.mktemp("tiny_runs"))})
    model, data, run = train_run(cfg, quiet=True)
    return cfg, model, data, run
