"""make reproduce, end to end on a tiny configuration: all five experiments, one seed, the report."""
import importlib
import json
import re
import shutil

import pytest

import reproduce
from common import config, provenance
from common.cli import UserError
from common.runs import read_json


def test_pipeline_writes_report_from_results(tiny_npz, tmp_path, capsys):
    argv = ["--seeds=[0]", "--name=smoke", f"--reports_dir={tmp_path / 'reports'}", f"--results_dir={tmp_path / 'res'}",
            f"--dataset=npz:{tiny_npz}", "--model=cnn", "--width=0.5", "--epochs=3", "--device=cpu",
            f"--runs_dir={tmp_path / 'runs'}", "--rewind_epochs=[0,1]", "--retrain_epochs=1",
            "--n_examples=2", "--max_units=5", "--ref_batch=15", "--n_eot=1", "--collateral_n=50",
            "--etd_epochs=2", "--gallery_size=2"]
    path = reproduce.main(argv)
    text = path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5 and all((path.parent / im).is_file() for im in images)
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if "cnn" in p.name)
    for exp in reproduce.EXPERIMENTS:
        assert (run_dir / f"{exp}.json").is_file(), exp
    # the variants the claims need ran beside the defaults (first seed)
    assert all((run_dir / f"neuron_flipping_{v}.json").is_file() for v in ("channel_out", "bntrain"))
    assert read_json(run_dir / "layer_retraining.json")["ablation"]
    # the verdicts first: one row per judged claim and variant, each with its variant named, a verdict,
    # statistic, CI and reason; each claim's rule written once below the table
    claims_md = text.split("## Verdicts")[1].split("\n## ")[0]
    rows = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in claims_md.splitlines()
            if r.startswith("| ") and not r.startswith("| #")]
    header = next(r for r in claims_md.splitlines() if r.startswith("| #"))
    # no model column: every row was measured on the run's model (a model column appears when they differ)
    assert [c.strip() for c in header.strip("| ").split(" | ")] == ["#", "variant", "verdict", "statistic",
                                                                     "95% CI", "why"]
    # BN modes, ablation, flip variants, drop scalings (ETD on the run's model, --model=cnn for every script:
    # no ETD variant, which would repeat it)
    assert [r[0] for r in rows] == ["1", "2", "2", "3", "3", "4", "4", "4", "5", "5"]
    for r in rows:
        assert len(r) == 6 and r[1] and r[3] and r[4] and r[5]
        assert r[2].split("**")[1] in ("yes", "partial", "no", "inconclusive")
    assert {r[1] for r in rows if r[0] == "4"} == {"unit: channel", "unit: channel_out",
                                                  "unit: channel, BatchNorm re-estimated (train pass)"}
    assert [r[1] for r in rows if r[0] == "5"] == ["drop: rescaled (authors)", "drop: not rescaled"]
    rules = text.split("## Rules")[1].split("\n## ")[0]
    for n in range(1, 6):
        assert rules.count(f"**Claim {n}.**") == 1 and len(rules.split(f"**Claim {n}.**")[1].split("*Rule:*")[1]) > 40
    # a number in the claims table comes from the JSON: noisy accuracy after the ETD drop
    etd = read_json(run_dir / "example_tied_dropout.json")
    noisy = etd["per_example"]["noisy_drop_correct"]
    assert f"noisy accuracy after the drop {100 * sum(noisy) / len(noisy):.1f}%" in claims_md
    for scaling in ("rescaled", "unscaled"):  # the ETD section's table: both drop rows
        assert f"[drop {scaling}] |" in text.split("## 5. Example-tied dropout")[1]
    assert len(read_json(path.parent / "claims.json")) == len(rows)
    # the report is also kept beside the seeds it was made from (results_dir), identical
    for f in ["REPORT.md", "claims.json", "report.json"] + images:
        assert (tmp_path / "res" / "smoke" / f).read_bytes() == (path.parent / f).read_bytes(), f
    timings = read_json(path.parent / "timings.json")
    n_runs = 4 + len(reproduce.VARIANTS) - 1  # the ablation replaces seed 0's retraining; no ETD variant
    assert len(timings) == n_runs and all(k.endswith("/seed0") for k in timings)

    # every experiment and variant kept with its seed under its own name
    stored = json.loads((tmp_path / "res" / "smoke" / "seed0" / "provenance.json").read_text())
    assert len(stored) == n_runs and all((tmp_path / "res" / "smoke" / "seed0" / f).is_file() for f in stored)

    # a second invocation reuses every result and only rebuilds the report
    files = [p for p in run_dir.glob("*.json")]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == n_runs
    # the invocation that ran them is recorded (the one that only reused is not), in the report and README block
    inv = read_json(path.parent / "invocations.json")
    assert len(inv) == 1 and inv[0]["ran"] == n_runs and inv[0]["reused"] == 0 and inv[0]["wall_s"] > 0
    assert read_json(path.parent / "report.json")["invocations"] == inv
    assert f"{inv[0]['wall_s'] / 60:.1f} min" in path.read_text()
    from common import report
    assert f"its experiments ran in {inv[0]['wall_s'] / 60:.0f} min of wall time ({n_runs} runs, 1 invocation, --jobs=1" in \
        report.readme_block(path.parent / "claims.json", tmp_path)
    assert path.read_text().count("reused (took") == n_runs  # the wall-time table marks the reused jobs
    assert mtimes == {p: p.stat().st_mtime_ns for p in files}


