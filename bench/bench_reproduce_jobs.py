"""reproduce.py --jobs=1 (one process, torch's threads = the cores) against --jobs=2 (two processes,
the cores divided) for the same seeds: wall time of each and the ratio, side by side in one invocation.

Each arm is a fresh reproduction (its own temporary runs, results and reports directories) of the
given seeds at a reduced budget by default (ARGS below), so that both arms fit a few minutes; pass
--args=[] for the reproduction defaults (hours on 2 cores). Arms alternate over `repeats`.

    python bench/bench_reproduce_jobs.py [--seeds=[0,1]] [--repeats=1] [--args=[...]]
"""
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import cli, config  # noqa: E402

seeds = [0, 1]             # the seeds both arms reproduce
arms = [1, 2]              # the --jobs values compared (the first is the baseline of the ratio)
repeats = 1                # alternating repetitions of every arm (medians reported)
# the reduced budget (every arm; enough epochs that a noisy example is memorized); [] for the defaults
args = ["--epochs=5", "--n_examples=1", "--variant_seeds=0", "--retrain_epochs=1", "--etd_epochs=2",
        "--rewind_epochs=[0,1]", "--collateral_n=100"]
KNOBS = config.knobs(globals())


def run_arm(jobs, cfg, root):
    cmd = [sys.executable, str(REPO / "reproduce.py"), f"--seeds={cfg.seeds}", f"--jobs={jobs}", "--name=bench",
           "--device=cpu", f"--runs_dir={root / 'runs'}", f"--results_dir={root / 'res'}",
           f"--reports_dir={root / 'reports'}", *cfg.args]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise cli.UserError(f"jobs={jobs} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    return time.time() - t


def main(argv):
    cfg = config.parse(KNOBS, argv)
    walls = {j: [] for j in cfg.arms}
    for _ in range(cfg.repeats):
        for jobs in cfg.arms:
            with tempfile.TemporaryDirectory() as tmp:
                walls[jobs].append(run_arm(jobs, cfg, Path(tmp)))
                print(f"jobs={jobs}: {walls[jobs][-1]:.0f}s", flush=True)
    base = statistics.median(walls[cfg.arms[0]])
    print(f"\nseeds {cfg.seeds}, {' '.join(cfg.args) or 'reproduction defaults'}; median of {cfg.repeats}")
    print(f"{'jobs':>5} {'wall (s)':>9} {'ratio':>7}")
    for jobs in cfg.arms:
        m = statistics.median(walls[jobs])
        print(f"{jobs:>5} {m:9.0f} {m / base:7.2f}")


if __name__ == "__main__":
    cli.run(main)
