"""Localization methods: the cost of one ranking per method, relative to one-shot w * dL/dw, side by side
in one process on the default run's final model (localization_methods.py's knobs and targets).

Each target's batch is ranked by every method in a rotating order (so no method always runs first on
a warm cache or a quiet machine); reported per method: seconds per target (median and mean) and the
median over targets of its time over one-shot's on the same target, and its forward-equivalents
(example-forwards + 2 x example-backwards, counted). Only the ranking is timed (not the zeroing that
judges it). The learned masks run at their default penalties (no development tuning).

    python bench/bench_localization_methods.py [--n_examples=3] [--threads=0] [--key=value ...]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import localization_methods  # noqa: E402
from common import config  # noqa: E402
from common.evaluation import predict  # noqa: E402
from common.flipping import Units, pick_targets  # noqa: E402
from common.localization import LABELS, MASKS, Localizer  # noqa: E402
from common.precision import strict_fp32  # noqa: E402
from common.training import trained_run  # noqa: E402

# localization_methods.py's knobs; fewer targets; threads: torch intra-op threads (0: torch's default)
KNOBS = {**localization_methods.KNOBS, "n_examples": 3, "device": "cpu", "threads": 0}


def main(argv):
    cfg = config.parse(KNOBS, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, data, run = trained_run(cfg)
    model.eval()
    units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
    with strict_fp32():
        fits = predict(model, data, "train", amp=False) == data.y_train
    targets = pick_targets(data, fits, cfg.n_examples, cfg.seed)
    penalties = {m: getattr(cfg, localization_methods.PENALTY[m]) for m in MASKS}  # the defaults (no dev tuning)
    localizer = Localizer(model, units, cfg.seed, penalties=penalties,
                          **{k: getattr(cfg, k) for k in localization_methods.OPTIONS})
    methods = list(cfg.methods)
    print(f"{run.dir.name}: {len(units)} {cfg.unit} units, batch 1 + {cfg.ref_batch}, top {cfg.max_k}, "
          f"{len(targets)} targets, {torch.get_num_threads()} threads, device {data.device}")
    seconds, passes = {m: [] for m in methods}, {m: [] for m in methods}
    for k, (index, kind) in enumerate(targets):
        idx, x, y = localization_methods.target_batch(data, index, cfg)
        for m in methods[k % len(methods):] + methods[:k % len(methods)]:  # rotate who goes first
            t = time.perf_counter()
            facts = localizer.rank(m, x, y, index)[1]
            seconds[m].append(time.perf_counter() - t)
            p = facts["passes"]
            passes[m].append(p["forward_examples"] + 2 * p["backward_examples"])
        print(f"  {kind} #{index}: " + "  ".join(f"{m} {seconds[m][-1]:.3f}s" for m in methods))
    # per target, each method's time over one-shot's on the same target (measured moments apart), then
    # the median over targets: robust to the machine's load changing during the run
    ratios = {m: [t / o for t, o in zip(seconds[m], seconds["oneshot"])] for m in methods} if "oneshot" in seconds else {}
    print(f"\n{'method':<32} {'median s/target':>16} {'mean s/target':>14} {'x one-shot (median)':>20} "
          f"{'forward-equivalents':>20}")
    for m in methods:
        ratio = f"{statistics.median(ratios[m]):>20.2f}" if ratios else f"{'n/a':>20}"
        print(f"{LABELS[m]:<32} {statistics.median(seconds[m]):>16.4f} {statistics.fmean(seconds[m]):>14.4f} {ratio} "
              f"{statistics.fmean(passes[m]):>20.0f}")

if __name__ == "__main__":
    from common import cli
    cli.run(main)