# Two experiments are enough to test the scheduling: the trainer and one that reuses its run.
TWO = ("gradient_accounting", "neuron_flipping")
SMALL = ["--model=cnn", "--width=0.5", "--epochs=3", "--device=cpu", "--n_examples=2", "--max_units=5",
         "--ref_batch=15", "--n_eot=1", "--collateral_n=50", "--variant_seeds=0"]


def _numbers(obj):
    """A results JSON without what depends on when, where and how fast it ran."""
    if isinstance(obj, dict):  # nor where it ran (runs_dir, ...)
        return {k: _numbers(v) for k, v in obj.items()
                if not any(w in k for w in ("second", "time", "wall")) and k not in reproduce.IGNORED}
    return [_numbers(v) for v in obj] if isinstance(obj, list) else obj


def test_parallel_seeds_match_sequential_ones_and_stored_seeds_add_up(tiny_npz, tmp_path, monkeypatch, capsys,
                                                                      one_thread):
    monkeypatch.setattr(reproduce, "EXPERIMENTS", TWO)
    base = [f"--dataset=npz:{tiny_npz}", "--name=t", f"--reports_dir={tmp_path / 'reports'}", *SMALL]
    par, seq = tmp_path / "par", tmp_path / "seq"
    reproduce.main(base + ["--seeds=[0,1]", "--jobs=2", "--threads=1", f"--runs_dir={par / 'runs'}",
                           f"--results_dir={par / 'res'}"])
    out = capsys.readouterr().out
    assert out.count("started (process") == 4 and "1 thread(s)" in out
    logs = list((tmp_path / "reports" / "t" / "logs").glob("*.log"))
    assert len(logs) == 4 and all(log.stat().st_size > 0 for log in logs)  # one log per process
    # sequential, in this process (one thread, as each parallel process had), one seed per invocation
    seq_argv = base + [f"--runs_dir={seq / 'runs'}", f"--results_dir={seq / 'res'}"]
    reproduce.main(seq_argv + ["--seeds=[0]"])
    shutil.rmtree(seq / "runs")  # seed 0 now lives only in the stored per-seed files
    # ... and seed 1 runs in another clone: no local record of seed 0's invocation, only the committed report
    before = read_json(seq / "res" / "t" / "report.json")["invocations"]
    shutil.rmtree(tmp_path / "reports" / "t")
    path = reproduce.main(seq_argv + ["--seeds=[1]"])
    out = capsys.readouterr().out
    assert "1 of them made by earlier invocations" in path.read_text() and "Seeds [0, 1]" in path.read_text()
    after = read_json(seq / "res" / "t" / "report.json")["invocations"]  # the wall time adds up across clones
    assert before and after[:len(before)] == before and len(after) == len(before) + 1 and after[-1]["ran"] == 2
    assert "reused (not timed)" not in path.read_text()  # seed 0's times come from its stored provenance
    for seed in (0, 1):
        files = sorted(p.name for p in (par / "res" / "t" / f"seed{seed}").iterdir())
        assert files == sorted(p.name for p in (seq / "res" / "t" / f"seed{seed}").iterdir())
        assert {"gradient_accounting.json", "neuron_flipping.json", "gradient_accounting.metrics.jsonl",
                "provenance.json"} <= set(files)
        assert not any(f.endswith(".pt") for f in files)  # never a checkpoint
        for f in ("gradient_accounting.json", "neuron_flipping.json"):
            a, b = (json.loads((d / "res" / "t" / f"seed{seed}" / f).read_text()) for d in (par, seq))
            assert _numbers(a) == _numbers(b), (seed, f)
    # a stored seed made with another configuration or code is refused in one line, before any work
    stored = seq / "res" / "t" / "seed0" / "neuron_flipping.json"
    saved = json.loads(stored.read_text())
    stored.write_text(json.dumps({**saved, "config": {**saved["config"], "max_units": 7}}))
    with pytest.raises(UserError, match=r"seed 0: .*neuron_flipping.json was made with another configuration "
                                        r"\(max_units: 7 there, 5 now\)"):
        reproduce.main(seq_argv + ["--seeds=[1]"])
    stored.write_text(json.dumps(saved))
    prov_path = seq / "res" / "t" / "seed0" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["neuron_flipping.json"]["code"]["common/flipping.py"] = "0" * 12
    prov_path.write_text(json.dumps(prov))
    with pytest.raises(UserError, match=r"another code version \(code of common/flipping.py changed\)"):
        reproduce.main(seq_argv + ["--seeds=[1]"])
    # a seed being run whose stored result came from other code is run again, even though its run directory
    # holds that same result (made by that code); the other experiments are reused
    prov["neuron_flipping.json"]["code"]["common/flipping.py"] = reproduce.code_version("neuron_flipping")[
        "common/flipping.py"]
    prov_path.write_text(json.dumps(prov))
    prov1_path = seq / "res" / "t" / "seed1" / "provenance.json"
    prov1 = json.loads(prov1_path.read_text())
    prov1["neuron_flipping.json"]["code"]["common/flipping.py"] = "0" * 12
    prov1_path.write_text(json.dumps(prov1))
    capsys.readouterr()
    reproduce.main(seq_argv + ["--seeds=[1]"])
    out = capsys.readouterr().out
    assert "[seed 1] neuron_flipping ..." in out and "[seed 1] gradient_accounting: reusing" in out
    assert json.loads(prov1_path.read_text())["neuron_flipping.json"]["code"] == reproduce.code_version("neuron_flipping")


