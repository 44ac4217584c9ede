"""sweep.py end to end on a tiny configuration: two values of a knob, one seed, the scale table."""
import json
import re

import pytest

import reproduce
import sweep
from common import claims
from common.claims import VERDICTS
from common.cli import UserError
from common.runs import read_json

# The tiny reproduction of tests/test_reproduce.py, without the variants (they cost time here).
TINY = ["--model=cnn", "--width=0.5", "--epochs=3", "--device=cpu", "--rewind_epochs=[0,1]", "--n_examples=2",
        "--max_units=5", "--ref_batch=15", "--n_eot=1", "--collateral_n=50", "--etd_epochs=2", "--gallery_size=2",
        "--variant_seeds=0"]


def _argv(tiny_npz, tmp_path, *extra):
    return ["--key=retrain_epochs", "--values=[1,2]", "--seeds=[0]", "--name=tiny",
            f"--reports_dir={tmp_path / 'reports'}", f"--results_dir={tmp_path / 'res'}",
            f"--table={tmp_path / 'docs' / 'SCALE.md'}",
            f"--dataset=npz:{tiny_npz}", f"--runs_dir={tmp_path / 'runs'}", *TINY, *extra]


def test_sweep_writes_scale_table_and_reuses_values(tiny_npz, tmp_path, capsys, monkeypatch):
    # a knob that does not identify the trained run: both values share it and write the same results
    # file, so each value's verdicts must come from its own report, and a second invocation must not
    # re-run value 1 although the run directory now holds value 2's retraining
    path = sweep.main(_argv(tiny_npz, tmp_path))
    text = path.read_text()
    reports = tmp_path / "reports"
    for v in (1, 2):
        assert (reports / f"tiny_retrain_epochs{v}" / "REPORT.md").is_file()
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1  # one trained run shared by both values
    assert read_json(run_dirs[0] / "layer_retraining.json")["config"]["retrain_epochs"] == 2

    # the verdicts table: a row per value (+ the GPU row, not run), a verdict per judged claim
    verdicts = text.split("## Verdicts")[1].split("\n## ")[0]
    rows = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in verdicts.splitlines()
            if r.startswith("| ") and not r.startswith("| configuration")]
    header = next(r for r in verdicts.splitlines() if r.startswith("| configuration"))
    claim_cols = [c.strip() for c in header.strip("| ").split(" | ")][2:]
    assert {int(re.match(r"claim (\d)", c).group(1)) for c in claim_cols} == {1, 2, 3, 4, 5}
    assert [r[0] for r in rows[:2]] == ["retrain_epochs = 1", "retrain_epochs = 2"]
    for r in rows[:2]:
        assert len(r) == 2 + len(claim_cols) and all(c in VERDICTS for c in r[2:])
    assert rows[2][0].startswith(sweep.GPU_ROW) and set(rows[2][2:]) == {"not run"}

    # the statistics table: a row per value and judged claim, the value's report's own numbers
    stats = text.split("## Statistics")[1].split("\n## ")[0]
    stat_rows = [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in stats.splitlines()
                 if r.startswith("| ") and not r.startswith("| retrain_epochs")]
    for v in (1, 2):
        judged = read_json(reports / f"tiny_retrain_epochs{v}" / "claims.json")
        mine = [r for r in stat_rows if r[0] == str(v)]
        assert len(mine) == len(judged) == len(claim_cols)
        assert [(r[2], r[5], r[7]) for r in mine] == [(str(c["number"]), c["statistic"], c["verdict"]) for c in judged]
        assert f"retrain_epochs = {v}" in (reports / f"tiny_retrain_epochs{v}" / "overrides.py").read_text()
    # one figure per claim, linked; the cost table has a row per value and the GPU row
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5 and all((path.parent / im).is_file() for im in images)
    cost = text.split("## Cost")[1]
    assert re.search(r"\| 1 \| 1 \| \d+ \| \d+ \| \d+ \|", cost) and re.search(r"\| 2 \| 1 \| \d+ \| \d+ \|", cost)
    assert "not run: `python reproduce.py configs/fashion_mnist_resnet9_paper.py`" in cost

    # a second invocation reuses both values without calling reproduce.py
    monkeypatch.setattr(reproduce, "main", lambda argv: pytest.fail("reproduce.py ran again"))
    capsys.readouterr()
    sweep.main(_argv(tiny_npz, tmp_path))
    assert capsys.readouterr().out.count("reusing") == 2


