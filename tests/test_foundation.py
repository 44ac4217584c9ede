"""The foundation: config, data and noise, models and layer groups, training, run directories."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import config
from common.cli import UserError
from common.data import Data, apply_label_noise, load_arrays, load_data, stratified_split
from common.evaluation import accuracies
from common.models import MODELS, build_model, layer_groups, group_keys
from common.runs import Run, load_tensors
from common.training import lr_factor, train_run, trained_run
from conftest import REPO, TINY


# ----------------------------------------------------------------------------- config

DEFAULTS = dict(TINY, some_list=[0, 5], note=None)


def test_config_overrides_and_types(tmp_path):
    cfg = config.parse(DEFAULTS, ["--lr=1", "--dataset=mnist", "--some_list=[1,2]", "--augment=True"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.dataset == "mnist" and cfg.some_list == [1, 2] and cfg.augment is True
    preset = tmp_path / "preset.py"
    preset.write_text("epochs = 7\nlr = 0.2\nn_eot = 5  # a key of another script: ignored\n")
    cfg = config.parse(DEFAULTS, [str(preset), "--lr=0.3"])
    assert (cfg.epochs, cfg.lr) == (7, 0.3) and not hasattr(cfg, "n_eot")


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown key --nope; valid keys:"),
    (["--epochs=1.5"], "epochs must be int"),
    (["--augment=1"], "augment must be bool"),
    (["--lr=fast"], "not a Python literal"),
    (["--noise=1.0"], "noise=1.0 is outside [0, 1)"),
    (["--noise=-0.1"], "outside [0, 1)"),
    (["--dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["--model=vgg"], "unknown model 'vgg'"),
    (["--schedule=step"], "unknown schedule 'step'"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["missing_preset.py"], "config file missing_preset.py not found"),
])
def test_config_errors(argv, message):
    with pytest.raises(UserError, match=None) as e:
        config.parse(DEFAULTS, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_knobs_takes_only_lowercase_literals():
    ns = {"lr": 0.1, "LR": 1, "_x": 2, "np": np, "f": lambda: 0, "names": ["a"]}
    assert config.knobs(ns) == {"lr": 0.1, "names": ["a"]}


# ----------------------------------------------------------------------------- data and noise

def test_noise_exact_never_true_deterministic():
    y = torch.arange(1000) % 10
    noisy, mask = apply_label_noise(y, 0.1, 10, seed=3)
    assert int(mask.sum()) == 100
    assert bool((noisy[mask] != y[mask]).all()) and bool((noisy[~mask] == y[~mask]).all())
    again, mask2 = apply_label_noise(y, 0.1, 10, seed=3)
    assert torch.equal(noisy, again) and torch.equal(mask, mask2)
    other, mask3 = apply_label_noise(y, 0.1, 10, seed=4)
    assert not torch.equal(mask, mask3)
    # every wrong class is reachable, including y - 1 (the authors' code never picked it)
    big, m = apply_label_noise(torch.zeros(5000, dtype=torch.long), 0.5, 10, seed=0)
    assert set(big[m].tolist()) == set(range(1, 10))
    assert int(apply_label_noise(y, 0.123, 10, 0)[1].sum()) == round(0.123 * 1000)


def test_noise_independent_of_model_seed(make_cfg):
    a = load_data(make_cfg(model_seed=0))
    b = load_data(make_cfg(model_seed=5))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.y_train, b.y_train)


def test_mnist_5k_split():
    x, y, xt, yt = load_arrays("mnist_5k", seed=0)
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(yt).tolist() == [100] * 10
    x2, y2, _, _ = load_arrays("mnist_5k", seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _, _, _ = load_arrays("mnist_5k", seed=1)
    assert not torch.equal(x, x3)


def test_data_batches_are_normalized_with_indices(make_cfg):
    data = load_data(make_cfg())
    assert data.noisy.sum() == 400 and data.num_classes == 10 and data.in_channels == 1
    xb = data.batch(torch.arange(4000))
    assert abs(float(xb.mean())) < 1e-3 and abs(float(xb.std()) - 1) < 1e-2
    aug = data.batch(torch.arange(8), augment=True, gen=torch.Generator().manual_seed(0))
    assert aug.shape == (8, 1, 28, 28)


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    y = np.arange(200) % 4
    np.savez(tmp_path / "mine.npz", x_train=x, y_train=y)
    xtr, ytr, xte, yte = load_arrays(f"npz:{tmp_path / 'mine.npz'}", seed=0)
    assert xtr.shape == (160, 3, 32, 32) and xte.shape == (40, 3, 32, 32)
    assert torch.bincount(yte).tolist() == [10] * 4
    np.savez(tmp_path / "split.npz", x_train=x[:, :, :, 0], y_train=y, x_test=x[:10, :, :, 0], y_test=y[:10])
    xtr, ytr, xte, yte = load_arrays(f"npz:{tmp_path / 'split.npz'}")
    assert xtr.shape == (200, 1, 32, 32) and len(yte) == 10


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((10, 8, 8), np.float32), y_train=np.arange(10) % 2), "dtype float32"),
    (dict(x_train=np.zeros((10, 8), np.uint8), y_train=np.arange(10) % 2), "has shape (10, 8)"),
    (dict(x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(9) % 2), "has 10 examples but y_train has 9"),
    (dict(x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(10) - 1), "negative labels"),
    (dict(x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(10) % 2,
          x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.array([0, 5])), "never occurs in y_train"),
    (dict(y_train=np.arange(10)), "has no array 'x_train'"),
])
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as e:
        load_arrays(f"npz:{tmp_path / 'bad.npz'}")
    assert message in str(e.value)


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_arrays(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        load_arrays(f"npz:{tmp_path / 'junk.npz'}")


def test_missing_dataset_clear_error(monkeypatch, tmp_path):
    import common.data as d
    monkeypatch.setattr(d, "DATA_ROOT", tmp_path)
    with pytest.raises(UserError) as e:
        load_arrays("cifar10", download=False)
    assert "not found in" in str(e.value) and str(tmp_path) in str(e.value) and "cifar-10" in str(e.value)


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    x, y, xt, yt = load_arrays("fashion_mnist", download=False)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and int(y.max()) == 9


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_models_forward_and_groups(name, channels, size):
    model = build_model(name, channels, 10, size, width=0.25, seed=0)
    out = model(torch.randn(4, channels, size, size), index=torch.arange(4))
    assert out.shape == (4, 10)
    groups = layer_groups(model)
    owned = [id(p) for _, m in groups for p in m.parameters()]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))  # every parameter exactly once
    keys = [k for ks in group_keys(model).values() for k in ks]
    assert sorted(keys) == sorted(model.state_dict())  # and every buffer
    expected = {"resnet9": 9, "resnet18": 10, "resnet50": 6, "vit": 8, "cnn": 4}[name]
    assert len(groups) == expected


def test_resnet9_architecture():
    model = build_model("resnet9", 3, 10, 32, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 256, 256, 128]
    assert convs[1].kernel_size == (5, 5) and convs[1].stride == (2, 2)
    assert [n for n, _ in layer_groups(model)] == ["conv1", "conv2", "res1.0", "res1.1", "conv3",
                                                    "res2.0", "res2.1", "conv4", "head"]
    assert model.layers.head.bias is None


def test_resnet18_architecture_is_the_authors():
    """The authors' ResNet-18 (models/resnet18_custom.py): 3x3 stride-1 stem, no max-pool, 2+2+2+2 basic
    blocks of 64-128-256-512 channels (x width), 1x1 conv shortcuts where the shape changes, head with bias."""
    model = build_model("resnet18", 1, 10, 28, width=1.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    main = [c.out_channels for c in convs if c.kernel_size == (3, 3)]
    assert main == [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    assert [(c.out_channels, c.stride) for c in convs if c.kernel_size == (1, 1)] == [(128, (2, 2)), (256, (2, 2)),
                                                                                     (512, (2, 2))]
    rgb = build_model("resnet18", 3, 10, 32, width=1.0)
    assert sum(p.numel() for p in rgb.parameters()) == 11_173_962  # kuangliu's CIFAR ResNet-18, as the authors
    assert [n for n, _ in layer_groups(model)] == ["stem"] + [f"layer{k}.{i}" for k in range(1, 5) for i in (0, 1)] \
        + ["head"]
    assert model.layers.head.bias is not None
    narrow = build_model("resnet18", 1, 10, 28, width=0.125)
    assert [c.out_channels for c in narrow.modules() if isinstance(c, torch.nn.Conv2d)][0] == 8


def test_init_depends_on_seed_only():
    a, b = build_model("cnn", 1, 10, 28, seed=1), build_model("cnn", 1, 10, 28, seed=1)
    c = build_model("cnn", 1, 10, 28, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers.conv1.conv.weight, c.layers.conv1.conv.weight)


# ----------------------------------------------------------------------------- training

def test_schedules():
    assert lr_factor(0.0, "cosine", 0.1) == 0 and lr_factor(0.1, "cosine", 0.1) == 1
    assert abs(lr_factor(1.0, "cosine", 0.1)) < 1e-9 and lr_factor(0.5, "constant", 0.1) == 1
    assert lr_factor(0.25, "triangle", 0.25) == 1 and abs(lr_factor(0.625, "triangle", 0.25) - 0.5) < 1e-9


def test_training_learns_and_writes_run(make_cfg, mnist_small):
    cfg = make_cfg(noise=0.0, epochs=3, batch_size=32, lr=0.1)
    data = load_data(cfg).subset(1000, 500)
    model, data, run = train_run(cfg, data=data, quiet=True)
    acc = accuracies(model, data)
    assert acc["test"] > 0.85, acc  # a small CNN on 1000 real digits, 3 epochs (measured: 0.91)
    assert run.saved_epochs() == [0, 1, 2, 3]
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and {"clean", "noisy", "test", "loss"} <= set(rows[-1])
    assert json.loads((run.dir / "config.json").read_text())["epochs"] == 3
    labels = load_tensors(run.dir / "labels.pt")
    assert torch.equal(labels["noisy"], data.noisy.cpu())
    ckpt = torch.load(run.ckpt_path(3), weights_only=True)
    assert {"model", "optimizer", "epoch", "config", "metrics"} <= set(ckpt)


def test_resume_gives_identical_weights(make_cfg, mnist_small, tmp_path):
    full, _, _ = train_run(make_cfg(runs_dir=str(tmp_path / "a")), data=mnist_small, quiet=True)
    cfg = make_cfg(runs_dir=str(tmp_path / "b"))
    _, _, run = train_run(cfg, data=mnist_small, quiet=True)
    run.ckpt_path(2).unlink()  # as if killed during epoch 2
    resumed, _, _ = train_run(cfg, data=mnist_small, quiet=True)
    for (k, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), k
    assert [r["epoch"] for r in run.metrics()] == [0, 1, 2]


def test_changed_config_is_refused_then_overwritten(make_cfg, mnist_small):
    cfg = make_cfg(epochs=1)
    _, _, run = train_run(cfg, data=mnist_small, quiet=True)
    before = run.ckpt_path(1).read_bytes()
    assert Run(make_cfg(epochs=1, lr=0.01)).dir != run.dir  # another lr is another run directory
    other = make_cfg(epochs=1, lr=0.01)
    with pytest.raises(UserError, match="another configuration"):  # ... unless forced into this one
        train_run(other, data=mnist_small, quiet=True, run=Run(other, directory=run.dir))
    assert run.ckpt_path(1).read_bytes() == before  # nothing touched
    other = make_cfg(epochs=1, lr=0.01, overwrite=True)
    train_run(other, data=mnist_small, quiet=True, run=Run(other, directory=run.dir))
    aside = [p for p in run.dir.parent.iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "epoch_001.pt").read_bytes() == before


def test_trained_run_reuses_and_checks_checkpoints(make_cfg, mnist_small):
    cfg = make_cfg(epochs=1)
    model, _, run = train_run(cfg, data=mnist_small, quiet=True)
    again, _, _ = trained_run(cfg, data=mnist_small, quiet=True)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    path = run.ckpt_path(1)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="cannot be loaded safely"):
        trained_run(cfg, data=mnist_small, quiet=True)
    other = Run(make_cfg(epochs=1, model="resnet9"), directory=run.dir)
    with pytest.raises(UserError, match="another configuration"):
        other.check_config()



def test_tiny_run_memorizes(tiny_trained):
    """The shared tiny run really memorizes its noisy examples (other tests rely on it)."""
    cfg, model, data, run = tiny_trained
    acc = accuracies(model, data)
    assert acc["noisy"] >= 0.95 and acc["clean"] >= 0.99 and acc["test"] > 0.8, acc
    assert int(data.noisy.sum()) == round(0.1 * 512)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_preset_parses_for_every_script(preset):
    """Each preset is accepted by all five scripts and sets what it says (a typo'd key would be ignored
    by config files, so check the preset's own keys reach the configuration)."""
    import importlib
    import runpy
    path = str(REPO / "configs" / preset)
    own = config.knobs(runpy.run_path(path))
    scripts = ["gradient_accounting", "layer_rewinding", "layer_retraining", "neuron_flipping", "example_tied_dropout"]
    known = set()
    for s in scripts:
        module = importlib.import_module(s)
        cfg = vars(config.parse(module.KNOBS, [path]))
        assert cfg["config_file"] == preset[:-3]
        known |= {k for k in own if k in cfg and cfg[k] == own[k]}
    assert known == set(own), f"keys no script knows: {set(own) - known}"
    assert own["dataset"] in __import__("common.data", fromlist=["DATASETS"]).DATASETS


def test_scripts_share_the_run_keys():
    """The five scripts declare the same shared block (keys and defaults): it is the run's identity."""
    import importlib
    scripts = ["gradient_accounting", "layer_rewinding", "layer_retraining", "neuron_flipping", "example_tied_dropout"]
    blocks = {s: importlib.import_module(s).RUN_KNOBS for s in scripts}
    for s in scripts:
        assert blocks[s] == blocks[scripts[0]], s
    assert set(config.identity_keys()) == set(blocks[scripts[0]]) - set(config.NOT_IDENTITY)
    assert {"dataset", "model", "width", "seed", "epochs", "lr", "amp"} <= set(config.identity_keys())
