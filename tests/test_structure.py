"""Run identity and names, one writer per run directory, unwritable directories, figure text."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import config, plots
from common.cli import UserError
from common.runs import Run, identity_hash, legacy_name, run_name, write_json
from conftest import REPO, TINY


def test_a_run_is_named_by_its_whole_identity(make_cfg):
    base = {**config.RUN_DEFAULTS, "device": "cpu"}
    name = run_name(SimpleNamespace(**base))
    assert re.fullmatch(r"mnist_5k_resnet9_w0\.25_noise0\.1_seed0_[0-9a-f]{8}", name), name
    # every identity key changes the name; where it runs does not
    changed = {"width": 1.0, "epochs": 30, "lr": 0.1, "schedule": "cosine", "augment": True, "model_seed": 3,
               "weight_decay": 0.0, "init_from": "ckpts", "device": "cuda"}  # cuda: bf16 precision
    names = {k: run_name(SimpleNamespace(**{**base, k: v})) for k, v in changed.items()}
    assert len(set(names.values()) | {name}) == len(changed) + 1, names
    assert names["model_seed"].endswith(f"_mseed3_{names['model_seed'][-8:]}")
    for key, value in {"runs_dir": "x", "overwrite": True, "deterministic": True, "groups": ["stem"]}.items():
        assert run_name(SimpleNamespace(**{**base, key: value})) == name, key
    # stable: a float knob given as an int is the same run; a key added later at an empty default keeps
    # every name (the hash skips None, "", False, [])
    assert run_name(SimpleNamespace(**{**base, "width": 1})) == names["width"]
    ident = config.train_config(SimpleNamespace(**base))
    assert identity_hash({**ident, "new_key": None}) == identity_hash({**ident, "new_key": ""}) == name[-8:]
    assert identity_hash({**ident, "new_key": 0}) != name[-8:]  # 0 is a value, not "off"
    # amp is recorded as the precision actually used: fp32 off CUDA, whatever amp says
    assert Run(SimpleNamespace(**{**base, "amp": False})).config["precision"] == "fp32"
    assert Run(SimpleNamespace(**{**base, "device": "cuda", "amp": True})).config["precision"] == "bf16"


def test_directories_under_earlier_names_are_still_found(make_cfg):
    cfg = make_cfg(width=0.5)
    assert legacy_name(cfg) == "mnist_5k_cnn_w0.5_noise0.1_seed0_e2_bs64"
    old = Path(cfg.runs_dir) / legacy_name(cfg)
    write_json(old / "config.json", {k: v for k, v in Run(cfg).config.items() if k != "init_from"})  # predates a key
    assert Run(cfg).dir == old
    # a directory of that name holding another configuration is not this run's
    assert Run(make_cfg(width=0.5, lr=0.1)).dir.name == run_name(make_cfg(width=0.5, lr=0.1))
    write_json(old / "config.json", {**Run(cfg).config, "momentum": 0.5})
    assert Run(cfg).dir.name == run_name(cfg)


def test_an_edited_script_top_and_an_unedited_script_train_two_runs(tmp_path, tiny_argv):
    """width = 0.5 set at the top of a copy of layer_rewinding.py, then neuron_flipping.py unedited: two
    directories, both runs succeed."""
    edited = tmp_path / "edited" / "layer_rewinding.py"
    edited.parent.mkdir()
    text = (REPO / "layer_rewinding.py").read_text()
    assert "\nwidth = 0.25 " in text
    edited.write_text(text.replace("\nwidth = 0.25 ", "\nwidth = 0.5  ", 1))
    argv = [a for a in tiny_argv() if not a.startswith("--width=")] + ["--epochs=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r1 = subprocess.run([sys.executable, str(edited), *argv, "--rewind_epochs=[0]", "--compare_bn_stats=[]"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "neuron_flipping.py", *argv, "--n_examples=1", "--max_units=3",
                         "--ref_batch=15", "--n_eot=1", "--collateral_n=20"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    widths = {json.loads((d / "config.json").read_text())["width"]: d for d in runs}
    assert set(widths) == {0.5, 0.25}
    assert (widths[0.5] / "layer_rewinding.json").is_file() and (widths[0.25] / "neuron_flipping.json").is_file()


def test_the_shared_block_shows_the_librarys_meanings():
    """A script's copy of the shared block says what the library's says of each key it comments (a
    meaning is written once, in common/config.py; --help reads both); the model key names the whole zoo."""
    from common import models
    library = config.meanings(config.__file__)
    for path in sorted(REPO.glob("*.py")):
        shown = {k: v for k, v in config.meanings(path).items() if k in config.RUN_DEFAULTS}
        for key, text in shown.items():
            assert text == library[key], f"{path.name}: the comment of {key} differs from common/config.py's"
    assert all(f" {m} |" in f" {library['model']}" for m in models.MODELS), library["model"]


def test_the_shared_block_is_defined_once_in_the_library():
    """Every script shows the library's block (the shipped defaults); a key it does not show comes from
    the library; a key the library does not define is refused; no library module imports a script."""
    import ast
    import importlib
    scripts = sorted(p.stem for p in REPO.glob("*.py"))
    for s in scripts:
        module = importlib.import_module(s)
        if hasattr(module, "RUN_KNOBS"):
            assert module.RUN_KNOBS == config.RUN_DEFAULTS, s
    ns = {"__name__": "script", "dataset": "mnist_5k", "width": 0.5}
    block = config.run_knobs(ns)
    assert list(block) == list(config.RUN_DEFAULTS) and block["width"] == 0.5 and ns["epochs"] == 20
    with pytest.raises(RuntimeError, match="not a shared key"):
        config.run_knobs({"__name__": "script", "widht": 0.5})
    # the import graph of scripts and library (imports inside functions count): no library module imports
    # a script, and there is no cycle
    edges = {}
    for path in [*REPO.glob("*.py"), *(REPO / "common").glob("*.py")]:
        mod = path.stem if path.parent == REPO else f"common.{path.stem}"
        edges[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (f"common.{node.module}" if node.module else "common") if node.level else node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                names = [getattr(node.args[0], "value", "")]
            else:
                continue
            edges[mod] |= {n for n in names if n != mod}
        if mod.startswith("common."):
            assert not edges[mod] & set(scripts), f"{path.name} imports a script: {edges[mod] & set(scripts)}"
    done = set()

    def visit(mod, stack):
        assert mod not in stack, "import cycle: " + " -> ".join(stack[stack.index(mod):] + [mod])
        if mod in edges and mod not in done:
            for other in sorted(edges[mod]):
                visit(other, stack + [mod])
            done.add(mod)
    for mod in edges:
        visit(mod, [])


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


def test_help_lists_every_knob_with_its_default_and_meaning_and_a_typo_gets_a_guess():
    r = subprocess.run([sys.executable, "layer_rewinding.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    run_part, own_part = r.stdout.split("this experiment:")
    assert "the run (shared by every script" in run_part
    assert re.search(r"--width=0\.25 +channel-width multiplier", run_part)
    assert re.search(r"--epochs=20 +training epochs of the run", run_part)  # the library's comment
    assert re.search(r"--rewind_bn_stats=final +BatchNorm statistics of the rewound group", own_part)
    assert all(f"--{k}=" in r.stdout for k in __import__("layer_rewinding").KNOBS)
    r = subprocess.run([sys.executable, "layer_rewinding.py", "--epoch=3"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown key --epoch; did you mean --epochs? (--help lists every key)"


def test_progress_off_a_terminal_is_a_plain_line_at_an_interval(capsys):
    from common.cli import progress
    for _ in progress(range(3), every=0.3, desc="short"):
        pass
    for _ in progress(range(4), every=0.3, desc="long"):
        time.sleep(0.2)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "short" not in err and "\r" not in err  # a loop shorter than the interval prints nothing
    assert 1 <= len(lines) <= 4 and lines[-1].startswith("long: 4/4 (100%)"), lines
