"""The researcher's own model: torchvision:<name> and factory specs through all five experiments, layer
groups for any model, dropout placed by hooks, and init_from (checkpoints trained elsewhere)."""
import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoints, config, dropout, models
from common.cli import UserError
from conftest import REPO

FACTORY = "examples/my_model.py:factory"
SPECS = ("torchvision:resnet18", "torchvision:mobilenet_v3_small", FACTORY)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: many tiny kernels


@pytest.fixture(scope="module")
def tiny8_npz(tmp_path_factory):
    """64 train / 32 test digits of mnist_5k at 8x8 px (4x4 average pooling): ResNet-18 in seconds."""
    from common.data import load_arrays
    x, y, xt, yt = load_arrays("mnist_5k", seed=0)
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randperm(len(x), generator=g)[:64], torch.randperm(len(xt), generator=g)[:32]
    small = lambda a: F.avg_pool2d(F.pad(a.float(), (2, 2, 2, 2)), 4).round().to(torch.uint8)[:, 0].numpy()
    path = tmp_path_factory.mktemp("data8") / "tiny8.npz"
    np.savez(path, x_train=small(x[tr]), y_train=y[tr].numpy(), x_test=small(xt[te]), y_test=yt[te].numpy())
    return path


def argv(npz, runs, model, *extra, epochs=2):
    return [f"--dataset=npz:{npz}", f"--runs_dir={runs}", f"--model={model}", f"--epochs={epochs}",
            "--batch_size=32", "--device=cpu", *extra]


# ----------------------------------------------------------------------------- all five experiments

@pytest.mark.parametrize("spec", SPECS)
def test_five_experiments(spec, tiny8_npz, tmp_path):
    import example_tied_dropout
    import gradient_accounting
    import layer_retraining
    import layer_rewinding
    import neuron_flipping
    base = argv(tiny8_npz, tmp_path, spec, "--noise=0.3")  # 2 epochs fit >= 2 noisy examples: 2 flipping targets
    groups = models.group_prefixes(models.build_model(spec, 1, 10, 8))
    acc = gradient_accounting.main(base)          # trains the run (with accounting); the others reuse it
    assert acc["groups"] == groups
    rew = layer_rewinding.main(base + ["--rewind_epochs=[0,1]"])
    assert rew["groups"] == groups and set(rew["accuracy"]) == set(groups)
    ret = layer_retraining.main(base + ["--retrain_epochs=1", f"--retrain_groups=['{groups[0]}','{groups[-1]}']"])
    assert list(ret["groups"]) == [groups[0], groups[-1]]
    flip = neuron_flipping.main(base + ["--n_examples=2", "--ref_batch=3", "--n_eot=0", "--max_units=5",
                                        "--collateral_n=16"])
    # 2 noisy, 2 clean and their 2 margin-matched clean controls (matched=True by default)
    assert len(flip["records"]) == 6 and all(u["group"] in groups for r in flip["records"] for u in r["units"])
    etd = example_tied_dropout.main(base)
    assert set(etd["etd"]["modes"]) == {"tied", "keep", "drop"}
    assert etd["etd"]["modes"]["keep"]["train"] is not None


# ----------------------------------------------------------------------------- specs and building

