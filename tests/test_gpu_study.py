"""bench/gpu_study.py: the GPU scale study's plan, its budget cut-off and SCALE.md, in smoke mode on a CPU."""
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_study  # noqa: E402

import reproduce  # noqa: E402
from common.claims import VERDICTS  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.runs import read_json, write_json  # noqa: E402


def _rows(text, section, first):
    part = text.split(f"## {section}")[1].split("\n## ")[0]
    return [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in part.splitlines()
            if r.startswith("| ") and not r.startswith(f"| {first} |")]


def test_smoke_budget_cut_leaves_whole_seeds_and_scale_table(tmp_path, one_thread):
    # budget 0: the first unit (stage 1, one seed) runs, no other unit starts
    path = gpu_study.main(["--smoke=True", f"--smoke_dir={tmp_path}", "--budget_s=0"])
    out = tmp_path / "results"
    assert path == out / "SCALE.md"
    names = ["fashion_paper", "default_w0.125", "default_w0.5", "default"]  # the plan's settings, in priority order
    units = read_json(out / "study.json")["units"]
    assert [u["setting"] for u in units] == names
    assert [u["status"] for u in units] == ["done"] + ["not started: budget"] * 3
    # the finished seed is whole: every experiment stored with its provenance; nothing of the others
    seed_dir = out / "fashion_paper" / "seed0"
    prov = read_json(seed_dir / "provenance.json")
    assert {e["experiment"] for e in prov.values()} == set(reproduce.EXPERIMENTS)
    assert all((seed_dir / f).is_file() for f in prov)
    assert reproduce.stored_seeds(out / "fashion_paper") == [0]
    assert not any((out / n).exists() for n in names[1:])

    # SCALE.md: the verdicts of the setting that ran (one column per judged claim and variant), "not run" rows
    text = path.read_text()
    judged = read_json(out / "fashion_paper" / "claims.json")
    header = next(r for r in text.split("## Verdicts")[1].splitlines() if r.startswith("| setting |"))
    cols = [c.strip() for c in header.strip("| ").split(" | ")][2:]
    assert {int(re.match(r"claim (\d)", c).group(1)) for c in cols} == {1, 2, 3, 4, 5} and len(cols) == len(judged)
    verdicts = _rows(text, "Verdicts", "setting")
    assert [r[0] for r in verdicts] == names
    assert verdicts[0][1] == "1" and all(v in VERDICTS for v in verdicts[0][2:]) and len(verdicts[0]) == 2 + len(cols)
    assert all(set(r[1:]) == {"not run"} for r in verdicts[1:])
    # the statistics: one row per judged claim and variant, the report's own statistic and verdict
    stats = _rows(text, "Statistics", "setting")
    assert [(r[0], r[2], r[5], r[7]) for r in stats] == [("fashion_paper", str(c["number"]), c["statistic"], c["verdict"])
                                                         for c in judged]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5 and all((out / im).is_file() for im in images)
    plan = _rows(text, "Plan", "stage")
    assert [r[3] for r in plan] == ["done"] + ["not started: budget"] * 3

    assert "## Incomplete seeds\n\n" in text and text.split("## Incomplete seeds")[1].split("\n## ")[0].strip() \
        .endswith("None.")

    # a unit killed from outside is "cut off" when SCALE.md is rewritten from what is stored, and its
    # incomplete seed (here: seed 0's files as seed 7, without example-tied dropout) shows what it has,
    # each experiment judged alone: the same claims as the complete seed's report
    state = read_json(out / "study.json")
    state["units"][1]["status"] = "running"
    write_json(out / "study.json", state)
    shutil.copytree(seed_dir, out / "fashion_paper" / "seed7")
    write_json(out / "fashion_paper" / "seed7" / "provenance.json",
               {f: e for f, e in prov.items() if e["experiment"] != "example_tied_dropout"})
    gpu_study.main(["--smoke=True", f"--smoke_dir={tmp_path}", "--report_only=True"])
    text = (out / "SCALE.md").read_text()
    assert [r[3] for r in _rows(text, "Plan", "stage")] == ["done", "cut off"] + ["not started: budget"] * 2
    partial = _rows(text, "Incomplete seeds", "setting")
    assert [(r[0], r[1], r[3], r[5], r[7]) for r in partial] == [
        ("fashion_paper", "7", str(c["number"]), c["statistic"], c["verdict"]) for c in judged if c["number"] != 5]
    assert _rows(text, "Verdicts", "setting")[0][1] == "1"  # the report's seeds: the complete one only


@pytest.mark.parametrize("argv, message", [
    (["--stages=[4]"], "give a non-empty list of 1, 2, 3"),
    (["--seeds=[0]"], "--seeds is set by the study"),
    (["--no_such_knob=1"], "unknown key --no_such_knob"),
    (["--chunk=0"], "chunk=0: give at least 1"),
    (["--seeds_width=[]"], "seeds_width=[]: give a non-empty list"),
    (["--budget_s=-1"], "budget_s=-1"),
])
def test_bad_input_refused_before_any_work(tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(gpu_study.reproduce, "main", lambda argv: pytest.fail("a reproduction started"))
    with pytest.raises(UserError, match=re.escape(message)):
        gpu_study.main([f"--out={tmp_path / 'out'}", "--stages=[2]", *argv])
    assert not (tmp_path / "out").exists()


def test_stage_1_without_fashion_mnist_says_what_to_carry(tmp_path, monkeypatch):
    def missing(name, **kwargs):
        raise UserError(f"dataset {name} not found")
    monkeypatch.setattr(gpu_study.data, "load_arrays", missing)
    monkeypatch.setattr(gpu_study.reproduce, "main", lambda argv: pytest.fail("a reproduction started"))
    with pytest.raises(UserError, match=re.escape("carry data/fashion-mnist")):
        gpu_study.main([f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
