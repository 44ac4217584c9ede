"""Neuron flipping: the fast exact path (common.flipping.Flipper) vs the authors' loop written plainly
(common.flipping.flip_sequential), on the default run's final model.

Same targets as neuron_flipping.py (noisy and clean, seeded), same reference batches, same settings;
each target is searched by both, in alternating order, and the unit sequences must be identical.
Reported: examples per second of each and their ratio (the search only: collateral evaluation, the
same for both, is left out), per kind and overall, and how many steps the fast path had to settle
with the reference computation (near-ties of filter scores).

    python bench/bench_neuron_flipping.py [--n_examples=6] [--ref_batch=31] [--unit=channel] [--threads=0]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.evaluation import predict  # noqa: E402
from common.flipping import Flipper, Units, flip_sequential, pick_targets, reference_batch  # noqa: E402
from common.rng import generator  # noqa: E402
from common.training import trained_run  # noqa: E402

# The default run (the shared keys at the scripts' defaults) and neuron_flipping.py's defaults.
KNOBS = dict(dataset="mnist_5k", model="resnet9", width=0.25, noise=0.1, seed=0, model_seed=0, epochs=20,
             batch_size=128, lr=0.05, schedule="triangle", warmup=0.25, momentum=0.9, weight_decay=5e-4,
             augment=False, amp=True, device="cpu", runs_dir="runs", download=True, overwrite=False,
             n_examples=6, ref_batch=31, unit="channel", max_units=100, n_eot=0, eot_noise=0.01,
             threads=0)  # threads: torch intra-op threads (0: torch's default)


def main(argv):
    cfg = config.parse(KNOBS, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, data, run = trained_run(cfg)
    model.eval()
    units = Units(model, cfg.unit)
    targets = pick_targets(data, predict(model, data, "train") == data.y_train, cfg.n_examples, cfg.seed)
    flipper = Flipper(model, units)
    print(f"{run.dir.name}: {len(units)} {cfg.unit} units, batch 1 + {cfg.ref_batch}, max_units {cfg.max_units}, "
          f"n_eot {cfg.n_eot}, {len(targets)} targets, {torch.get_num_threads()} threads, device {data.device}")
    times = {"noisy": [0.0, 0.0], "clean": [0.0, 0.0]}
    counts = {"noisy": [], "clean": []}
    for k, (index, kind) in enumerate(targets):
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        x, y = data.batch(idx), data.labels(idx)
        args = (x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise)
        runs = [("sequential", lambda: flip_sequential(model, units, *args, generator(cfg.seed, "eot", index))),
                ("fast", lambda: flipper.flip(*args, generator(cfg.seed, "eot", index)))]
        out = {}
        for name, fn in (runs if k % 2 == 0 else runs[::-1]):  # alternate who goes first
            t = time.perf_counter()
            out[name] = fn()
            times[kind][name == "fast"] += time.perf_counter() - t
        if out["sequential"] != out["fast"]:
            raise UserError(f"target {index}: the fast path differs from the reference "
                            f"({out['fast'].units} vs {out['sequential'].units})")
        counts[kind].append(len(out["fast"].units))
        print(f"  {kind} #{index}: {len(out['fast'].units)} units, flipped {out['fast'].flipped}  (identical)")
    print(f"\nidentical unit sequences for all {len(targets)} targets; steps settled by the reference "
          f"computation: {flipper.exact_steps} of {flipper.steps}")
    times["all"] = [sum(v[0] for v in times.values()), sum(v[1] for v in times.values())]
    counts["all"] = counts["noisy"] + counts["clean"]
    for kind, (seq, fast) in times.items():
        n = len(counts[kind])
        print(f"{kind:6s} sequential {n / seq:6.2f} ex/s  fast {n / fast:6.2f} ex/s  speed-up x{seq / fast:.2f}"
              f"  (units zeroed: {sum(counts[kind])})")


if __name__ == "__main__":
    from common import cli
    cli.run(main)
