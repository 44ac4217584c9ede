"""layer_retraining.py: real freezing, clean examples only, frozen BatchNorm fixed, outputs written."""
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import layer_retraining as script
from common.cli import UserError
from common.evaluation import accuracies
from common.models import group_keys, layer_groups
from common.retraining import freeze_except, reset_group
from common.training import make_optimizer, train_epoch
from conftest import REPO


def retrain_cfg(cfg, **overrides):
    """The tiny run's configuration plus the script's experiment knobs."""
    return SimpleNamespace(**{**script.KNOBS, **vars(cfg), "retrain_epochs": 1, **overrides})


def bn_buffers(model, skip=None):
    """{key: tensor} of every BatchNorm buffer outside group `skip`."""
    keys = set(group_keys(model)[skip]) if skip else set()
    return {k: v.clone() for k, v in model.state_dict().items()
            if k not in keys and k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("frozen_bn", ["train", "eval"])
def test_retrain_group_freezes_for_real_and_shows_clean_only(tiny_trained, frozen_bn):
    cfg, trained, data, run = tiny_trained
    model = copy.deepcopy(trained)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    init = run.load_checkpoint(0)["model"]
    rcfg = retrain_cfg(cfg, frozen_bn=frozen_bn)
    params = {n for n, _ in model.named_parameters()}
    for name, _ in layer_groups(model):
        model.load_state_dict(final)
        bn_before = bn_buffers(model, skip=name)
        assert bn_before  # the cnn has BatchNorm in conv1..conv3: every group leaves some outside
        seen = []
        rows = script.retrain_group(model, data, name, init, rcfg, seen)
        state = model.state_dict()
        inside = set(group_keys(model)[name])
        for k, v in state.items():  # every parameter outside the group bit-identical (and every buffer in eval mode)
            if k not in inside and (k in params or frozen_bn == "eval"):
                assert torch.equal(v, final[k]), f"retraining {name} changed {k}"
        moved = [k for k, v in bn_before.items() if not torch.equal(state[k], v)]
        if frozen_bn == "eval":
            assert not moved, f"retraining {name} moved {moved[:3]}"
        else:  # the authors' loop: the frozen layers' BatchNorm statistics follow the retraining data
            assert moved
        # the group itself was reset and then trained: it differs from both the final and the initial weights
        weights = [k for k in inside if k.endswith("weight")]
        assert any(not torch.equal(state[k], final[k]) for k in weights)
        assert any(not torch.equal(state[k], init[k].to(state[k].device)) for k in weights)
        shown = torch.cat(seen)
        assert len(shown) > 0 and not bool(data.noisy.cpu()[shown].any()), f"{name}: a noisy example was shown"
        per_epoch = len(shown) // (len(rows) - 1)
        assert set(shown.tolist()) == set(data.clean_idx.tolist()) and per_epoch >= len(data.clean_idx) - 1
        assert [r["epoch"] for r in rows][0] == 0 and {"clean", "noisy", "noisy_true", "test"} <= set(rows[-1])
        assert rows[0]["fit"] is None and 0 <= rows[1]["fit"] <= 1
        assert all(p.requires_grad for p in model.parameters())  # unfrozen for the next user


def test_running_accuracy_counts_the_training_forwards(tiny_trained):
    """fit (the authors' stop criterion) = accuracy of the epoch's training forwards w.r.t. the labels trained on."""
    from common.retraining import RunningAccuracy
    cfg, trained, data, run = tiny_trained
    model = copy.deepcopy(trained)
    idx = data.noisy_idx[:20]
    with RunningAccuracy(model, data) as fit:
        model.train()
        with torch.no_grad():
            logits = model(data.batch(idx), index=idx)
        model.eval()
        model(data.batch(idx), index=idx)  # eval forwards are not counted
    assert fit.value() == float((logits.argmax(1) == data.labels(idx)).float().mean())
    assert int(fit.seen) == 20


def test_without_holding_eval_batchnorm_statistics_would_move(tiny_trained):
    """Negative control: frozen parameters alone do not keep BatchNorm statistics fixed, so the check above can fail."""
    cfg, trained, data, run = tiny_trained
    model = copy.deepcopy(trained)
    reset_group(model, "head", run.load_checkpoint(0)["model"])
    before = bn_buffers(model, skip="head")
    params, frozen_norms = freeze_except(model, "head")
    assert frozen_norms and all(not p.requires_grad for n, p in model.named_parameters() if "head" not in n)
    rcfg = script.retrain_config(retrain_cfg(cfg), "head")
    train_epoch(model, data, data.clean_idx, make_optimizer(params, rcfg), rcfg, 1)  # no hold_eval
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


class FakeFit:
    """Stands in for RunningAccuracy: the next training accuracy of a scripted sequence per epoch."""
    values = iter(())

    def __init__(self, model, data):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def value(self):
        return next(FakeFit.values)


def test_early_stop_counts_perfect_epochs_as_the_authors(tiny_trained, monkeypatch):
    """The authors' patience: epochs at 100% training accuracy counted, not necessarily in a row."""
    cfg, trained, data, run = tiny_trained
    monkeypatch.setattr(script, "RunningAccuracy", FakeFit)
    monkeypatch.setattr(script, "accuracies", lambda *a, **k: {"clean": 0.5, "noisy": 0.0})
    FakeFit.values = iter([0.5, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0])  # epochs 1, 2, ...
    rows = script.retrain_group(copy.deepcopy(trained), data, "head", run.load_checkpoint(0)["model"],
                                retrain_cfg(cfg, retrain_epochs=8, stop_after=3))
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4, 5]  # the third perfect epoch is epoch 5 (epoch 3's 0.9 between)
    FakeFit.values = iter([1.0] * 6)
    rows = script.retrain_group(copy.deepcopy(trained), data, "head", run.load_checkpoint(0)["model"],
                                retrain_cfg(cfg, retrain_epochs=3, stop_after=0))
    assert len(rows) == 4  # stop_after=0: never stop early


