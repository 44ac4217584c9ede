"""make reproduce, end to end on a tiny configuration: all five experiments, one seed, the report."""
import re

import reproduce
from common.runs import read_json


def test_pipeline_writes_report_from_results(tiny_npz, tmp_path, capsys):
    argv = ["--seeds=[0]", "--name=smoke", f"--reports_dir={tmp_path / 'reports'}",
            f"--dataset=npz:{tiny_npz}", "--model=cnn", "--width=0.5", "--epochs=3", "--device=cpu",
            f"--runs_dir={tmp_path / 'runs'}", "--rewind_epochs=[0,1]", "--retrain_epochs=1",
            "--n_examples=2", "--max_units=5", "--collateral_n=50", "--etd_epochs=2", "--gallery_size=2"]
    path = reproduce.main(argv)
    text = path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5 and all((path.parent / im).is_file() for im in images)
    run_dir = tmp_path / "runs" / next(p.name for p in (tmp_path / "runs").iterdir())
    for exp in reproduce.EXPERIMENTS:
        assert (run_dir / f"{exp}.json").is_file(), exp
    # the claims table: five rows, each with a measured value and a verdict
    claims = text.split("## Paper claims")[1].split("##")[0]
    rows = [r for r in claims.splitlines() if r.startswith("| ") and "claim" not in r]
    assert len(rows) == 5 and all(r.rstrip().endswith(("| yes |", "| **no** |")) for r in rows)
    # a number in the claims table comes from the JSON: the ETD drop-mode noisy accuracy
    etd = read_json(run_dir / "example_tied_dropout.json")
    assert f"{100 * etd['etd']['modes']['drop']['noisy']:.1f}% (drop)" in claims
    timings = read_json(path.parent / "timings.json")
    assert set(timings) == {f"{e}/seed0" for e in reproduce.EXPERIMENTS}

    # a second invocation reuses every result and only rebuilds the report
    mtimes = {e: (run_dir / f"{e}.json").stat().st_mtime_ns for e in reproduce.EXPERIMENTS}
    capsys.readouterr()
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == 5
    assert mtimes == {e: (run_dir / f"{e}.json").stat().st_mtime_ns for e in reproduce.EXPERIMENTS}