@pytest.mark.parametrize("extra, problem", [
    (["--key=runs_dir"], "not a knob whose value can change"),
    (["--key=no_such_knob"], "not a knob whose value can change"),
    (["--retrain_epochs=3"], "given beside --key"),
    (["--values=[1,1]"], "distinct values"),
    (["--n_seeds=[1]"], "one count per value"),
    (["--n_seeds=[1,2]"], "one count per value"),  # more than len(seeds)
    (["--seeds=[]"], "non-empty list"),
    (["--values=[1,-1]"], "retrain_epochs"),  # a bad value is refused before any value runs
])
def test_sweep_refuses_bad_input_before_any_work(tiny_npz, tmp_path, extra, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        sweep.main(_argv(tiny_npz, tmp_path, *extra))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def _judged(claim):
    """A Claim as the sweep reads it: an entry of a report's claims.json."""
    return json.loads(json.dumps(claim.as_dict()))


def _flips(counts):
    """A neuron_flipping.json with the given units to flip per kind ({kind: [units, ...]})."""
    return {"settings": {"unit": "channel", "max_units": 100},
            "records": [{"kind": kind, "n_units": n, "flipped": True, "units": [{"group": "g"}] * n,
                         "accuracy_drop": {"test": 0.0}} for kind, ns in counts.items() for n in ns]}


def _retrained(pairs):
    """A layer_retraining.json: {group: (noisy after the reset, after clean-only retraining)}."""
    return {"final_model": {"noisy": 1.0}, "frozen_bn": "train", "groups": {
        g: {"reset": {"noisy": r}, "final": {"noisy": f}, "control": {"final": {"noisy": 1.0}}}
        for g, (r, f) in pairs.items()}}


def test_headline_is_the_statistic_the_claims_module_judges(tmp_path):
    # claim 4: the rule's ratio of mean units against the clean and the margin-matched targets, the
    # weaker of the two (here the margin-matched), with its CI; not the previous rule's ratio of medians
    noisy = [1, 2, 3, 4, 5] * 4
    c = claims.flipping(_flips({"noisy": noisy, "clean": [40, 50, 60] * 6, "clean_matched": [4, 6, 8, 10] * 5}))
    weaker = c.values["matched"]
    assert weaker["mean_ratio_ci"][0] < c.values["clean"]["mean_ratio_ci"][0]
    assert sweep.headline(_judged(c)) == pytest.approx((weaker["mean_ratio"], *weaker["mean_ratio_ci"]))
    assert sweep.headline(_judged(c))[0] != pytest.approx(c.values["ratio"])  # the ratio of medians differs
    assert [t for t, _ in sweep.HEADLINE[4][1]] == [claims.MEAN_RATIO]
    # without margin-matched targets: the clean comparison alone
    c = claims.flipping(_flips({"noisy": noisy, "clean": [40, 50, 60] * 6}))
    assert sweep.headline(_judged(c)) == pytest.approx((c.values["clean"]["mean_ratio"],
                                                        *c.values["clean"]["mean_ratio_ci"]))

    # claim 3: back / (back + not back), the uninformative group (the reset left it memorized) aside
    seeds = [_retrained({"a": (0.1, 0.9), "b": (0.8, 0.8), "c": (0.1, 0.1), "d": (0.1, 0.8)}),
             _retrained({"a": (0.2, 0.7), "b": (0.9, 0.9), "c": (0.2, 0.2), "d": (0.2, 0.2)})]
    c = claims.retraining(seeds)[0]
    assert c.values["counts"]["uninformative"] == 1
    value, lo, hi = sweep.headline(_judged(c))
    assert value == c.values["share"] == pytest.approx(2 / 3) and (lo, hi) == pytest.approx(c.values["share_ci"])
    assert "back / (back + not back)" in sweep.HEADLINE[3][0] and "kept" not in sweep.HEADLINE[3][0]
    assert [t for t, _ in sweep.HEADLINE[3][1]] == [0.5, claims.PARTIAL_SHARE]

    # both figures draw from these numbers (plots.STRICT: no text outside the canvas)
    cfg = type("Cfg", (), {"key": "width", "values": [0.25, 1.0]})
    for number, judged in ((3, [_judged(c)] * 2), (4, [_judged(claims.flipping(_flips(
            {"noisy": noisy, "clean": [9, 10] * 10, "clean_matched": [8, 9] * 10})))] * 2)):
        per_value = [[j] for j in judged]
        path = sweep.claim_figure(number, sweep.columns(per_value), per_value, cfg, "test", [[0], [0, 1]],
                                  tmp_path / f"claim{number}.png")
        assert path.is_file()
