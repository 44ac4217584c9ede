"""Hold-out (C-)scores, the proxies, their agreement, the scores file and the `memorized` knob."""
import csv
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import memorization_scores
from common import cli, config
from common.cli import UserError
from common.data import (KINDS, Data, load_data, load_scores, mark_memorized, pool_positions, scores_path,
                         stratified_split)
from common.evaluation import split_accuracy
from common.memorization import (holdout_scores, holdout_subset, learning_proxies, load_published, spearman,
                                 spearman_ci, write_scores)
from conftest import TINY


def test_learning_proxies_by_hand():
    # rows = epochs 1..4, columns = examples
    c = np.array([[0, 1, 1, 0, 1],
                  [1, 1, 0, 0, 1],
                  [1, 1, 1, 0, 0],
                  [1, 1, 1, 0, 1]], dtype=bool)
    p = learning_proxies(c)
    assert p["learning_speed"].tolist() == [3, 4, 3, 0, 3]
    assert p["forgetting"].tolist() == [0, 0, 1, 0, 1]
    assert p["first_learned"].tolist() == [2, 1, 3, 5, 4]  # 5 = epochs + 1: wrong at the end


def test_holdout_scores_and_standard_error():
    held = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    score, se, m = holdout_scores(correct, held)
    assert m.tolist() == [4, 2, 1, 2]
    assert score[:3].tolist() == [0.5, 0.5, 1.0] and score[3] == 1.0  # correct outside `held` is ignored
    outcomes = np.array([1, 1, 0, 0.0])
    assert se[0] == pytest.approx(outcomes.std(ddof=1) / 2)
    assert np.isnan(se[2])  # one model: no standard error
    sub = holdout_subset(100, 0.7, 0, 3)
    assert sub.sum() == 70 and torch.equal(sub, holdout_subset(100, 0.7, 0, 3))
    assert not torch.equal(sub, holdout_subset(100, 0.7, 0, 4))


