"""Run identity and names, one writer per run directory, unwritable directories, figure text."""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from common import config, plots
from common.cli import UserError
from common.runs import Run, run_name, write_json
from conftest import REPO, TINY


def test_default_run_keeps_its_name_and_every_other_identity_key_is_in_it(make_cfg):
    import gradient_accounting  # noqa: F401  (declares the shared block)
    d = config.RUN_DEFAULTS
    base = {**d, "device": "cpu"}
    assert run_name(SimpleNamespace(**base)) == "mnist_5k_resnet9_noise0.1_seed0"
    assert run_name(SimpleNamespace(**{**base, "width": 1.0})) == "mnist_5k_resnet9_w1_noise0.1_seed0"
    assert run_name(SimpleNamespace(**{**base, "epochs": 30, "lr": 0.1})) == "mnist_5k_resnet9_noise0.1_seed0_e30_lr0.1"
    assert run_name(SimpleNamespace(**{**base, "model_seed": 3, "schedule": "cosine", "augment": True})) == \
        "mnist_5k_resnet9_noise0.1_seed0_mseed3_cosine_augment"
    # where it runs is not what it is
    assert run_name(SimpleNamespace(**{**base, "runs_dir": "x", "overwrite": True, "deterministic": True})) == \
        "mnist_5k_resnet9_noise0.1_seed0"
    # amp is recorded as the precision actually used: fp32 off CUDA, whatever amp says
    assert Run(SimpleNamespace(**{**base, "amp": False})).config["precision"] == "fp32"
    assert Run(SimpleNamespace(**{**base, "device": "cuda", "amp": True})).config["precision"] == "bf16"
    assert run_name(SimpleNamespace(**{**base, "device": "cuda"})).endswith("_bf16")


def test_runs_of_a_sweep_sit_side_by_side_and_old_config_files_still_match(make_cfg):
    a, b = Run(make_cfg()), Run(make_cfg(width=0.5))
    assert a.dir != b.dir
    a.open(), b.open()  # neither refuses the other
    # a run directory written before `precision` and `init_from` were identity keys
    old = {k: v for k, v in a.config.items() if k not in ("precision", "init_from")}
    write_json(a.path("config.json"), old)
    a.check_config()
    write_json(a.path("config.json"), {**old, "lr": 0.5})
    with pytest.raises(UserError, match="another configuration"):
        a.check_config()


def test_unwritable_runs_dir_is_one_line(make_cfg):
    with pytest.raises(UserError, match="pass --runs_dir="):
        Run(make_cfg(runs_dir="/proc/nope")).open()
    r = subprocess.run([sys.executable, "layer_rewinding.py", "--runs_dir=/proc/nope", "--model=cnn"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "runs_dir" in r.stderr


# Two real processes: the first holds the lock (and trains), the second waits, then reuses the run.
_WORKER = """
import sys, time
sys.path.insert(0, {repo!r})
from types import SimpleNamespace
from conftest import TINY
from common.runs import Run
from common.training import trained_run
cfg = SimpleNamespace(**{{**TINY, "dataset": "npz:" + {npz!r}, "runs_dir": {runs!r}, "epochs": 2}})
if sys.argv[1] == "hold":
    with Run(cfg).lock():
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
        trained_run(cfg, quiet=False)
else:
    trained_run(cfg, quiet=False)
print("done", time.time(), flush=True)
"""


def _worker(tmp_path, tiny_npz, *args):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO / "tests"), npz=str(tiny_npz), runs=str(tmp_path / "runs")))
    return subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, word):
    line = proc.stdout.readline()
    assert word in line, line


def test_a_second_process_waits_for_the_first_and_reuses_its_run(tmp_path, tiny_npz):
    first = _worker(tmp_path, tiny_npz, "hold", "2")
    _wait_for(first, "holding")
    second = _worker(tmp_path, tiny_npz, "use")
    out1, _ = first.communicate(timeout=300)
    out2, _ = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    assert "training it first" in out1                      # the first trained
    assert "waiting for it to finish" in out2 and f"process {first.pid}" in out2  # the second waited, once
    assert out2.count("waiting") == 1 and "training" not in out2.replace("being trained", "")  # and reused
    assert float(out2.split("done")[1]) >= float(out1.split("done")[1])


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_npz):
    dead = _worker(tmp_path, tiny_npz, "hold", "60")
    _wait_for(dead, "holding")
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    heir = _worker(tmp_path, tiny_npz, "use")
    out, _ = heir.communicate(timeout=300)
    assert heir.returncode == 0, out
    assert "waiting" not in out and "training it first" in out


def test_figure_titles_are_wrapped_inside_the_canvas(tmp_path):
    fig, axes = plots.figure("A very long title " * 12, SimpleNamespace(**{**TINY, "width": 0.25}), ncols=1)
    axes[0, 0].set_title("panel title that is much too long for one small panel " * 2)
    axes[0, 0].plot([0, 1], [0, 1], label="line")
    axes[0, 0].legend()
    plots.fit_text(fig)
    assert plots.overflowing_text(fig) == []
    path = plots.save(fig, tmp_path / "f.png")
    assert path.is_file() and path.stat().st_size > 0
