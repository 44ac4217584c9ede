"""ResNet-9 (residual groups: res1.0, res1.1, ...) through accounting, rewinding, retraining and flipping on tiny data.

The other tests run the small cnn, whose groups are top-level blocks; here a group can sit inside a
residual stage, so the prefix reuse of rewinding and the freezing of retraining meet the model the
paper uses."""
import json

import pytest

import gradient_accounting
import layer_retraining
import layer_rewinding
import neuron_flipping
from common import config
from common.data import load_data
from common.evaluation import accuracies
from common.models import group_keys, layer_groups, model_for
from common.runs import Run

EPOCHS = 5
RESIDUAL = ["res1.0", "res1.1", "res2.0", "res2.1"]


@pytest.fixture(scope="module")
def resnet9_run(tiny_npz, tmp_path_factory):
    """A ResNet-9 x0.125 run on 256 of the tiny digits (128 test), trained by gradient accounting:
    (argv, run directory)."""
    import numpy as np
    tmp = tmp_path_factory.mktemp("resnet9")
    arrays = dict(np.load(tiny_npz))
    small = tmp / "small.npz"
    np.savez(small, x_train=arrays["x_train"][:256], y_train=arrays["y_train"][:256],
             x_test=arrays["x_test"][:128], y_test=arrays["y_test"][:128])
    argv = [f"--dataset=npz:{small}", "--model=resnet9", "--width=0.125", f"--epochs={EPOCHS}", "--batch_size=32",
            "--lr=0.1", "--device=cpu", f"--runs_dir={tmp / 'runs'}", "--download=False"]
    gradient_accounting.main(argv)
    return argv, Run(config.parse(layer_rewinding.KNOBS, argv)).dir


def group_names(argv):
    cfg = config.parse(layer_retraining.KNOBS, argv)
    return [g for g, _ in layer_groups(model_for(cfg, load_data(cfg)))]


def test_accounting_covers_the_residual_groups(resnet9_run):
    argv, run_dir = resnet9_run
    saved = json.loads((run_dir / "gradient_accounting.json").read_text())
    assert saved["groups"][:4] == ["conv1", "conv2", "res1.0", "res1.1"] and len(saved["groups"]) == 9
    assert len(saved["epochs"]) == EPOCHS


def test_rewinding_residual_groups_matches_whole_forwards(resnet9_run):
    """bn_modes.final inside residual stages equals a fresh model with the group's parameters swapped in."""
    argv, run_dir = resnet9_run
    out = layer_rewinding.main(argv + ["--rewind_epochs=[0]", "--compare_bn_stats=[]"])  # recompute: test_layer_rewinding
    assert out["groups"] == ["conv1", "conv2", *RESIDUAL[:2], "conv3", *RESIDUAL[2:], "conv4", "head"]
    cfg = config.parse(layer_rewinding.KNOBS, argv)
    model, data, run = layer_rewinding.trained_run(cfg)
    params = {n for n, _ in model.named_parameters()}
    for g in RESIDUAL:
        keys = group_keys(model)[g]
        fresh = model_for(cfg, data)
        state = run.load_checkpoint(cfg.epochs)["model"]
        old = run.load_checkpoint(0)["model"]
        state.update({k: old[k] for k in keys if k in params})
        fresh.load_state_dict(state)
        assert out["bn_modes"]["final"]["accuracy"][g]["0"] == accuracies(fresh, data, amp=cfg.amp), g


def test_retraining_a_residual_group_freezes_the_rest(resnet9_run):
    argv, run_dir = resnet9_run
    res = layer_retraining.main(argv + ["--retrain_epochs=1", "--curve_every=0", "--retrain_groups=['res1.1','res2.0']"])
    for g in ("res1.1", "res2.0"):
        entry = res["groups"][g]
        assert entry["noisy_examples_shown"] == 0 and entry["frozen_state_unchanged"]
        assert entry["control"]["noisy_examples_shown"] > 0 and entry["control"]["frozen_state_unchanged"]
        assert set(entry["reset"]) >= {"clean", "noisy", "noisy_true", "test"}


def test_flipping_searches_units_in_residual_groups(resnet9_run):
    argv, run_dir = resnet9_run
    out = neuron_flipping.main(argv + ["--n_examples=2", "--ref_batch=15", "--max_units=8", "--n_eot=0",
                                       "--collateral_n=16"])
    records = out["records"]
    assert sorted(r["kind"] for r in records) == ["clean", "clean", "clean_matched", "clean_matched", "noisy", "noisy"]
    groups = set(group_names(argv))
    assert all(r["n_units"] == len(r["units"]) >= 1 for r in records)
    assert {u["group"] for r in records for u in r["units"]} <= groups
