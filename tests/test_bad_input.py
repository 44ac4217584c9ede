"""Every refused input of docs/reliability.md's table: one line on stderr, exit status 2, nothing on disk changed.

The scripts run in-process through common.cli.run (as `python script.py ...` does); one test runs a
real subprocess to check that no traceback escapes.
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import example_tied_dropout
import gradient_accounting
import layer_retraining
import layer_rewinding
import neuron_flipping
from common import cli
from conftest import REPO


def refuse(monkeypatch, capsys, module, argv):
    """Run `module` as a command with `argv`; assert exit 2 and one error line; return that line."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py"] + list(argv))
    with pytest.raises(SystemExit) as e:
        cli.run(module.main)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(directory):
    """{relative path: sha256} of every file below a directory."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tiny_trained, tmp_path):
    """A private copy of the finished tiny run: (runs_dir, run directory)."""
    _, _, _, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)
    return runs, runs / run.dir.name


@pytest.mark.parametrize("module, argv, message", [
    (gradient_accounting, ["--dataset=imagenet"], "unknown dataset 'imagenet'"),
    (layer_rewinding, ["--model=vgg16"], "unknown model 'vgg16'"),
    (layer_retraining, ["--schedule=step"], "unknown schedule 'step'"),
    (neuron_flipping, ["--learning_rate=0.1"], "unknown key --learning_rate; valid keys:"),
    (example_tied_dropout, ["--epochs=ten"], "not a Python literal"),
    (gradient_accounting, ["--epochs=2.5"], "epochs must be int"),
    (layer_rewinding, ["--noise=1.0"], "noise=1.0 is outside [0, 1)"),
    (layer_retraining, ["--noise=-0.2"], "is outside [0, 1)"),
    (example_tied_dropout, ["--p_gen=1.0"], "p_gen=1.0 is outside (0, 1)"),
    (example_tied_dropout, ["--p_mem=0"], "p_mem=0.0 is outside (0, 1)"),
    (layer_rewinding, ["--rewind_epochs=[]"], "rewind_epochs"),
    (gradient_accounting, ["configs/no_such_preset.py"], "config file configs/no_such_preset.py not found"),
])
def test_config_refusals(monkeypatch, capsys, module, argv, message):
    assert message in refuse(monkeypatch, capsys, module, argv)


@pytest.mark.parametrize("arrays, message", [
    (None, "not found"),
    (dict(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(19) % 2), "has 20 examples but y_train has 19"),
    (dict(x_train=np.zeros((20, 8, 8), np.float32), y_train=np.arange(20) % 2), "dtype float32"),
    (dict(x_train=np.zeros((20, 8), np.uint8), y_train=np.arange(20) % 2), "has shape (20, 8)"),
    (dict(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 2 - 1), "negative labels"),
    (dict(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 2,
          x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.array([0, 1, 7, 1])), "never occurs in y_train"),
])
def test_npz_refusals(monkeypatch, capsys, tmp_path, arrays, message):
    path = tmp_path / "mine.npz"
    if arrays is not None:
        np.savez(path, **arrays)
    line = refuse(monkeypatch, capsys, gradient_accounting, [f"--dataset=npz:{path}", f"--runs_dir={tmp_path}/runs"])
    assert message in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_dataset_not_present_nor_downloadable(monkeypatch, capsys, tmp_path):
    import common.data as data
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path / "empty")
    line = refuse(monkeypatch, capsys, layer_rewinding, ["--dataset=cifar10", "--download=False",
                                                         f"--runs_dir={tmp_path}/runs"])
    assert "dataset cifar10 not found in" in line and "download" in line


def test_run_directory_with_other_config(monkeypatch, capsys, tiny_argv, run_copy):
    runs, run_dir = run_copy
    # a run directory is named by a hash of its whole identity, so two configurations meet in one only
    # when its config.json was changed by hand (or the directory copied under another run's name)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "lr": saved["lr"] * 2}))
    before = snapshot(run_dir)
    line = refuse(monkeypatch, capsys, gradient_accounting, tiny_argv(runs))
    assert "another configuration" in line and "--overwrite=True" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot be loaded safely"),
    ("garbage", "cannot be loaded safely"),
    ("other_model", "from another model or configuration"),
])
def test_broken_checkpoints(monkeypatch, capsys, tiny_argv, run_copy, damage, message):
    runs, run_dir = run_copy
    final = sorted((run_dir / "checkpoints").glob("epoch_*.pt"))[-1]
    if damage == "truncate":
        final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    elif damage == "garbage":
        final.write_bytes(b"\x00not a checkpoint" * 100)
    else:  # a well-formed checkpoint whose weights belong to another architecture
        ckpt = torch.load(final, weights_only=True)
        ckpt["model"] = {k: torch.zeros(3) if v.ndim else v for k, v in ckpt["model"].items()}
        torch.save(ckpt, final)
    before = snapshot(run_dir)
    assert message in refuse(monkeypatch, capsys, layer_rewinding, tiny_argv(runs))
    assert snapshot(run_dir) == before


def test_too_many_flipping_examples(monkeypatch, capsys, tiny_argv, run_copy):
    runs, run_dir = run_copy
    before = snapshot(run_dir)
    line = refuse(monkeypatch, capsys, neuron_flipping, tiny_argv(runs, n_examples=10_000))
    assert "n_examples" in line
    assert snapshot(run_dir) == before


def test_no_traceback_from_a_real_command(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "layer_retraining.py"), "--model=alexnet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "unknown model 'alexnet'" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--no_such=1"], "unknown key --no_such: no experiment uses it"),   # a config file would ignore it
    (["--noise=2.0"], "noise=2.0 is outside [0, 1)"),
])
def test_reproduce_refuses_overrides_before_writing(monkeypatch, capsys, tmp_path, argv, message):
    """make reproduce ARGS=... : a typo'd key or a bad value stops it at once; its report folder
    (and a previous overrides.py in it) is left as it was."""
    import reproduce
    reports = tmp_path / "reports"
    (reports / "default").mkdir(parents=True)
    (reports / "default" / "overrides.py").write_text("noise = 0.2\n")
    before = snapshot(reports)
    line = refuse(monkeypatch, capsys, reproduce, [f"--reports_dir={reports}", *argv])
    assert message in line
    assert snapshot(reports) == before
