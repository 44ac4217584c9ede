"""layer_rewinding.py: one group swapped in place and restored, exact baseline, both BatchNorm modes, outputs,
bad inputs, models without stages."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import layer_rewinding
from common.cli import UserError
from common.evaluation import accuracies, predict
from common.models import group_keys, layer_groups, model_for
from common.rewinding import (Rewinder, auto_rewind_epochs, load_rewind_states, resolve_rewind_epochs, rewind_keys,
                              rewind_sweep)
from conftest import REPO


@pytest.fixture
def tiny_copy(tiny_trained, tmp_path):
    """A private copy of the finished tiny run's runs_dir (tests may delete checkpoints in it)."""
    cfg, model, data, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir.parent, runs)
    return runs, run.dir.name


def test_auto_rewind_epochs_adapt_to_length():
    assert auto_rewind_epochs(20) == [0, 2, 5, 10, 15, 19]
    assert auto_rewind_epochs(50) == [0, 5, 13, 25, 38, 49]
    assert auto_rewind_epochs(100) == [0, 10, 25, 50, 75, 99]
    assert auto_rewind_epochs(1) == [0] and auto_rewind_epochs(2) == [0, 1]
    assert resolve_rewind_epochs([5, 0, 5], 20) == [0, 5]


def test_only_the_group_changes_and_is_restored(tiny_trained):
    cfg, model, data, run = tiny_trained
    keys = rewind_keys(model, bn_stats="checkpoint")
    assert keys == group_keys(model)  # BatchNorm buffers (incl. num_batches_tracked) rewound with the weights
    states = load_rewind_states(run, [0, 5], keys, model, data.device)
    rewinder = Rewinder(model, states, keys)
    final = {k: t.clone() for k, t in model.state_dict().items()}
    for group in keys:
        with rewinder.rewound(group, 0):
            now = model.state_dict()
            for k, t in now.items():
                if k in keys[group]:
                    assert torch.equal(t, states[0][k]), k
                else:
                    assert torch.equal(t, final[k]), f"{k} changed while rewinding {group}"
            assert any(not torch.equal(now[k], final[k]) for k in keys[group])  # the rewind did something
    assert rewinder.changed_keys() == []
    assert all(torch.equal(t, final[k]) for k, t in model.state_dict().items())


def test_parameters_only_keeps_final_bn_statistics(tiny_trained):
    cfg, model, data, run = tiny_trained
    keys = rewind_keys(model, bn_stats="final")
    params = {n for n, _ in model.named_parameters()}
    assert all(k in params for ks in keys.values() for k in ks)
    buffers = [k for k in group_keys(model)["conv1"] if k not in params]
    assert {k.rsplit(".", 1)[1] for k in buffers} == {"running_mean", "running_var", "num_batches_tracked"}
    rewinder = Rewinder(model, load_rewind_states(run, [0], keys, model, data.device), keys)
    final = {k: t.clone() for k, t in model.state_dict().items()}
    with rewinder.rewound("conv1", 0):
        assert all(torch.equal(model.state_dict()[k], final[k]) for k in buffers)
        assert not torch.equal(model.state_dict()["layers.conv1.conv.weight"], final["layers.conv1.conv.weight"])


def test_rewinding_to_the_final_epoch_reproduces_the_final_model_exactly(tiny_trained):
    cfg, model, data, run = tiny_trained
    keys = rewind_keys(model, "checkpoint")
    rewinder = Rewinder(model, load_rewind_states(run, [cfg.epochs], keys, model, data.device), keys)
    final, final_pred = accuracies(model, data), predict(model, data, "train")
    acc = rewind_sweep(model, data, rewinder, [cfg.epochs], amp=cfg.amp)
    assert set(acc) == set(keys)
    for group in keys:
        assert acc[group][cfg.epochs] == final, group
        with rewinder.rewound(group, cfg.epochs):
            assert torch.equal(predict(model, data, "train"), final_pred)


def test_sweep_matches_a_full_forward_per_rewind(tiny_trained):
    """Reusing the layers before the group gives the same predictions as model(x) with the group rewound."""
    cfg, model, data, run = tiny_trained
    keys = rewind_keys(model, "checkpoint")
    epochs = [0, 3]
    rewinder = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    acc = rewind_sweep(model, data, rewinder, epochs, amp=cfg.amp)
    for group in keys:
        for e in epochs:
            with rewinder.rewound(group, e):
                assert acc[group][e] == accuracies(model, data), (group, e)
    assert acc["conv1"][0]["train"] < 0.5  # the first layer at initialization breaks the network: not a no-op