def test_code_version_follows_the_numbers_not_the_figures(tmp_path, monkeypatch):
    """A stored seed stays valid through a comment, docstring or figure edit, not through a numeric one."""
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "maths.py").write_text("def f(x):\n    return 2 * x\n")
    exp = tmp_path / "exp.py"
    base = ('"""Doc."""\nfrom common import maths\n\n\ndef main():\n    return maths.f(1)\n\n\n'
            'def plot_it(r):\n    return r  # a figure\n')
    exp.write_text(base)
    v0 = reproduce.code_version("exp")
    assert set(v0) == {"exp.py", "common/maths.py"}
    exp.write_text(base.replace('"""Doc."""', '"""Other doc."""').replace("# a figure", "# edited"))
    assert reproduce.code_version("exp") == v0
    exp.write_text(base.replace("return r  #", "return [r, r]  #"))  # the figure's code
    assert reproduce.code_version("exp") == v0
    exp.write_text(base.replace("maths.f(1)", "maths.f(2)"))  # a number
    assert reproduce.code_version("exp") != v0
    exp.write_text(base)
    (tmp_path / "common" / "maths.py").write_text("def f(x):\n    return 3 * x\n")  # an imported module's number
    assert reproduce.code_version("exp")["common/maths.py"] != v0["common/maths.py"]


