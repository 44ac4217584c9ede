"""Neuron flipping: the fast exact path (common.flipping.Flipper) vs the authors' loop written plainly
(common.flipping.flip_sequential), on the default run's final model, at neuron_flipping.py's settings
(the authors': a batch of 1 + 511, 5 noised copies redrawn at every step).

Same targets as neuron_flipping.py (noisy and clean, seeded), same reference batches, same noise; each
target is searched by both, in alternating order, and the unit sequences must be identical.
Reported: seconds per target of each (the search only: the collateral evaluation, the same for both,
is left out), per kind and overall, their ratio, and how many steps the fast path settled with the
reference computation (near-ties of filter scores). --reference=False times the fast path alone.

    python bench/bench_neuron_flipping.py [--n_examples=3] [--ref_batch=511] [--n_eot=5] [--unit=channel]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import neuron_flipping  # noqa: E402
from common import config  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.evaluation import predict  # noqa: E402
from common.flipping import Flipper, Units, flip_sequential, pick_targets, reference_batch  # noqa: E402
from common.precision import strict_fp32  # noqa: E402
from common.training import trained_run  # noqa: E402

# The default run and neuron_flipping.py's defaults (one definition: the script's knobs).
KNOBS = {**neuron_flipping.KNOBS, "n_examples": 3,
         "reference": True,  # also run the plain loop (False: the fast path alone, for its cost per target)
         "threads": 0}       # torch intra-op threads (0: torch's default)


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
    flipper = Flipper(model, units)
    print(f"{run.dir.name}: {len(units)} {cfg.unit} units, batch 1 + {cfg.ref_batch}, {cfg.n_eot} noised copies, "
          f"max_units {cfg.max_units}, {len(targets)} targets, {torch.get_num_threads()} threads, device {data.device}")
    seconds = {"noisy": {"sequential": [], "fast": []}, "clean": {"sequential": [], "fast": []}}
    for k, (index, kind) in enumerate(targets):
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        x, y = data.batch(idx), data.labels(idx)
        args = (x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise, (cfg.seed, index))
        runs = [("sequential", lambda: flip_sequential(model, units, *args)), ("fast", lambda: flipper.flip(*args))]
        runs = runs if cfg.reference else runs[1:]
        out = {}
        for name, fn in (runs if k % 2 == 0 else runs[::-1]):  # alternate who goes first
            t = time.perf_counter()
            out[name] = fn()
            seconds[kind][name].append(time.perf_counter() - t)
        if cfg.reference and out["sequential"] != out["fast"]:
            raise UserError(f"target {index}: the fast path differs from the reference "
                            f"({out['fast'].units} vs {out['sequential'].units})")
        times = "  ".join(f"{name} {seconds[kind][name][-1]:6.1f} s" for name, _ in runs)
        print(f"  {kind} #{index}: {len(out['fast'].units)} units, flipped {out['fast'].flipped}  {times}"
              + ("  (identical)" if cfg.reference else ""))
    if cfg.reference:
        print(f"\nidentical unit sequences for all {len(targets)} targets", end="; ")
    print(f"steps settled by the reference computation: {flipper.exact_steps} of {flipper.steps}")
    seconds["all"] = {name: seconds["noisy"][name] + seconds["clean"][name] for name in ("sequential", "fast")}
    for kind, s in seconds.items():
        line = f"{kind:6s} fast {statistics.fmean(s['fast']):6.1f} s per target"
        if cfg.reference:
            line += (f"  sequential {statistics.fmean(s['sequential']):6.1f} s per target  "
                     f"speed-up x{sum(s['sequential']) / sum(s['fast']):.2f}")
        print(line)


if __name__ == "__main__":
    from common import cli
    cli.run(main)