def test_main_writes_json_plots_and_table(tiny_copy, tiny_argv, capsys):
    runs, name = tiny_copy
    out = layer_rewinding.main(tiny_argv(runs_dir=runs))
    run_dir = runs / name
    saved = json.loads((run_dir / "layer_rewinding.json").read_text())
    assert saved["rewind_epochs"] == [0, 2, 5, 10, 15, 19] == out["rewind_epochs"]
    assert saved["groups"] == ["conv1", "conv2", "conv3", "head"]
    assert saved["final"]["noisy"] == 1.0 and saved["rewind_bn_stats"] == "final"  # the authors' way by default
    assert list(saved["bn_modes"]) == ["final", "recompute"]  # both modes in one run, the primary first
    assert saved["accuracy"] == saved["bn_modes"]["final"]["accuracy"]
    assert saved["evaluations"] == 4 * 6 * 2 and "critical" not in saved  # the verdict lives in common/claims.py
    for mode in ("final", "recompute"):
        for g in saved["groups"]:
            for e in saved["rewind_epochs"]:
                assert set(saved["bn_modes"][mode]["accuracy"][g][str(e)]) >= {"clean", "noisy", "noisy_true", "test"}
    # the two modes differ where a group has BatchNorm, and agree where it has none (the linear head)
    assert saved["bn_modes"]["final"]["accuracy"]["head"] == saved["bn_modes"]["recompute"]["accuracy"]["head"]
    assert saved["bn_modes"]["final"]["accuracy"]["conv1"] != saved["bn_modes"]["recompute"]["accuracy"]["conv1"]
    for png in ("layer_rewinding_depth.png", "layer_rewinding_heatmap.png"):
        assert (run_dir / png).stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "noisy / clean accuracy (%) rewound to epoch 0, per BatchNorm mode" in table
    assert all(f"\n{g:<10}" in table for g in saved["groups"])


def test_final_mode_equals_a_direct_computation(tiny_copy, tiny_argv):
    """bn_modes.final: a fresh model holding the final checkpoint with only the group's parameters taken from
    the rewind checkpoint (BatchNorm buffers stay the final model's), evaluated with whole forwards."""
    from common.runs import Run
    from common import config
    runs, name = tiny_copy
    argv = tiny_argv(runs_dir=runs, rewind_epochs=[0, 7], compare_bn_stats=[])
    out = layer_rewinding.main(argv)
    assert list(out["bn_modes"]) == ["final"]
    cfg = config.parse(layer_rewinding.KNOBS, argv)
    model, data, run = layer_rewinding.trained_run(cfg)
    params = {n for n, _ in model.named_parameters()}
    for g, keys in group_keys(model).items():
        for e in (0, 7):
            fresh = model_for(cfg, data)
            state = run.load_checkpoint(cfg.epochs)["model"]
            old = run.load_checkpoint(e)["model"]
            state.update({k: old[k] for k in keys if k in params})
            fresh.load_state_dict(state)
            assert out["bn_modes"]["final"]["accuracy"][g][str(e)] == accuracies(fresh, data, amp=cfg.amp), (g, e)


@pytest.mark.parametrize("recompute", [False, True])
def test_models_without_stages_get_whole_forwards_with_the_same_answers(tiny_trained, monkeypatch, recompute):
    """Where common.models.stages(model) is None (torchvision and user models), no prefix is reused."""
    import common.rewinding as rewinding
    cfg, model, data, run = tiny_trained
    epochs = [0, 4]
    keys = rewind_keys(model, "recompute" if recompute else "final")
    states = load_rewind_states(run, epochs, keys, model, data.device)
    fast = rewind_sweep(model, data, Rewinder(model, rewinding.clone_states(states), keys), epochs, amp=cfg.amp,
                        recompute_bn=recompute)
    calls = []
    monkeypatch.setattr(rewinding, "stages", lambda m: calls.append(m) or None)
    slow_rewinder = Rewinder(model, rewinding.clone_states(states), keys)
    slow = rewind_sweep(model, data, slow_rewinder, epochs, amp=cfg.amp, recompute_bn=recompute)
    assert calls and slow == fast
    assert slow_rewinder.changed_keys() == []


def test_missing_checkpoint_is_a_clear_error_and_writes_nothing(tiny_copy, tiny_argv):
    runs, name = tiny_copy
    (runs / name / "checkpoints" / "epoch_005.pt").unlink()
    with pytest.raises(UserError) as e:
        layer_rewinding.main(tiny_argv(runs_dir=runs, rewind_epochs=[0, 5]))
    assert "no checkpoint for epoch 5" in str(e.value) and "\n" not in str(e.value)
    assert not (runs / name / "layer_rewinding.json").exists()


def test_missing_run_is_trained_first(tiny_argv, tmp_path):
    out = layer_rewinding.main(tiny_argv(runs_dir=tmp_path / "fresh", epochs=2))
    assert out["rewind_epochs"] == [0, 1]
    assert (tmp_path / "fresh" / out["run"] / "checkpoints" / "epoch_002.pt").is_file()


