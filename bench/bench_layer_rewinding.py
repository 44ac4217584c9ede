"""Layer rewinding sweep: prefix reuse vs one full forward per (group, epoch) vs the authors' reload-per-rewind.

The first three evaluate the same (group, epoch) pairs of the default run and must give identical accuracies.
- sweep:   common.rewinding.rewind_sweep: one model, the group's tensors swapped in place; per batch the
           layers before the group run once, the rest once per rewind epoch (what layer_rewinding.py does).
- forward: the same in-place swap, then common.evaluation.accuracies (a full forward per pair).
- reload:  per pair, a fresh model gets the final checkpoint and the group's tensors from the rewind
           checkpoint, both read from disk again (the authors' way, minus their GPU-only paths), then accuracies.
The first three rewind parameters only, as the authors and layer_rewinding.py's primary mode (rewind_bn_stats=final).
A fourth arm, recompute, is the sweep with the statistics re-estimated: the second mode layer_rewinding.py
computes by default (compare_bn_stats), and what re-estimating them costs.
Timed alternately in one process; medians reported as ratios (the default run must exist: `make train`).

    python bench/bench_layer_rewinding.py [--repeats=1] [--rewind_epochs=[0,10]]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.evaluation import accuracies  # noqa: E402
from common.models import model_for  # noqa: E402
from common.rewinding import Rewinder, load_rewind_states, rewind_keys, rewind_sweep  # noqa: E402
from common.runs import Run  # noqa: E402
from common.training import trained_run  # noqa: E402
import layer_rewinding  # noqa: E402  (the shared knob block)

# The shared keys at the scripts' defaults (the default run), plus this benchmark's own.
KNOBS = {**layer_rewinding.RUN_KNOBS, "device": "cpu", "download": False, "repeats": 1, "rewind_epochs": [0, 10]}


def main(argv):
    cfg = config.parse(KNOBS, argv)
    if not Run(cfg).is_complete():
        from common.cli import UserError
        raise UserError(f"the default run {Run(cfg).dir} is not trained yet; run `make train` first")
    model, data, run = trained_run(cfg, quiet=True)
    keys, epochs = rewind_keys(model, "final"), cfg.rewind_epochs
    rewinder = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    # recompute mode rewinds the BatchNorm buffers too and overwrites their stored statistics: a rewinder of its own
    rkeys = rewind_keys(model, "recompute")
    recomputer = Rewinder(model, load_rewind_states(run, epochs, rkeys, model, data.device), rkeys)

    def sweep():
        return rewind_sweep(model, data, rewinder, epochs, amp=cfg.amp)

    def forward():
        out = {}
        for g in keys:
            for e in epochs:
                with rewinder.rewound(g, e):
                    out.setdefault(g, {})[e] = accuracies(model, data, amp=cfg.amp)
        return out

    def reload():
        out = {}
        for g in keys:
            for e in epochs:
                fresh = model_for(cfg, data)
                state = run.load_checkpoint(cfg.epochs)["model"]
                ckpt = run.load_checkpoint(e)["model"]
                state.update({k: ckpt[k] for k in keys[g]})
                fresh.load_state_dict(state)
                out.setdefault(g, {})[e] = accuracies(fresh, data, amp=cfg.amp)
        return out

    def recompute():
        return rewind_sweep(model, data, recomputer, epochs, amp=cfg.amp, recompute_bn=True)

    arms = {"sweep": sweep, "forward": forward, "reload": reload, "recompute": recompute}
    print(f"{run.dir.name}: {len(keys)} groups x rewind epochs {epochs} on {data.device}, "
          f"{torch.get_num_threads()} threads, {cfg.repeats} alternating repeats")
    accuracies(model, data, amp=cfg.amp)  # warm-up: first-call allocations and kernel selection
    times, results = {name: [] for name in arms}, {}
    for _ in range(cfg.repeats):  # alternating, so a change of machine load hits every arm alike
        for name, fn in arms.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    assert results["sweep"] == results["forward"] == results["reload"], "the three final-mode arms disagree"
    med = {name: statistics.median(t) for name, t in times.items()}
    print("identical accuracies in sweep, forward and reload (parameters only: the final model's BatchNorm statistics)")
    for name in arms:
        print(f"{name:9s} {med[name]:7.2f}s  ({med[name] / (len(keys) * len(epochs)):.3f}s per pair)  "
              f"x{med[name] / med['sweep']:.2f} the time of sweep")


if __name__ == "__main__":
    from common import cli
    cli.run(main)