def test_torchvision_adapted_to_small_grayscale_images():
    r = models.build_model("torchvision:resnet18", 1, 7, 28)
    assert isinstance(r, models.External) and r(torch.zeros(3, 1, 28, 28)).shape == (3, 7)
    conv = r.net.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (3, 3), (1, 1))
    assert isinstance(r.net.maxpool, nn.Identity)
    m = models.build_model("torchvision:mobilenet_v3_small", 1, 10, 32)
    assert (m.net.features[0][0].in_channels, m.net.features[0][0].stride) == (1, (1, 1))
    big = models.build_model("torchvision:resnet18", 3, 10, 96)  # not a small image: only the channels as given
    assert big.net.conv1.stride == (2, 2) and isinstance(big.net.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", FACTORY])
def test_initialization_seeded_by_model_seed(spec):
    a, b, c = (models.build_model(spec, 1, 10, 8, seed=s) for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["net.fc.weight" if "resnet" in spec else "net.head.2.weight"],
                           sc["net.fc.weight" if "resnet" in spec else "net.head.2.weight"])


def test_model_tag():
    assert models.model_tag("resnet9") == "resnet9"
    assert models.model_tag("torchvision:resnet18") == "tv-resnet18"
    assert models.model_tag("path/to/my file.py:make") == "my_file-make"
    assert models.model_tag("mypkg.nets:build") == "nets-build"


def _write(tmp_path, body, name="user_model.py"):
    path = tmp_path / name
    path.write_text("import torch\nimport torch.nn as nn\n" + body)
    return path


@pytest.mark.parametrize("body, needle", [
    ("def make(c, k, s):\n    raise ValueError('no such width')\n", "raised ValueError: no such width"),
    ("def make(c, k, s):\n    return 42\n", "returned a int, not a torch.nn.Module"),
    ("def make(c, k, s):\n    return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, k + 1))\n", "returns (2, 11)"),
    ("def make(c, k, s):\n    return nn.Sequential(nn.Flatten(), nn.Linear(5, k))\n", "fails on a batch of 2"),
    ("def other(c, k, s):\n    pass\n", "has no function 'make'"),
    ("syntax error here\n", "failed to run: SyntaxError"),
])
def test_bad_factory_one_line(tmp_path, body, needle):
    spec = f"{_write(tmp_path, body)}:make"
    with pytest.raises(UserError) as e:
        models.build_model(spec, 1, 10, 8)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec, needle", [
    ("torchvision:resnet19", "unknown torchvision model 'resnet19'; did you mean torchvision:resnet18"),
    ("torchvision:fasterrcnn_resnet50_fpn", "list_models(module=torchvision.models)"),
    ("nowhere/missing.py:make", "model factory file nowhere/missing.py not found"),
    ("no_such_package_xyz.nets:make", "cannot import module 'no_such_package_xyz.nets'"),
    ("resnet", "unknown model 'resnet'"),
])
def test_bad_spec_checked_with_the_config(spec, needle):
    import layer_rewinding
    with pytest.raises(UserError) as e:
        config.parse(layer_rewinding.KNOBS, [f"--model={spec}"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_factory_exits_2_with_one_line(tmp_path, tiny8_npz):
    path = _write(tmp_path, "def make(c, k, s):\n    return nn.Linear(3, k)\n")
    proc = subprocess.run([sys.executable, "layer_rewinding.py", *argv(tiny8_npz, tmp_path / "runs", f"{path}:make")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model ") and "fails on a batch of 2" in lines[0]
    written = [p.name for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.name != ".lock"]
    assert written == []  # nothing trained, no config.json or labels.pt left behind


# ----------------------------------------------------------------------------- layer groups

class Nested(nn.Module):
    """A wrapper around a body with a module dict of stages, a bare parameter and a buffer-only module."""

    def __init__(self):
        super().__init__()
        body = nn.Module()
        body.token = nn.Parameter(torch.zeros(4))
        body.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        body.stages = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                                     "b": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())})
        body.head = nn.Linear(4, 10)
        self.body = body

    def forward(self, x):
        b = self.body
        h = b.stages["b"](b.stages["a"](b.stem(x)))
        return b.head(h.mean((2, 3)) + b.token)


def _covered_once(model):
    of = models.group_of(model)
    keys = list(model.state_dict())
    assert sorted(of) == sorted(keys)  # every parameter and buffer, each in one group
    flat = [k for ks in models.group_keys(model).values() for k in ks]
    assert sorted(flat) == sorted(keys)
    params = [id(p) for ps in models.group_params(model).values() for p in ps]
    assert sorted(params) == sorted(id(p) for p in model.parameters())
    names = [n for n, _ in models.layer_groups(model)]
    assert names == list(models.group_keys(model))
    for name, module in models.layer_groups(model):  # a group's module holds exactly its parameters
        assert {id(p) for p in module.parameters()} == {id(p) for p in models.group_params(model)[name]}
    return names


@pytest.mark.parametrize("spec, expected", [
    ("resnet9", ["conv1", "conv2", "res1.0", "res1.1", "conv3", "res2.0", "res2.1", "conv4", "head"]),
    ("resnet50", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    ("vit", ["embed"] + [f"block{i}" for i in range(1, 7)] + ["head"]),
    ("cnn", ["conv1", "conv2", "conv3", "head"]),
    ("torchvision:resnet18", ["conv1", "bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["fc"]),
    ("torchvision:mobilenet_v3_small", [f"features.{i}" for i in range(13)] + ["classifier.0", "classifier.3"]),
    (FACTORY, ["stem", "stages.stage1", "stages.stage2", "head"]),
])
def test_groups_cover_every_tensor_once(spec, expected):
    assert _covered_once(models.build_model(spec, 1, 10, 32, width=0.25)) == expected


def test_groups_of_a_nested_user_model_and_overrides():
    net = models.External(Nested(), "nested")
    # the wrapper `body` looked through, the bare parameter a group of its own, the module dict expanded
    assert _covered_once(net) == ["body.token", "body.stem", "body.stages.a", "body.stages.b", "body.head"]
    net.group_prefixes = ["body.token", "body.stem.0", "body.stem.1", "body.stages", "body.head"]
    assert _covered_once(net) == net.group_prefixes
    Nested.layer_groups = lambda self: ["body.token", "body.stem", "body.stages", "body.head"]
    try:
        assert _covered_once(models.External(Nested(), "nested"))[2] == "body.stages"
    finally:
        del Nested.layer_groups
    for groups, needle in ((["conv1", "layer9"], "no parameter or buffer under 'layer9'"),
                           (["conv1", "bn1", "layer1", "layer1.0", "layer2", "layer3", "layer4", "fc"], "overlap"),
                           (["conv1", "bn1", "layer1", "layer2", "layer3", "fc"], "layer4.0.conv1.weight is in no group")):
        with pytest.raises(UserError, match=needle):
            models.build_model("torchvision:resnet18", 1, 10, 8, groups=groups)
    zoo = models.build_model("resnet9", 1, 10, 32, width=0.25, groups=["conv1", "conv2", "res1", "conv3", "res2",
                                                                        "conv4", "head"])
    assert _covered_once(zoo)[2] == "res1"
    with pytest.raises(UserError, match="groups="):
        config.parse(__import__("layer_rewinding").KNOBS, ["--groups=[1,2]"])


def test_wrapped_model_hands_indices_to_modules_that_want_them():
    class Spy(nn.Module):
        wants_index = True

        def forward(self, x):
            self.seen = self.index
            return x

    net = models.External(nn.Sequential(Spy(), nn.Flatten(), nn.Linear(64, 10)), "spy")
    idx = torch.tensor([4, 7])
    assert net(torch.zeros(2, 1, 8, 8), index=idx).shape == (2, 10) and net.net[0].seen is idx
    net(torch.zeros(2, 1, 8, 8))
    assert net.net[0].seen is None


def test_stages_only_for_the_zoo():
    assert models.stages(models.build_model("cnn", 1, 10, 28)) is not None
    assert models.stages(models.build_model("torchvision:resnet18", 1, 10, 8)) is None


# ----------------------------------------------------------------------------- dropout in any model

def test_dropout_placed_by_hooks_keeps_keys_weights_and_groups():
    plain = models.build_model("torchvision:resnet18", 1, 10, 8, seed=3)
    etd = models.build_model("torchvision:resnet18", 1, 10, 8, seed=3, dropout=dropout.etd_factory(0.5, 0.2, 0))
    sp, se = plain.state_dict(), etd.state_dict()
    assert list(sp) == list(se) and all(torch.equal(sp[k], se[k]) for k in sp)
    assert models.group_keys(plain) == models.group_keys(etd)
    layers = [m.layer for m in dropout.etd_modules(etd)]
    # the stem and both activations of each of the 8 blocks (the block's ReLU module runs twice)
    assert layers[:3] == ["relu", "layer1.0.relu#0", "layer1.0.relu#1"] and len(layers) == 17
    assert [m.channels for m in dropout.etd_modules(etd)][-1] == 512
    x, idx = torch.randn(4, 1, 8, 8), torch.arange(4)
    plain.eval(), etd.eval()
    with torch.no_grad(), dropout.mode(etd, "drop"):
        assert not torch.allclose(plain(x), etd(x))
    etd.train()
    out = etd(x, index=idx)  # tied masks in training
    assert out.shape == (4, 10)
    # a deep copy drops with its own modules: zeroing its rates leaves the original's intact
    std = models.build_model("torchvision:resnet18", 1, 10, 8, dropout=dropout.standard_dropout_factory(0.5))
    twin = copy.deepcopy(std)
    for m in twin.modules():
        if isinstance(m, dropout.StandardDropout):
            m.p = 0.0
    ref = models.build_model("torchvision:resnet18", 1, 10, 8)
    twin.train(), ref.train(), std.train()
    assert torch.allclose(twin(x), ref(x)) and not torch.allclose(std(x), ref(x))


def test_dropout_after_named_modules_and_refusals():
    f = dropout.etd_factory(0.5, 0.2, 0)
    m = models.build_model(FACTORY, 1, 10, 8, dropout=f, dropout_after=["stages.*.0.act2", "Flatten"])
    assert [d.layer for d in dropout.etd_modules(m)] == ["stages.stage1.0.act2", "stages.stage2.0.act2", "head.1"]
    zoo = models.build_model("cnn", 1, 10, 28, width=0.25, dropout=f, dropout_after=["conv2.relu"])
    assert [d.layer for d in dropout.etd_modules(zoo)] == ["conv2.relu"]
    with pytest.raises(UserError, match="'nope' matches no module"):
        models.build_model(FACTORY, 1, 10, 8, dropout=f, dropout_after=["nope"])
    linear = models.External(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "linear")
    with pytest.raises(UserError, match="found no place"):
        dropout.place(linear, f, "auto", (1, 8, 8))
    import example_tied_dropout
    with pytest.raises(UserError, match="dropout_after="):
        config.parse(example_tied_dropout.KNOBS, ["--dropout_after=relu"])


# ----------------------------------------------------------------------------- init_from

def _plain_loop(tmp_path, data, epochs=2):
    """A researcher's own training loop (no code of this project but the data's tensors): plain SGD
    on the raw module, torch.save(model.state_dict()) after every epoch."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import my_model
    finally:
        sys.path.remove(str(REPO / "examples"))
    torch.manual_seed(123)
    net = my_model.factory(1, data.num_classes, data.image_size)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    out = tmp_path / "my_ckpts"
    out.mkdir()
    torch.save(net.state_dict(), out / "epoch_0.pt")
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(data.n_train).split(16):
            opt.zero_grad()
            F.cross_entropy(net(data.batch(idx).contiguous()), data.labels(idx)).backward()
            opt.step()
        torch.save(net.state_dict(), out / f"epoch_{epoch}.pt")
    (out / "notes.txt").write_text("not a checkpoint")
    return out


def test_init_from_gives_the_rewinding_numbers_of_the_same_weights_trained_here(tiny8_npz, tmp_path):
    import layer_rewinding
    from common.data import load_data
    from common.runs import Run
    from common.training import make_optimizer
    base = argv(tiny8_npz, tmp_path / "runs", FACTORY, "--rewind_epochs=[0,5]", epochs=10)
    cfg = config.parse(layer_rewinding.KNOBS, base)
    data = load_data(cfg)
    ckpts = _plain_loop(tmp_path, data, epochs=10)
    mine = layer_rewinding.main(base + [f"--init_from={ckpts}"])
    # The same weights as a run of this project: checkpoints in its own format, in its own directory.
    run = Run(cfg).open()
    run.save_labels(data)
    model = models.model_for(cfg, data)
    for epoch in range(11):
        model.net.load_state_dict(torch.load(ckpts / f"epoch_{epoch}.pt", weights_only=True))
        run.save_checkpoint(epoch, model, make_optimizer(model.parameters(), cfg), {"epoch": epoch})
    here = layer_rewinding.main(base)
    assert mine["run"] != here["run"] and "from-my_ckpts" in mine["run"]
    accuracy = lambda r: {mode: v["accuracy"] for mode, v in r["bn_modes"].items()}
    assert accuracy(mine) == accuracy(here) and mine["final"] == here["final"]
    assert mine["final"]["train"] > 0.5  # the plain loop learned: the numbers are not those of a constant model
    # retraining and flipping analyze the same imported run; nothing is trained into it
    import layer_retraining
    import neuron_flipping
    own = base[:-1] + [f"--init_from={ckpts}"]
    ret = layer_retraining.main(own + ["--retrain_epochs=1", "--retrain_groups=['head']"])
    assert ret["final_model"] == mine["final"]
    flip = neuron_flipping.main(own + ["--n_examples=2", "--ref_batch=3", "--n_eot=0", "--max_units=5",
                                       "--collateral_n=16"])
    assert flip["baseline"] and len(flip["records"]) == 6  # 2 noisy, 2 clean, 2 margin-matched clean
    imported = tmp_path / "runs" / mine["run"]
    assert not (imported / "checkpoints").exists() and (imported / "sources.json").is_file()
    # other versions of the files: refused (resumed results would mix two models), or moved aside
    torch.save(torch.load(ckpts / "epoch_10.pt", weights_only=True), ckpts / "epoch_10.pt")
    os.utime(ckpts / "epoch_10.pt", (1, 1))
    with pytest.raises(UserError, match="changed since .* analyzed them \\(epoch 10: epoch_10.pt changed\\)"):
        layer_rewinding.main(base + [f"--init_from={ckpts}"])
    assert accuracy(layer_rewinding.main(base + [f"--init_from={ckpts}", "--overwrite=True"])) == accuracy(mine)
    assert len(list((tmp_path / "runs").glob(mine["run"] + ".replaced-*"))) == 1


def test_checkpoint_formats_and_names(tmp_path):
    model = models.build_model("torchvision:resnet18", 1, 10, 8)
    raw = model.net.state_dict()
    for state in (raw, model.state_dict(), {"module." + k: v for k, v in raw.items()},
                  {"model._orig_mod." + k: v for k, v in raw.items()}):
        fitted = checkpoints.fit(state, model, "x.pt")
        assert list(fitted) == list(model.state_dict()) and torch.equal(fitted["net.fc.weight"], raw["fc.weight"])
    for wrapped in ({"state_dict": raw, "epoch": 3}, {"model": raw}, {"model_state_dict": raw, "optimizer": {}}):
        assert checkpoints.state_dict_of(wrapped, "x.pt") is raw
    names = {"epoch_3.pt": 3, "ckpt-epoch=03.ckpt": 3, "model_e3.pth": 3, "resnet_ep12.pt": 12, "007.pt": 7,
             "net3.pt": None, "last.ckpt": None}
    assert {n: checkpoints.epoch_of(n) for n in names} == names
    d = tmp_path / "c"
    d.mkdir()
    for n in ("epoch_0.pt", "ckpt-epoch=01.pt", "last.ckpt", "README.md"):
        (d / n).write_bytes(b"")
    assert {e: p.name for e, p in checkpoints.find(str(d)).items()} == {0: "epoch_0.pt", 1: "ckpt-epoch=01.pt"}


def test_bad_checkpoints_one_line(tmp_path, tiny8_npz):
    import layer_retraining
    import layer_rewinding
    model = models.build_model(FACTORY, 1, 10, 8)
    raw = model.net.state_dict()
    bad = dict(raw)
    bad["head.2.weight"] = torch.zeros(3, 32)
    wrong = {k.replace("stem.", "steam."): v for k, v in raw.items()}
    cases = [({"epoch_0.pt": raw, "epoch_1.pt": bad}, "net.head.2.weight has shape (3, 32)", layer_rewinding),
             ({"epoch_0.pt": raw, "epoch_1.pt": wrong}, "net.stem.0.weight is missing (the file has net.steam.0.weight", layer_rewinding),
             ({"epoch_0.pt": raw, "epoch_1.pt": [1, 2]}, "holds no state dict", layer_rewinding),
             ({"epoch_1.pt": raw}, "no checkpoint for epoch 0", layer_retraining),
             ({"epoch_0.pt": raw, "epoch_2.pt": raw, "epoch_3.pt": raw}, "pass --epochs=3", layer_rewinding),
             ({"epoch_0.pt": raw, "epoch_01.pt": raw, "epoch_1.pt": raw}, "two files for epoch 1", layer_rewinding),
             ({"final.pt": raw}, "no checkpoint file with an epoch", layer_rewinding)]
    for i, (files, needle, script) in enumerate(cases):
        d = tmp_path / f"case{i}"
        d.mkdir()
        for name, obj in files.items():
            torch.save(obj, d / name)
        extra = ["--rewind_epochs=[0]"] if script is layer_rewinding else []
        with pytest.raises(UserError) as e:
            script.main(argv(tiny8_npz, tmp_path / "runs", FACTORY, f"--init_from={d}", *extra, epochs=1))
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    (tmp_path / "case0" / "epoch_1.pt").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, "layer_rewinding.py", *argv(tiny8_npz, tmp_path / "runs", FACTORY, epochs=1),
                           f"--init_from={tmp_path / 'case0'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot be loaded safely" in proc.stderr
    import gradient_accounting
    with pytest.raises(UserError, match="trains its models here"):
        gradient_accounting.main(argv(tiny8_npz, tmp_path / "runs", FACTORY, f"--init_from={tmp_path / 'case0'}"))