def test_curve_every_only_skips_measurements(tiny_trained):
    """curve_every is a cost knob: the same training, fits and final accuracies, fewer curve points."""
    cfg, trained, data, run = tiny_trained
    init = run.load_checkpoint(0)["model"]
    every = script.retrain_group(copy.deepcopy(trained), data, "conv2", init,
                                 retrain_cfg(cfg, retrain_epochs=3, stop_after=0, curve_every=1))
    ends = script.retrain_group(copy.deepcopy(trained), data, "conv2", init,
                                retrain_cfg(cfg, retrain_epochs=3, stop_after=0, curve_every=0))
    assert [r["epoch"] for r in every] == [0, 1, 2, 3] == [r["epoch"] for r in ends]
    assert [r for r in ends if "clean" in r] == [every[0], every[3]]
    assert [r["fit"] for r in ends] == [r["fit"] for r in every]
    assert "clean" not in ends[1] and "clean" in every[1]


def test_defaults_are_the_authors_budget():
    k = script.KNOBS
    assert (k["retrain_epochs"], k["retrain_lr"], k["retrain_schedule"], k["retrain_warmup"], k["stop_after"],
            k["frozen_bn"], k["control"]) == (20, 0.01, "triangle", 0.5, 3, "train", True)


def checkpoint_digests(run_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run_dir / "checkpoints").iterdir())}


@pytest.fixture
def run_copy(tiny_trained, tmp_path):
    """A copy of the shared tiny run (the script writes its outputs into the run directory)."""
    _, _, _, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)
    return runs, runs / run.dir.name


def test_main_writes_json_and_plots(tiny_argv, run_copy):
    runs, run_dir = run_copy
    digests = checkpoint_digests(run_dir)
    results = script.main(tiny_argv(runs_dir=runs, retrain_epochs=4, stop_after=1))
    assert checkpoint_digests(run_dir) == digests  # the trained run is read, never rewritten
    saved = json.loads((run_dir / "layer_retraining.json").read_text())
    assert list(saved["groups"]) == ["conv1", "conv2", "conv3", "head"] == list(results["groups"])
    assert saved["n_noisy"] == 51 and saved["final_model"]["noisy"] >= 0.95
    assert saved["frozen_bn"] == "train" and saved["ablation"] is None
    for name, g in saved["groups"].items():
        assert g["noisy_examples_shown"] == 0 and g["frozen_state_unchanged"] is True
        assert g["examples_shown"] >= g["epochs_trained"] * (saved["n_clean"] - 1)
        for run in (g, g["control"]):
            curve = run["curve"]
            assert [r["epoch"] for r in curve] == list(range(run["epochs_trained"] + 1))
            assert run["reset"] == {k: curve[0][k] for k in run["reset"]}  # right after the reset, before retraining
            assert run["final"] == {k: curve[-1][k] for k in run["final"]}
            assert set(run["reset"]) >= {"clean", "noisy", "noisy_true", "test"}
            # early stop (stop_after=1): at the first epoch with 100% training accuracy, never before
            assert all(r["fit"] < 1.0 for r in curve[1:-1])
            assert run["stopped_early"] == (curve[-1]["fit"] == 1.0 and run["epochs_trained"] < 4)
        assert g["control"]["reset"] == g["reset"]  # the same reset model
        assert g["control"]["noisy_examples_shown"] >= 51  # the control trains on every example, noisy ones too
    for png in ("layer_retraining_curves.png", "layer_retraining_noisy.png"):
        assert (run_dir / png).stat().st_size > 10_000