def test_the_etd_variant_is_the_runs_model_and_keeps_its_own_name(tmp_path):
    """The ETD variant trains the run's model (a preset's, else ResNet-9 x0.25), none where the primary ETD
    row already is it; in a seed's folder it keeps a name of its own beside the primary ETD JSON."""
    import importlib
    modules = {e: importlib.import_module(e) for e in reproduce.EXPERIMENTS}
    label = "resnet9 x0.25, after every conv block"
    assert reproduce.variants_for([], [], modules)[-1] == ("example_tied_dropout", label,
                                                       ["--model=resnet9", "--width=0.25"])
    assert reproduce.variants_for([], ["--width=0.5"], modules)[-1][2] == ["--model=resnet9", "--width=0.5"]
    assert all(e != "example_tied_dropout" for e, _, _ in reproduce.variants_for([], ["--model=cnn", "--width=0.5"], modules))
    path = tmp_path / "example_tied_dropout.json"
    assert reproduce.store_name("example_tied_dropout", None, path) == "example_tied_dropout.json"
    assert reproduce.store_name("example_tied_dropout", label, path) == \
        "example_tied_dropout.resnet9-x0.25-after-every-conv-block.json"


def test_a_model_column_where_the_rows_models_differ():
    from common import report
    row = {"number": 5, "variant": "drop: rescaled (authors)", "verdict": "no", "statistic": "s", "ci": "c",
           "reason": "r", "model": "resnet18 x0.125"}
    one = report.summary_table([row, {**row, "variant": "drop: not rescaled"}])
    two = report.summary_table([row, {**row, "model": "resnet9 x0.25"}])
    assert "| model |" not in one.splitlines()[0]
    assert two.splitlines()[0].startswith("| # | variant | model | verdict |")
    assert "| resnet18 x0.125 |" in two.splitlines()[2] and "| resnet9 x0.25 |" in two.splitlines()[3]


def test_a_config_files_name_is_not_a_difference():
    """A seed run through a generated overrides file (e.g. --runs_dir=...) is reused without one."""
    import neuron_flipping
    from common import config
    cfg = config.parse(neuron_flipping.KNOBS, [])
    saved = {**vars(cfg), **config.train_config(cfg), "config_file": "overrides"}
    assert reproduce.difference(saved, cfg) is None
    assert reproduce.difference({**saved, "max_units": 7}, cfg) == "max_units: 7 there, 100 now"


def test_a_stored_seed_is_matched_on_the_precision_it_trained_in_not_on_amp():
    """amp only asks for bf16: an fp32 GPU seed (amp off) joins CPU seeds, a bf16 one is refused."""
    import gradient_accounting
    from common.runs import run_dir
    cpu = config.parse(gradient_accounting.KNOBS, ["--device=cpu"])
    saved = {**vars(cpu), **config.train_config(cpu)}
    gpu_fp32 = config.parse(gradient_accounting.KNOBS, ["--device=cuda", "--amp=False"])
    gpu_bf16 = config.parse(gradient_accounting.KNOBS, ["--device=cuda"])
    assert reproduce.difference(saved, gpu_fp32) is None
    assert reproduce.run_difference(run_dir(cpu).name, gpu_fp32) is None
    assert reproduce.difference({k: v for k, v in saved.items() if k != "precision"}, gpu_bf16) is None  # older files
    why = reproduce.run_difference(run_dir(cpu).name, gpu_bf16)
    assert why and "precision here: bf16" in why and run_dir(cpu).name in why


def test_code_version_is_the_same_on_every_python_version():
    """Seeds made on another machine's Python add up: the hash ignores fields a newer Python adds empty
    (3.12's type_params on every function; ast.dump printed them, so a 3.12 seed was refused on 3.11)."""
    import ast
    tree = ast.parse("def f(x):\n    return x + 1\n")
    text = provenance._canonical(tree)
    tree.body[0].type_params = []
    assert provenance._canonical(tree) == text
    tree.body[0].body[0].value.right.value = 2  # a numeric edit still changes it
    assert provenance._canonical(tree) != text


def test_every_seed_trains_before_any_other_experiment_starts():
    """With two jobs and three seeds, seed 2's training starts as soon as a slot frees, not after seed 0's
    and 1's other experiments (it ran alone at the end, one core idle); an experiment waits for its seed's."""
    tasks = [(f"{e}{s}", s, e, e, []) for s in range(3) for e in ("gradient_accounting", "layer_rewinding", "neuron_flipping")]
    trains = {t[1]: t for t in tasks if t[3] == "gradient_accounting"}
    pending, running, started = list(tasks), [], []
    for finished in ["gradient_accounting0", "gradient_accounting1", "layer_rewinding0", "gradient_accounting2"]:
        while len(running) < 2 and (task := reproduce.next_task(pending, running, trains)):
            pending.remove(task)
            running.append(task)
            started.append(task[0])
        running = [t for t in running if t[0] != finished]
    assert started[:4] == ["gradient_accounting0", "gradient_accounting1", "gradient_accounting2", "layer_rewinding0"]
    assert reproduce.next_task([tasks[4]], [trains[1]], trains) is None  # seed 1 still training