@pytest.mark.parametrize("value, message", [
    ("[]", "must be a non-empty list"),
    ("[0,20]", "has 20, not an epoch in 0..19"),
    ("[-1]", "has -1, not an epoch in 0..19"),
    ("[0,2.5]", "has 2.5"),
    ("5", "must be a non-empty list"),
])
def test_bad_rewind_epochs(tiny_argv, value, message):
    with pytest.raises(UserError) as e:
        layer_rewinding.main(tiny_argv(rewind_epochs=value))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_input_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "layer_rewinding.py"), "--rewind_epochs=[0,25]",
                           f"--runs_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: rewind_epochs has 25, not an epoch in 0..19 (0 = initialization, 19 = last-but-one of epochs=20); "
        "e.g. --rewind_epochs=[0,2,5,10,15,19]"]
    assert not any(tmp_path.iterdir())


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_recomputed_bn_statistics_match_a_direct_estimate(tiny_trained):
    """recompute: the group's BatchNorm statistics re-estimated on the training images through the
    final earlier layers equal a plain estimate with full forwards (momentum=None, the group's BN in train mode)."""
    cfg, model, data, run = tiny_trained
    epochs = [0, 3]
    keys = rewind_keys(model, "recompute")
    assert keys == group_keys(model)
    rewinder = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    acc = rewind_sweep(model, data, rewinder, epochs, amp=cfg.amp, recompute_bn=True)
    assert rewinder.changed_keys() == []
    reference = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    groups = dict(layer_groups(model))
    for group in keys:
        for e in epochs:
            with reference.rewound(group, e):
                bns = _batchnorms(groups[group])
                model.eval()
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                    m.train()
                with torch.no_grad():
                    for idx in torch.arange(data.n_train).split(1024):
                        model(data.batch(idx), index=idx)
                for m in bns:
                    m.momentum = 0.1
                    m.eval()
                buffers = [k for k in keys[group] if k.rsplit(".", 1)[1] in ("running_mean", "running_var")]
                assert len(buffers) == 2 * len(bns)
                for k in buffers:  # the sweep stored its estimate in place of the checkpoint's statistics
                    assert torch.equal(rewinder.states[e][k], model.state_dict()[k]), (group, e, k)
                    assert not torch.equal(rewinder.states[e][k], reference.states[e][k]), (group, e, k)
                assert acc[group][e] == accuracies(model, data), (group, e)
    assert all(m.momentum == 0.1 and not m.training for m in _batchnorms(model))
    plain = rewind_sweep(model, data, Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys),
                         epochs, groups=["head"], amp=cfg.amp)
    assert plain["head"] == acc["head"]  # no BatchNorm in the head: nothing to recompute


def test_amp_setting_reaches_every_forward(tiny_trained, autocast_spy, monkeypatch):
    """amp=False must mean no autocast anywhere in the sweep: the prefix path, the whole-forward fallback and
    the BatchNorm re-estimation (on CUDA autocast would otherwise switch to bf16 whatever amp says)."""
    import common.evaluation as evaluation
    import common.rewinding as rewinding
    cfg, model, data, run = tiny_trained
    seen = autocast_spy(rewinding, evaluation)
    keys = rewind_keys(model, "recompute")
    states = load_rewind_states(run, [0], keys, model, data.device)
    for amp in (False, True):
        seen.clear()
        rewind_sweep(model, data, Rewinder(model, rewinding.clone_states(states), keys), [0], amp=amp, recompute_bn=True)
        assert seen and set(seen) == {amp}
    monkeypatch.setattr(rewinding, "stages", lambda m: None)  # the whole-forward fallback
    seen.clear()
    rewind_sweep(model, data, Rewinder(model, rewinding.clone_states(states), keys), [0], amp=False, recompute_bn=True)
    assert seen and set(seen) == {False}


@pytest.mark.parametrize("bn_stats", ["final", "recompute"])
def test_rewound_to_the_last_checkpoint_under_bf16_autocast_is_nearly_the_final_model(tiny_trained, cpu_bf16, bn_stats):
    """Under bf16 autocast (a CUDA run's code path, here on the CPU) every rewind computes with its own
    weights: rewound to the last-but-one checkpoint right after a rewind to initialization, each group
    gives nearly the final model's accuracies. (Autocast keeps each weight's bf16 copy for the life of a
    region: rewinds inside one region reused the first rewind's weights.)"""
    cfg, model, data, run = tiny_trained
    epochs = [0, cfg.epochs - 1]  # initialization first, as in every sweep
    keys = rewind_keys(model, bn_stats)
    rewinder = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    final = accuracies(model, data, amp=True)
    acc = rewind_sweep(model, data, rewinder, epochs, amp=True, recompute_bn=bn_stats == "recompute")
    for group in keys:
        for k in ("clean", "noisy", "test"):
            assert abs(acc[group][epochs[1]][k] - final[k]) <= 0.1, (group, k, acc[group][epochs[1]][k], final[k])
    assert min(acc[group][0]["noisy"] for group in keys) < 0.5  # the rewinds to initialization before them were real
    assert rewinder.changed_keys() == []