def test_spearman():
    a = np.arange(20.0)
    assert spearman(a, a ** 3) == pytest.approx(1)
    assert spearman(a, -a) == pytest.approx(-1)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1)  # ties averaged
    assert np.isnan(spearman(a, np.ones(20)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    rho, lo, hi = spearman_ci(x, x + rng.normal(size=200), "t")
    assert lo < rho < hi and lo > 0.4 and hi < 0.95


def planted(tmp_path):
    """A tiny 3-class dataset of 10x10 images (class prototype + noise) with planted outliers (an image
    of its own, unlike any other, once each, with a random label) and planted duplicates (one more such
    image, six identical copies with one label): a copy seen in training teaches the held-out one."""
    rng = np.random.default_rng(0)
    protos = rng.uniform(0, 255, size=(3, 10, 10))
    x, y, tag = [], [], []
    for i in range(240):
        x.append(protos[i % 3] + rng.normal(0, 25, (10, 10)))
        y.append(i % 3)
        tag.append("typical")
    for i in range(12):
        x.append(rng.uniform(0, 255, size=(10, 10)))
        y.append(i % 3)
        tag.append("outlier")
    dup = rng.uniform(0, 255, size=(10, 10))
    for _ in range(6):
        x.append(dup)
        y.append(1)
        tag.append("duplicate")
    x = np.clip(np.array(x), 0, 255).astype(np.uint8)
    path = tmp_path / "planted.npz"
    np.savez(path, x_train=x, y_train=np.array(y), x_test=x[:30], y_test=np.array(y[:30]))
    return path, np.array(tag)


def test_planted_outliers_score_low_and_duplicates_high(tmp_path, capsys):
    path, tag = planted(tmp_path)
    argv = [f"--dataset=npz:{path}", "--model=cnn", "--width=0.25", "--epochs=4", "--batch_size=32", "--lr=0.05",
            "--device=cpu", f"--runs_dir={tmp_path / 'runs'}", "--k_models=8", "--subset_fraction=0.5",
            "--noise=0.0", "--proxies=False"]
    assert memorization_scores.main(argv + ["--budget_s=0.001"]) is None  # stops after one model: resumable
    assert len(list((tmp_path / "runs" / "holdout").glob("*/model_*.pt"))) == 1
    memorization_scores.main(argv)
    s = load_scores(f"npz:{path}")
    assert s["meta"]["k_models"] == 8 and np.array_equal(s["labels"], np.load(path)["y_train"])
    score = s["score"]
    assert np.nanmean(score[tag == "outlier"]) < 0.5, score[tag == "outlier"]  # chance: 1/3
    assert np.nanmean(score[tag == "typical"]) > 0.9
    assert np.nanmean(score[tag == "duplicate"]) > 0.5  # a copy in the training subset teaches the held-out one
    assert np.array_equal(np.isnan(score), s["n_held"] == 0) and np.nanmax(s["se"]) <= 0.5 + 1e-6
    # published scores (here: the estimate, reversed for the outliers) are compared with the estimate and used
    pub = tmp_path / "pub.npz"
    np.savez(pub, scores=np.where(tag == "outlier", 1.0, np.nan_to_num(score, nan=0.5)), labels=s["labels"])
    out = memorization_scores.main(argv + [f"--published={pub}"])  # the models are saved: nothing trains
    assert -1 <= out["published"]["lo"] <= out["published"]["spearman"] <= out["published"]["hi"] <= 1
    assert load_scores(f"npz:{path}")["meta"]["source"].startswith("published")
    assert load_scores(f"npz:{path}")["score"][tag == "outlier"].min() == 1.0


def test_proxies_agree_and_examples_csv(tmp_path, tiny_npz, capsys):
    """On the tiny run: the proxies are computed, printed with CIs, and examples.csv has one row per example."""
    import shutil
    npz = tmp_path / "tiny.npz"
    shutil.copy(tiny_npz, npz)
    argv = [f"--dataset=npz:{npz}", "--model=cnn", "--width=0.5", "--epochs=6", "--batch_size=64",
            "--device=cpu", f"--runs_dir={tmp_path / 'runs'}", "--k_models=4", "--subset_fraction=0.5"]
    out = memorization_scores.main(argv)
    printed = capsys.readouterr().out
    assert "learning_speed" in printed and "forgetting" in printed and "first_learned" in printed
    a = out["agreement"]
    assert set(a) == {"learning_speed", "forgetting", "first_learned"}
    assert all(v["lo"] <= v["rho"] <= v["hi"] and v["n"] > 400 for v in a.values())
    assert a["learning_speed"]["rho"] > 0  # slowly learned digits are the low-scoring ones
    run_dir = next((tmp_path / "runs").glob("npz-tiny_cnn*"))
    with open(run_dir / "examples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 512 and [r["index"] for r in rows[:3]] == ["0", "1", "2"]
    assert {"true_label", "training_label", "kind", "holdout_score", "learning_speed", "forgetting"} <= set(rows[0])
    assert sum(r["kind"] == "mislabeled" for r in rows) == 51
    assert all((r["true_label"] != r["training_label"]) == (r["kind"] == "mislabeled") for r in rows)
    assert all(r["kind"] != "atypical" or float(r["holdout_score"]) < 0.5 for r in rows)
    assert all(r["kind"] != "atypical" for r in rows if r["holdout_score"] == "")  # never held out: no score


def test_published_scores_checked_by_labels(tmp_path):
    labels = np.array([0, 1, 2, 1])
    good, bad, wrong = tmp_path / "good.npz", tmp_path / "bad.npz", tmp_path / "wrong.npz"
    np.savez(good, scores=np.array([0.9, 0.1, 0.5, 0.7]), labels=labels)
    np.savez(bad, scores=np.zeros(4), labels=labels[::-1])
    np.savez(wrong, something=np.zeros(4))
    assert load_published(good, labels).tolist() == [0.9, 0.1, 0.5, 0.7]
    with pytest.raises(UserError, match="do not match"):
        load_published(bad, labels)
    with pytest.raises(UserError, match="no arrays 'scores' and 'labels'"):
        load_published(wrong, labels)


def _with_scores(tmp_path, score):
    """An npz dataset (64 digits of mnist_5k, no test split) and a scores file for its pool."""
    from common.data import load_arrays
    x, y, _, _ = load_arrays("mnist_5k", 0)
    path = tmp_path / "d.npz"
    x, y = x[::62][:64], y[::62][:64]  # every class
    np.savez(path, x_train=x[:, 0].numpy(), y_train=y.numpy())
    write_scores(scores_path(f"npz:{path}"), score, np.zeros(64), np.ones(64), y.numpy(), {"source": "test"})
    return f"npz:{path}", y


def test_memorized_kinds(tmp_path):
    score = np.linspace(0, 1, 64)
    name, y_pool = _with_scores(tmp_path, score)
    base = {**TINY, "dataset": name}
    noisy = load_data(SimpleNamespace(**{**base, "memorized": "noisy"}))
    assert noisy.memorized == "noisy" and torch.equal(noisy.noisy, noisy.mislabeled)
    both = load_data(SimpleNamespace(**{**base, "memorized": "both"}))
    pos = pool_positions(name, 0, y_pool)
    atyp = torch.from_numpy(score[pos.numpy()] < 0.5) & ~both.mislabeled
    assert torch.equal(both.kind == KINDS.index("atypical"), atyp)
    assert torch.equal(both.noisy, both.mislabeled | atyp) and atyp.any() and both.mislabeled.any()
    atypical = load_data(SimpleNamespace(**{**base, "noise": 0.0, "memorized": "atypical"}))
    assert not atypical.mislabeled.any() and torch.equal(atypical.noisy, torch.from_numpy(score[pos.numpy()] < 0.5))
    acc = split_accuracy(both.y_train.clone(), both.y_test.clone(), both)
    assert {"typical", "mislabeled", "atypical"} <= set(acc) and acc["atypical"] == 1.0
    sub = both.subset(20, 5)
    assert sub.memorized == "both" and torch.equal(sub.noisy, sub.kind > 0)


def test_memorized_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from test_bad_input import refuse
    import gradient_accounting
    line = refuse(monkeypatch, capsys, gradient_accounting, ["--memorized=atypical", f"--runs_dir={tmp_path}"])
    assert "--noise=0" in line
    line = refuse(monkeypatch, capsys, gradient_accounting, ["--memorized=rare", f"--runs_dir={tmp_path}"])
    assert "valid: noisy, atypical, both" in line
    x = np.zeros((40, 8, 8), dtype=np.uint8)
    path = tmp_path / "noscores.npz"
    np.savez(path, x_train=x, y_train=np.arange(40) % 2)
    line = refuse(monkeypatch, capsys, gradient_accounting, [f"--dataset=npz:{path}", "--memorized=both",
                                                             f"--runs_dir={tmp_path}"])
    assert "python memorization_scores.py --dataset=npz:" in line
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("npz-*"))
    line = refuse(monkeypatch, capsys, memorization_scores, ["--k_models=0", f"--runs_dir={tmp_path}"])
    assert "--k_models" in line


def _flip_run(seed, atypical_mean):
    rng = np.random.default_rng(seed)
    recs = []
    for kind, mean in (("noisy", 2), ("atypical", atypical_mean), ("clean", 8)):
        for _ in range(20):
            n = int(rng.poisson(mean)) + 1
            recs.append({"kind": kind, "n_units": n, "flipped": True, "units": [{"group": "g"}] * n,
                         "accuracy_drop": {"test": 0.01}})
    return {"settings": {"max_units": 100, "unit": "channel"}, "records": recs}


@pytest.mark.parametrize("atypical_mean, verdict", [(2, "yes"), (5, "partial"), (8, "inconclusive"), (14, "no")])
def test_atypical_claim_rule(atypical_mean, verdict):
    from common import claims
    c = claims.atypical([_flip_run(0, atypical_mean), _flip_run(1, atypical_mean)])
    assert c.verdict == verdict, c.line()
    assert c.number == claims.ATYPICAL and "P(atypical < typical)" in c.statistic


def test_atypical_claim_control_and_missing_kind():
    from common import claims
    run = _flip_run(0, 2)
    for r in run["records"]:
        if r["kind"] == "clean":
            r["n_units"] = 2  # typical as easy as mislabeled: the control fails
    assert claims.atypical([run]).verdict == "inconclusive" and "control" in claims.atypical([run]).reason
    run["records"] = [r for r in run["records"] if r["kind"] != "atypical"]
    assert claims.atypical([run]).verdict == "inconclusive"


def test_examples_columns_documented():
    from common.memorization import EXAMPLE_COLUMNS
    from conftest import REPO
    doc = (REPO / "docs" / "experiments" / "atypical.md").read_text()
    table = [line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")]
    assert [c for c in table if c in EXAMPLE_COLUMNS] == list(EXAMPLE_COLUMNS)


def _scored_tiny(tiny_npz, tmp_path, tiny_argv, epochs, memorized):
    """A copy of the tiny dataset with hold-out scores (every 8th example atypical), and the argv of a
    run of it with `memorized`."""
    import shutil
    npz = tmp_path / "tiny.npz"
    shutil.copy(tiny_npz, npz)
    y = np.load(npz)["y_train"]
    write_scores(scores_path(f"npz:{npz}"), np.where(np.arange(len(y)) % 8 == 0, 0.2, 0.9), np.zeros(len(y)),
                 np.ones(len(y)), y, {"source": "test"})
    return npz, [a for a in tiny_argv(epochs=epochs) if not a.startswith("--dataset")] + \
        [f"--dataset=npz:{npz}", f"--memorized={memorized}"]


@pytest.mark.parametrize("memorized", ["atypical", "both"])
def test_every_experiment_takes_memorized(memorized, tiny_argv, tiny_npz, tmp_path, capsys):
    """The five experiments on the tiny run with memorized = atypical / both (a scores file marking
    every 8th image atypical): they run, report the kinds, and examples.csv gathers their results."""
    import example_tied_dropout
    import gradient_accounting
    import layer_retraining
    import layer_rewinding
    import neuron_flipping
    from common import claims
    npz, argv = _scored_tiny(tiny_npz, tmp_path, tiny_argv, 8, memorized)
    argv += ["--noise=0.0"] if memorized == "atypical" else []
    acc = gradient_accounting.main(argv)
    atypical_clean = 64 if memorized == "atypical" else None  # with label noise: the clean ones of the 64
    assert acc["n_noisy"] == atypical_clean if atypical_clean else 51 < acc["n_noisy"] < 51 + 64
    rew = layer_rewinding.main(argv + ["--rewind_epochs=[0]", "--compare_bn_stats=[]"])
    assert "atypical" in json_text(rew) and "typical" in json_text(rew)
    ret = layer_retraining.main(argv + ["--retrain_epochs=1", "--control=False", "--retrain_groups=['head']"])
    assert "atypical" in json_text(ret)
    flip = neuron_flipping.main(argv + ["--n_examples=1", "--n_eot=0", "--ref_batch=15", "--collateral_n=20",
                                        "--n_show=1", "--max_units=20"])
    kinds = {r["kind"] for r in flip["records"]} - {"clean_matched"}
    assert kinds == ({"noisy", "atypical", "clean"} if memorized == "both" else {"noisy", "clean"})
    assert {r["example_kind"] for r in flip["records"] if r["kind"] == "noisy"} == \
        {"mislabeled" if memorized == "both" else "atypical"}
    if memorized == "both":
        assert claims.atypical([flip]).number == claims.ATYPICAL
    example_tied_dropout.main(argv + ["--etd_epochs=2", "--gallery_size=2"])
    run_dir = next((tmp_path / "runs").glob("*/neuron_flipping.json")).parent
    with open(run_dir / "examples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 512 and {"neuron_flipping_units", "etd_drop_correct", "holdout_score"} <= set(rows[0])
    assert sum(r["kind"] == "atypical" for r in rows) == sum(int(r["memorized"]) for r in rows
                                                              if r["kind"] != "mislabeled")
    assert sum(r["neuron_flipping_units"] != "" for r in rows) == len({r["index"] for r in flip["records"]})


def json_text(obj):
    import json
    return json.dumps(obj)


def test_examples_csv_gathers_each_experiments_results(tmp_path):
    """write_examples on a run directory holding flipping and ETD results (no training needed)."""
    from common.memorization import write_examples
    from common.runs import Run, write_json
    score = np.linspace(0, 1, 64)
    name, _ = _with_scores(tmp_path, score)
    cfg = SimpleNamespace(**{**TINY, "dataset": name, "memorized": "both", "runs_dir": str(tmp_path / "runs")})
    data = load_data(cfg)
    run = Run(cfg)
    run.dir.mkdir(parents=True)
    noisy = torch.nonzero(data.noisy).flatten().tolist()
    write_json(run.path("neuron_flipping.json"), {"records": [
        {"index": 3, "kind": "clean", "n_units": 4, "flipped": True, "units": [{"group": "conv1"}, {"group": "head"}]},
        {"index": noisy[0], "kind": "noisy", "n_units": 100, "flipped": False, "units": [{"group": "head"}]}]})
    write_json(run.path("example_tied_dropout.json"), {
        "per_example": {"noisy_index": noisy, "noisy_drop_correct": [1] + [0] * (len(noisy) - 1)},
        "etd": {"clean_forgotten": [5]}})
    write_json(run.path("neuron_flipping.partial.json"), {"records": []})  # an unfinished run is not read
    cols = write_examples(run, data)
    with open(run.path("examples.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == cols and len(rows) == data.n_train
    assert "neuron_flipping.partial_units" not in cols
    assert rows[3]["neuron_flipping_units"] == "4" and rows[3]["neuron_flipping_groups"] == "conv1;head"
    assert rows[noisy[0]]["neuron_flipping_flipped"] == "0" and rows[noisy[0]]["etd_drop_correct"] == "1"
    assert rows[noisy[1]]["etd_drop_correct"] == "0" and rows[noisy[1]]["etd_clean_forgotten"] == ""
    clean = [i for i in range(data.n_train) if not data.noisy[i]]
    assert rows[clean[0]]["etd_drop_correct"] == "" and rows[5]["etd_clean_forgotten"] in ("1", "")
    kinds = {r["kind"] for r in rows}
    assert kinds == {"mislabeled", "atypical", "typical"}
    assert all(float(r["holdout_score"]) < 0.5 for r in rows if r["kind"] == "atypical")


def test_committed_default_scores_and_their_readme():
    """The committed scores of the embedded default: one per image of mnist_5k, labels in its order, and
    data/README.md states the command that made them and their cost, as recorded in the file."""
    from conftest import REPO
    s = load_scores("mnist_5k")
    if s is None:
        pytest.skip("no committed scores for mnist_5k")
    with np.load(REPO / "data" / "mnist_5k.npz") as f:
        assert np.array_equal(s["labels"], f["y"].astype(np.int16))
    assert len(s["score"]) == 5000 and np.isfinite(s["score"]).all() and (s["n_held"] >= 2).all()
    readme = (REPO / "data" / "README.md").read_text()
    meta = s["meta"]
    assert meta["command"] in readme and f"{meta['train_seconds'] / 60:.1f} min" in readme
    assert f"{int((s['score'] < 0.5).sum())} of the 5,000" in readme
    n = s["n_held"]
    assert f"{n.min()} to {n.max()}, median {np.median(n):g}" in readme
    atypical_clean = int(((load_data(SimpleNamespace(**{**TINY, "model": "resnet9", "memorized": "both"})).kind
                           == KINDS.index("atypical")).sum()))
    assert f"{atypical_clean} of them are clean training examples of seed 0" in readme
    page = (REPO / "docs" / "experiments" / "atypical.md").read_text().replace("\n", " ")
    assert f"With {atypical_clean} atypical clean training examples in seed 0" in page


def test_judge_adds_the_atypical_claim_only_with_atypical_targets():
    from common import claims
    both = _flip_run(0, 2)
    for r in both["records"]:
        r["true_label"], r["prediction"], r["units"] = 0, 1, [{"group": "g"}]
        r["accuracy_drop"] = {"test": 0.0, "clean": 0.0, "noisy": 0.0}
    plain = {**both, "records": [r for r in both["records"] if r["kind"] != "atypical"]}
    assert [c.number for c in claims.judge("neuron_flipping", plain)] == [4]
    assert [c.number for c in claims.judge("neuron_flipping", both)] == [4, claims.ATYPICAL]


def test_judge_over_seeds_writes_the_claims_and_refuses_bad_files(tmp_path, monkeypatch, capsys):
    import json
    from common import claims
    from test_bad_input import refuse
    files = []
    for seed in (0, 1):
        run = _flip_run(seed, 2)
        for r in run["records"]:
            r["true_label"], r["prediction"] = 0, 1
            r["accuracy_drop"] = {"test": 0.0, "clean": 0.0, "noisy": 0.0}
        run["config"] = {"seed": seed}
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "claims.json"
    judged = memorization_scores.main([f"--judge={[str(f) for f in files]}", f"--judge_out={out}"])
    saved = json.loads(out.read_text())
    assert [d["number"] for d in saved] == [4, claims.ATYPICAL] and saved[1]["verdict"] == judged[1].verdict == "yes"
    assert saved[1]["seeds"] == [0, 1] and saved[1]["values"]["seeds"] == 2
    assert judged[1].statistic == claims.atypical([json.loads(f.read_text()) for f in files]).statistic
    before = out.read_bytes()
    line = refuse(monkeypatch, capsys, memorization_scores, [f"--judge={[str(tmp_path / 'none.json')]}",
                                                             f"--judge_out={out}"])
    assert "not found" in line
    plain = json.loads(files[0].read_text())
    plain["records"] = [r for r in plain["records"] if r["kind"] != "atypical"]
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    line = refuse(monkeypatch, capsys, memorization_scores, [f"--judge={[str(tmp_path / 'plain.json')]}",
                                                             f"--judge_out={out}"])
    assert "memorized=both" in line
    line = refuse(monkeypatch, capsys, memorization_scores, [f"--judge={[str(files[0]), str(files[0])]}"])
    assert "repeat" in line
    assert out.read_bytes() == before  # nothing written by a refused call


def test_the_findings_numbers_come_from_the_committed_results():
    """docs/experiments/atypical.md's numbers are those of docs/results/atypical/ (the default run, seed 0)."""
    import json
    from common import claims
    from common.memorization import PROXIES
    from conftest import REPO
    res = REPO / "docs" / "results" / "atypical"
    page = (REPO / "docs" / "experiments" / "atypical.md").read_text()
    if (res / "memorization_scores.json").is_file():
        agreement = json.loads((res / "memorization_scores.json").read_text())["agreement"]
        for name in PROXIES:
            a = agreement[name]
            assert f"| {name} | {a['rho']:+.2f} | [{a['lo']:+.2f}, {a['hi']:+.2f}] |" in page, name
        assert "at least 90% of the digits score 1.0" in page.replace("\n", " ")
        assert (load_scores("mnist_5k")["score"] == 1).mean() >= 0.9
    # the claim-6 finding: claims.json is the judgement of the committed per-seed flipping results, and the
    # page shows its numbers
    seeds = sorted(res.glob("seed*/neuron_flipping.json"))
    assert seeds and (res / "claims.json").is_file()
    saved = json.loads((res / "claims.json").read_text())[-1]
    assert saved["files"] == [str(p.relative_to(REPO)) for p in seeds]
    c = claims.atypical([json.loads(p.read_text()) for p in seeds])
    assert (saved["verdict"], saved["statistic"], saved["ci"]) == (c.verdict, c.statistic, c.ci)
    assert f"Claim 6: **{c.verdict}**" in page
    for k, name in (("A", "A = P(atypical < typical)"), ("B", "B = P(atypical > mislabeled)"),
                    ("C", "control C = P(mislabeled < typical)")):
        lo, hi = c.values["intervals"][k]
        assert f"| {name} | {c.values['point'][k]:.2f} | [{lo:.2f}, {hi:.2f}] |" in page, k
    m, n = c.values["medians"], c.values["n"]
    assert (f"mislabeled {m['noisy']:g}, atypical {m['atypical']:g}, typical {m['clean']:g}\n(n = {n['noisy']}, "
            f"{n['atypical']}, {n['clean']})") in page


def test_both_shows_the_kinds_apart(tiny_argv, tiny_npz, tmp_path, capsys):
    """memorized=both (1 epoch): rewinding, retraining and ETD report the memorized set's two kinds apart
    in their results, printed tables and figures; each kind's accuracy and the lumped noisy one agree
    (noisy = the example-weighted mean of mislabeled and atypical); the other values show no split."""
    import example_tied_dropout
    import layer_retraining
    import layer_rewinding
    from common.evaluation import split_kinds
    npz, argv = _scored_tiny(tiny_npz, tmp_path, tiny_argv, 1, "both")
    data = load_data(SimpleNamespace(**{**TINY, "dataset": f"npz:{npz}", "memorized": "both"}))
    n_mis, n_atyp = int(data.mislabeled.sum()), int((data.kind == KINDS.index("atypical")).sum())
    assert split_kinds("both") == ("mislabeled", "atypical") and split_kinds("noisy") == split_kinds("atypical") == ()

    def lumped(acc):  # the memorized set's accuracy from its two kinds
        assert acc["noisy"] == pytest.approx((n_mis * acc["mislabeled"] + n_atyp * acc["atypical"]) / (n_mis + n_atyp))

    rew = layer_rewinding.main(argv + ["--rewind_epochs=[0]", "--compare_bn_stats=[]"])
    assert rew["subsets"][-2:] == ["mislabeled", "atypical"]
    lumped(rew["final"])
    for cells in rew["accuracy"].values():
        lumped(cells["0"])
    printed = capsys.readouterr().out
    assert "atypical accuracy (%) per rewind epoch" in printed and "mislabeled accuracy (%) per rewind epoch" in printed
    ret = layer_retraining.main(argv + ["--retrain_epochs=1", "--retrain_groups=['head']"])
    head = ret["groups"]["head"]
    for acc in (head["reset"], head["final"], head["control"]["final"]):
        lumped(acc)
    assert "by kind:" in capsys.readouterr().out
    etd = example_tied_dropout.main(argv + ["--etd_epochs=1", "--gallery_size=1", "--control_draws=1"])
    for r in etd["table"]:
        lumped(r)
    per = etd["per_example"]  # each memorized example's kind beside its drop-mode result (memorized=both)
    assert per["noisy_kind"] == [KINDS[int(data.kind[i])] for i in per["noisy_index"]]
    assert per["noisy_kind"].count("atypical") == n_atyp
    assert "by kind, still predicted with their training label after the drop" in capsys.readouterr().out
    run_dir = next((tmp_path / "runs").glob("*/layer_rewinding.json")).parent
    for name in ("layer_rewinding_depth", "layer_retraining_noisy", "layer_retraining_curves",
                 "example_tied_dropout_bars"):
        assert (run_dir / f"{name}.png").stat().st_size > 10_000
    # without the split (the default, or memorized=atypical: one kind) a row holds the columns of before
    assert set(example_tied_dropout.row("x", etd["table"][0])) == {"model", "mode", *example_tied_dropout.COLUMNS}


def test_the_kinds_tables_on_the_page_are_those_of_the_committed_reproductions(capsys):
    """docs/experiments/atypical.md shows `--kinds` of docs/results/atypical_{both,atypical}/seed0 verbatim;
    a directory without the five results is refused in one line (exit status 2)."""
    import subprocess
    import sys
    import memorization_scores
    from conftest import REPO
    page = (REPO / "docs" / "experiments" / "atypical.md").read_text()
    for m in ("both", "atypical"):
        table = memorization_scores.kinds_table(REPO / "docs" / "results" / f"atypical_{m}" / "seed0")
        assert table in page, m
    both = memorization_scores.kinds_table(REPO / "docs" / "results" / "atypical_both" / "seed0")
    flipping = next(line for line in both.splitlines() if line.startswith("| neuron flipping"))
    assert "n/a" not in flipping and flipping.count("(15)") == 3  # the three kinds are filled in
    r = subprocess.run([sys.executable, "memorization_scores.py", "--kinds=docs/results/default"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "has no gradient_accounting.json" in r.stderr
