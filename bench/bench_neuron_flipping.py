"""Neuron flipping: the batched search (common.flipping.flip_batched, several targets per forward, each
with its own parameters) vs the plain loop (flip_sequential, one target at a time), side by side in one
process, on a run's final model at neuron_flipping.py's settings (the authors': a batch of 1 + 511,
5 noised copies redrawn at every step, the cross-entropy of their mean logits); and the peak memory
and time per target of one arm on any model (e.g. torchvision:resnet18, whose steps run in pieces).

Targets: the first noisy and clean ones of neuron_flipping.py (seeded, interleaved), with their
reference batches and noise; both arms must give identical unit sequences. Reported per arm: seconds
per target and per greedy step (the search only: the collateral evaluation is left out), targets per
second and the ratio of the arms, and the arm's peak memory: on a CPU the process's peak resident set
(VmHWM, reset before each arm where Linux allows), on CUDA the allocator's peak.

    python bench/bench_neuron_flipping.py [--n_examples=3] [--slots=4] [--repeats=1] [--key=value ...]
    python bench/bench_neuron_flipping.py --model=torchvision:resnet18 --epochs=1 --arms=[\"sequential\"] \\
        --n_targets=1 --max_units=1        # peak memory and seconds per step of a standard model
"""
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import neuron_flipping  # noqa: E402
from common import config  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.flipping import (Units, flip_batched, flip_sequential, graph_rows, margins, pick_targets,  # noqa: E402
                             reference_batch)
from common.training import trained_run  # noqa: E402

ARMS = ("sequential", "batched")
# The default run and neuron_flipping.py's knobs (one definition: the script's).
KNOBS = {**neuron_flipping.KNOBS, "n_examples": 3,
         "n_targets": 0,          # search only the first n of the 2 x n_examples targets (0: all)
         "slots": 4,              # targets per forward of the batched arm
         "arms": list(ARMS),      # which arms to run, in this order in the first round
         "repeats": 1}            # rounds; each round alternates which arm goes first
config.range_check("n_targets", 0, None)
config.range_check("slots", 1, None)
config.range_check("repeats", 1, None)


def reset_peak(device):
    """Start a new peak-memory window (False where the platform does not allow it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the process's whole life


def main(argv):
    cfg = config.parse(KNOBS, argv)
    if not cfg.arms or any(a not in ARMS for a in cfg.arms):
        raise UserError(f"arms={cfg.arms!r}: pass a list of {', '.join(ARMS)}, e.g. --arms=[\"sequential\"]")
    model, data, run = trained_run(cfg)
    model.eval()
    units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
    fits = (margins(model, data) > 0).to(data.device)
    targets = pick_targets(data, fits, cfg.n_examples, cfg.seed)[:cfg.n_targets or None]
    jobs = []
    for index, kind in targets:
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        jobs.append((index, data.batch(idx), data.labels(idx), (cfg.seed, index)))
    rows = graph_rows(model, jobs[0][1], neuron_flipping.graph_budget(cfg.graph_gb, data.device))
    step_rows = max(cfg.n_eot, 1) * (1 + cfg.ref_batch)
    print(f"{run.dir.name}: {len(units)} {cfg.unit} units, batch 1 + {cfg.ref_batch}, {cfg.n_eot} noised copies, "
          f"objective {cfg.objective}, max_units {cfg.max_units}, {len(jobs)} targets, {torch.get_num_threads()} "
          f"threads, device {data.device}; graph memory {neuron_flipping.graph_budget(cfg.graph_gb, data.device) / 2 ** 30:g} "
          f"GiB: {rows} rows per forward with its graph "
          f"({'whole steps' if rows >= step_rows else f'steps of {step_rows} rows in pieces'}); batched: {cfg.slots} "
          f"targets per forward")

    def sequential():
        return {index: flip_sequential(model, units, x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise, key,
                                       cfg.objective, rows) for index, x, y, key in jobs}

    def batched():
        return dict(flip_batched(model, units, iter(jobs), cfg.slots, cfg.max_units, cfg.n_eot, cfg.eot_noise,
                                 cfg.objective))

    fns = {"sequential": sequential, "batched": batched}
    seconds, peaks, found, clean_window = {a: [] for a in cfg.arms}, {a: 0 for a in cfg.arms}, {}, True
    for r in range(cfg.repeats):
        for arm in (cfg.arms if r % 2 == 0 else cfg.arms[::-1]):  # alternate who goes first
            clean_window &= reset_peak(data.device)
            t = time.perf_counter()
            found[arm] = fns[arm]()
            if data.device.type == "cuda":
                torch.cuda.synchronize()  # kernels run asynchronously
            seconds[arm].append(time.perf_counter() - t)
            peaks[arm] = max(peaks[arm], peak_bytes(data.device))
            print(f"  round {r + 1}, {arm}: {seconds[arm][-1]:.1f} s, peak memory {peaks[arm] / 2 ** 30:.2f} GiB")
    results = next(iter(found.values()))
    if len(found) == 2 and found["sequential"] != found["batched"]:
        bad = next(i for i in found["sequential"] if found["sequential"][i] != found["batched"][i])
        raise UserError(f"target {bad}: the batched search differs from the plain loop "
                        f"({found['batched'][bad].units} vs {found['sequential'][bad].units})")
    steps = sum(len(res.units) + 1 for res in results.values())  # each zeroed unit's step and the last check
    for index, kind in targets:
        res = results[index]
        print(f"  {kind} #{index}: {len(res.units)} units, flipped {res.flipped}")
    if len(found) == 2:
        print(f"identical unit sequences for all {len(jobs)} targets")
    per_s = {}
    for arm in cfg.arms:
        s = statistics.fmean(seconds[arm])
        per_s[arm] = len(jobs) / s
        print(f"{arm:10s} {s / len(jobs):7.2f} s per target  {s / steps:7.2f} s per step  {per_s[arm]:6.3f} targets/s  "
              f"peak memory {peaks[arm] / 2 ** 30:.2f} GiB" + ("" if clean_window else " (the process's peak so far)"))
    if len(per_s) == 2:
        print(f"batched / sequential targets per second: x{per_s['batched'] / per_s['sequential']:.2f} "
              f"({steps} steps over {len(jobs)} targets)")


if __name__ == "__main__":
    from common import cli
    cli.run(main)