def test_the_report_says_which_reproduction_default_a_preset_overrode():
    flipping = importlib.import_module("neuron_flipping")
    assert reproduce.overridden(flipping, ["--n_examples=50"], [], ["--n_examples=20"]) == \
        ", here `--n_examples=20` (preset or command line)"
    assert reproduce.overridden(flipping, ["--n_examples=50"], [], ["--max_units=7"]) == ""
    assert reproduce.overridden(flipping, ["--n_examples=50"], [], ["--n_examples=50"]) == ""
    preset = str(reproduce.REPO / "configs" / "mnist_5k_fast_cpu.py")  # the labelled cheaper preset sets 20
    assert reproduce.overridden(flipping, ["--n_examples=50"], [preset], []) == \
        ", here `--n_examples=20` (preset or command line)"


def test_every_committed_seed_was_made_by_todays_code_or_its_store_says_it_is_stale():
    # A change to the code that makes an experiment's numbers leaves committed seeds a later
    # `make reproduce` refuses; that must not go unnoticed (the README's table would come from code that
    # no longer exists): re-run them, or mark the store stale in its README.
    def marked(store):  # a line of its README that starts with **Stale** (and says why)
        readme = store / "README.md"
        return readme.is_file() and re.search(r"^\*\*Stale\*\*", readme.read_text(), re.M)

    stale = []
    for prov in sorted((reproduce.REPO / "docs" / "results").glob("*/seed*/provenance.json")):
        if marked(prov.parent.parent):
            continue
        for name, entry in read_json(prov).items():
            why = provenance.code_difference(entry["code"], provenance.code_version(entry["experiment"]))
            if why:
                stale.append(f"{prov.parent.relative_to(reproduce.REPO)}/{name}: {why}")
    # the localization comparison's records, which later sessions resume, likewise
    loc = reproduce.REPO / "docs" / "results" / "localization_methods"
    for rec in ([] if marked(loc) else sorted(loc.glob("seed*/*.json"))):
        why = provenance.code_difference(read_json(rec)["code"], provenance.code_version("localization_methods"))
        if why:
            stale.append(f"{rec.relative_to(reproduce.REPO)}: {why}")
    assert not stale, stale


def test_a_stopped_invocation_keeps_its_wall_time_up_to_its_last_experiment(tiny_npz, tmp_path, monkeypatch,
                                                                             one_thread):
    """Killed after its first experiment, an invocation is still in invocations.json (marked stopped, the
    experiments it finished, its wall time so far); the next one adds itself, and the report and the README
    block count both."""
    monkeypatch.setattr(reproduce, "EXPERIMENTS", TWO)
    argv = [f"--dataset=npz:{tiny_npz}", "--name=t", f"--reports_dir={tmp_path / 'reports'}", *SMALL, "--seeds=[0]",
            f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'res'}"]
    flipping = importlib.import_module("neuron_flipping")

    def killed(argv_):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(flipping, "main", killed)
        with pytest.raises(KeyboardInterrupt):
            reproduce.main(argv)
    inv = read_json(tmp_path / "reports" / "t" / "invocations.json")
    assert len(inv) == 1 and inv[0]["stopped"] is True and inv[0]["ran"] == 1 and inv[0]["wall_s"] > 0
    path = reproduce.main(argv)
    inv = read_json(tmp_path / "reports" / "t" / "invocations.json")
    assert [i.get("stopped") for i in inv] == [True, None] and [i["ran"] for i in inv] == [1, 1]
    assert read_json(path.parent / "report.json")["invocations"] == inv
    assert "(stopped: up to its last finished experiment)" in path.read_text()
    from common import report
    assert "(2 runs, 2 invocations, --jobs=1" in report.readme_block(path.parent / "claims.json", tmp_path)
