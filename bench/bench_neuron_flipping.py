"""Neuron flipping: the fast exact path (common.flipping.Flipper) vs the authors' loop written plainly
(common.flipping.flip_sequential), on the default run's final model, at neuron_flipping.py's settings
(the authors': a batch of 1 + 511, 5 noised copies redrawn at every step).

Same targets as neuron_flipping.py (noisy and clean, seeded), same reference batches, same noise; each
target is searched by both, in alternating order, and the unit sequences must be identical.
Reported: seconds per target of each (the search only: the collateral evaluation, the same for both,
is left out), per kind and overall, their ratio, and how many steps the fast path settled with the
reference computation (near-ties of filter scores). --reference=False times the fast path alone,
--fast=False the plain loop alone: the two share the process's allocator (memory one leaves with the
system or holds changes what the other pays to fault pages in), so each alone in its own process is
the cleaner per-target cost.

The ceiling of any exact speed-up (--ceiling=True, the default): every exact method must run, at every
step, the forward of the step's freshly noised copies and a backward that gives the gradient of the
objective with respect to the activations (the noise is redrawn at every step, so nothing computed at
one step serves the next). On the first target's batch and its first step's copies, one after the
other as the search runs them, best of `repeats` rounds in alternating order:
  forward                   the copies' forwards (no gradients)
  forward + input backward  the copies' forwards and backwards with no parameter requiring a gradient,
                            down to every conv output (what Flipper backpropagates, without its scores)
  reference step            the copies' forwards and full backwards and the scores (flip_sequential's step)
and, for the measured mean of s greedy steps per target (the plain loop: s reference steps and a last
forward; an exact method: at least s forwards + input backwards), the ceiling
  (s * reference step + forward) / (s * (forward + input backward)).

    python bench/bench_neuron_flipping.py [--n_examples=3] [--ref_batch=511] [--n_eot=5] [--unit=channel]
                                          [--reference=True] [--fast=True] [--threads=0] [--ceiling=True] [--repeats=3]
"""
import copy
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
from common.flipping import (Flipper, Units, _reference_scores, flip_sequential, objective, pick_targets,  # noqa: E402
                             reference_batch, step_copies)
from common.precision import strict_fp32  # noqa: E402
from common.training import trained_run  # noqa: E402

# The default run and neuron_flipping.py's defaults (one definition: the script's knobs).
KNOBS = {**neuron_flipping.KNOBS, "n_examples": 3,
         "reference": True,  # also run the plain loop (False: the fast path alone, for its cost per target)
         "fast": True,       # run the fast path (False: the plain loop alone, for its cost per target)
         "threads": 0,       # torch intra-op threads (0: torch's default)
         "ceiling": True,    # also time the parts of one step and print the ceiling of an exact speed-up
         "repeats": 3}       # rounds of those timings (the best of each is reported)
config.range_check("repeats", 1, None)


def input_backward(model, copies, y):
    """The copies' forwards and backwards down to every conv output, no parameter requiring a gradient
    (`model`'s parameters must not require gradients): the least backward an exact method needs."""
    outs = []

    def keep(module, inputs, out):
        if not out.requires_grad:  # the first conv: nothing before it requires a gradient
            out.requires_grad_(True)
        outs.append(out)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        for c in copies:
            outs.clear()
            torch.autograd.grad(objective(model(c), y), outs)
    finally:
        for h in hooks:
            h.remove()


def step_parts(model, units, x, y, noise_key, cfg):
    """{part: best seconds} of the first step's forward, forward + input backward and reference step
    (see the module docstring), on the copies the search runs at that step."""
    copies = step_copies(x, cfg.n_eot, cfg.eot_noise, noise_key, 0)
    frozen, reference = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    reference.requires_grad_(True)

    def forward():
        with torch.no_grad():
            for c in copies:
                frozen(c)

    parts = [("forward", forward), ("forward + input backward", lambda: input_backward(frozen, copies, y)),
             ("reference step", lambda: _reference_scores(reference, units, copies, y))]
    best = {name: float("inf") for name, _ in parts}
    with strict_fp32():
        for r in range(cfg.repeats):
            for name, fn in (parts if r % 2 == 0 else parts[::-1]):  # alternate the order
                t = time.perf_counter()
                fn()
                if x.device.type == "cuda":
                    torch.cuda.synchronize()  # kernels run asynchronously
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def main(argv):
    cfg = config.parse(KNOBS, argv)
    if not (cfg.reference or cfg.fast):
        raise UserError("reference=False and fast=False leave nothing to time; pass --reference=True or --fast=True")
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
    steps = []  # greedy steps per target
    for k, (index, kind) in enumerate(targets):
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        x, y = data.batch(idx), data.labels(idx)
        args = (x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise, (cfg.seed, index))
        runs = [("sequential", lambda: flip_sequential(model, units, *args)), ("fast", lambda: flipper.flip(*args))]
        runs = [(name, fn) for name, fn in runs if {"sequential": cfg.reference, "fast": cfg.fast}[name]]
        out = {}
        for name, fn in (runs if k % 2 == 0 else runs[::-1]):  # alternate who goes first
            t = time.perf_counter()
            out[name] = fn()
            seconds[kind][name].append(time.perf_counter() - t)
        if len(out) == 2 and out["sequential"] != out["fast"]:
            raise UserError(f"target {index}: the fast path differs from the reference "
                            f"({out['fast'].units} vs {out['sequential'].units})")
        times = "  ".join(f"{name} {seconds[kind][name][-1]:6.1f} s" for name, _ in runs)
        result = next(iter(out.values()))
        steps.append(len(result.units))  # greedy steps: one per zeroed unit, then the last flip check
        print(f"  {kind} #{index}: {len(result.units)} units, flipped {result.flipped}  {times}"
              + ("  (identical)" if len(out) == 2 else ""))
    if cfg.reference and cfg.fast:
        print(f"\nidentical unit sequences for all {len(targets)} targets", end="; ")
    if cfg.fast:
        print(f"steps settled by the reference computation: {flipper.exact_steps} of {flipper.steps}")
    seconds["all"] = {name: seconds["noisy"][name] + seconds["clean"][name] for name in ("sequential", "fast")}
    for kind, s in seconds.items():
        line = "  ".join(f"{name} {statistics.fmean(s[name]):6.1f} s per target" for name, _ in runs)
        if len(runs) == 2:
            line += f"  speed-up x{sum(s['sequential']) / sum(s['fast']):.2f}"
        print(f"{kind:6s} {line}")
    if cfg.ceiling:
        index = targets[0][0]
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        best = step_parts(model, units, data.batch(idx), data.labels(idx), (cfg.seed, index), cfg)
        steps = statistics.fmean(steps)
        ceiling = (steps * best["reference step"] + best["forward"]) / (steps * best["forward + input backward"])
        print(f"\none step on target #{index}'s batch ({max(cfg.n_eot, 1)} x {len(idx)} inputs), best of "
              f"{cfg.repeats}: " + "  ".join(f"{name} {t:.3f} s" for name, t in best.items()))
        print(f"ceiling of an exact speed-up at {steps:.2f} steps per target: (steps * reference step + forward) / "
              f"(steps * (forward + input backward)) = x{ceiling:.2f}")


if __name__ == "__main__":
    from common import cli
    cli.run(main)
