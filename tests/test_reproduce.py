"""make reproduce, end to end on a tiny configuration: all five experiments, one seed, the report."""
import re

import reproduce
from common.runs import read_json


def test_pipeline_writes_report_from_results(tiny_npz, tmp_path, capsys):
    argv = ["--seeds=[0]", "--name=smoke", f"--reports_dir={tmp_path / 'reports'}",
            f"--dataset=npz:{tiny_npz}", "--model=cnn", "--width=0.5", "--epochs=3", "--device=cpu",
            f"--runs_dir={tmp_path / 'runs'}", "--rewind_epochs=[0,1]", "--retrain_epochs=1",
            "--n_examples=2", "--max_units=5", "--ref_batch=15", "--n_eot=1", "--collateral_n=50",
            "--etd_epochs=2", "--gallery_size=2"]
    path = reproduce.main(argv)
    text = path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5 and all((path.parent / im).is_file() for im in images)
    run_dir = tmp_path / "runs" / next(p.name for p in (tmp_path / "runs").iterdir())
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
    assert [c.strip() for c in header.strip("| ").split(" | ")] == ["#", "variant", "verdict", "statistic", "95% CI",
                                                                     "why"]
    # BN modes, ablation, flip variants, drop scalings
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
    timings = read_json(path.parent / "timings.json")
    n_runs = 4 + len(reproduce.VARIANTS)  # the retraining ablation replaces seed 0's default retraining
    assert len(timings) == n_runs and all(k.endswith("/seed0") for k in timings)

    # a second invocation reuses every result and only rebuilds the report
    files = [p for p in run_dir.glob("*.json")]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == n_runs
    assert path.read_text().count("reused (took") == n_runs  # the wall-time table marks the reused jobs
    assert mtimes == {p: p.stat().st_mtime_ns for p in files}