def test_positive_control_re_memorizes_with_the_authors_budget(tiny_trained, tiny_argv, run_copy):
    """The control (the reset head retrained on all examples, the default budget) brings the noisy labels back;
    the reset accuracies are those of the final model with the group reset, before any retraining."""
    cfg, trained, data, run = tiny_trained
    runs, _ = run_copy
    g = script.main(tiny_argv(runs_dir=runs) + ["--retrain_groups=['head']"])["groups"]["head"]
    assert g["control"]["final"]["noisy"] >= 0.9, g["control"]["final"]
    assert g["control"]["noisy_examples_shown"] > 0 and g["noisy_examples_shown"] == 0
    reset = copy.deepcopy(trained)
    reset_group(reset, "head", run.load_checkpoint(0)["model"])
    assert g["reset"] == g["control"]["reset"] == accuracies(reset, data, amp=cfg.amp)
    assert g["reset"]["noisy"] < 1.0  # the reset did something


def test_bn_ablation_runs_the_other_mode_side_by_side(tiny_argv, run_copy):
    runs, run_dir = run_copy
    res = script.main(tiny_argv(runs_dir=runs, retrain_epochs=1, bn_ablation=True) + ["--retrain_groups=['conv2']"])
    assert res["frozen_bn"] == "train" and res["ablation"]["frozen_bn"] == "eval"
    main, ablation = res["groups"]["conv2"], res["ablation"]["groups"]["conv2"]
    assert set(ablation) == set(main) and set(ablation["control"]) == set(main["control"])
    assert main["frozen_bn_stats_moved"] and not ablation["frozen_bn_stats_moved"]
    assert ablation["reset"] == main["reset"] and ablation["curve"][1] != main["curve"][1]


def test_deterministic_per_group(tiny_argv, run_copy):
    runs, _ = run_copy
    argv = tiny_argv(runs_dir=runs, retrain_epochs=1)
    one = script.main(argv + ["--retrain_groups=['conv2','head']"])
    two = script.main(argv + ["--retrain_groups=['head']"])  # a group's result does not depend on the others run
    assert one["groups"]["head"]["curve"] == two["groups"]["head"]["curve"]


def test_unknown_group_is_refused_before_anything_is_written(tiny_argv, run_copy):
    runs, run_dir = run_copy
    with pytest.raises(UserError) as e:
        script.main(tiny_argv(runs_dir=runs) + ["--retrain_groups=['conv9']"])
    assert "unknown layer group 'conv9'" in str(e.value) and "conv1, conv2, conv3, head" in str(e.value)
    assert not (run_dir / "layer_retraining.json").exists()


def test_bad_knob_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "layer_retraining.py"), "--retrain_lr=0",
                           f"--runs_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "retrain_lr=0.0 is outside (0, inf)" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_amp_setting_reaches_every_forward(tiny_trained, autocast_spy):
    """amp=False: no autocast in retraining's training steps or evaluations."""
    import common.evaluation as evaluation
    import common.training as training
    cfg, trained, data, run = tiny_trained
    seen = autocast_spy(training, evaluation)
    script.retrain_group(copy.deepcopy(trained), data, "head", run.load_checkpoint(0)["model"],
                         retrain_cfg(cfg, amp=False, retrain_epochs=1))
    assert len(seen) > 2 and set(seen) == {False}
