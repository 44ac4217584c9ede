"""Localization methods: which method finds the units that memorize a training example?

Several ways to rank a model's units (the units of neuron_flipping.py: a conv filter, or one
BatchNorm / linear parameter) for a target training example inside its reference batch, on the same
model, targets and batches: the paper's greedy zeroing, one-shot w * dL/dw, activation selectivity
(UnitMem-style), integrated gradients, learned HardConcrete (L0) and slimming (L1) masks, and random
units as the floor. Each ranking is judged by zeroing its top k units (k = 1..K): how many targets
flip, and what the edit costs clean training and test examples. Against a known answer: on the
example-tied dropout model (example_tied_dropout.py's, evaluated tied), each noisy example's
memorization sits in its own memorization channels, which the dropout's hashing names: precision and
recall of those channels among its top-k units. And the cost of each method per example.

    python localization_methods.py [configs/preset.py] [--key=value ...]
"""
import statistics
import time

import torch
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

import example_tied_dropout as etd_script
from common import cli, config, dropout, plots
from common.cli import UserError
from common.evaluation import predict
from common.flipping import UNITS, Collateral, Units, collateral_sets, pick_targets, reference_batch
from common.localization import (COLORS, LABELS, METHODS, ChannelUnits, Localizer, collateral_curve, pin_tied,
                                 summarize, tied_channels, topk_batch, topk_predictions)
from common.precision import strict_fp32
from common.runs import read_json, write_json
from common.training import trained_run

# ----------------------------------------------------------------------------- the run (shared keys)
# Defined once, with each key's meaning, in common/config.py (RUN_DEFAULTS); shown here to be edited
# for this script (a config file or --key=value changes them for every script).
dataset = "mnist_5k"    # mnist_5k (embedded) | mnist | fashion_mnist | cifar10 | cifar100 | svhn | npz:PATH
model = "resnet9"       # resnet9 | resnet50 | vit | cnn | torchvision:<name> | path/file.py:factory (docs/own_model.md)
width = 0.25            # channel-width multiplier
noise = 0.1             # fraction of training labels replaced by a wrong class: the examples to memorize
seed = 0                # data split and label noise
model_seed = 0          # initialization, batch order, augmentation, dropout
epochs = 20
batch_size = 128
lr = 0.05               # peak learning rate (SGD)
schedule = "triangle"   # triangle (one-cycle) | cosine (linear warm-up, then cosine) | constant
warmup = 0.25           # fraction of training spent warming up
momentum = 0.9
weight_decay = 5e-4
augment = False         # random crop + flip (off in the paper's main runs)
amp = True              # bf16 autocast on CUDA (ignored elsewhere)
device = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
runs_dir = "runs"       # relative to the repository root
download = True         # let torchvision download a missing dataset
overwrite = False       # move aside a run directory trained with another configuration
deterministic = False   # PyTorch deterministic algorithms: bit-reproducible on a GPU, slower (docs/reliability.md)
groups = None           # layer groups as module-name prefixes, e.g. ["stem", "layer1"]; None: from the module tree
init_from = ""          # the user's own per-epoch state dicts (a directory or glob) instead of training here
RUN_KNOBS = config.run_knobs(globals())  # the block above, checked against common/config.py
# ----------------------------------------------------------------------------- this experiment
n_examples = 10         # targets of each kind (noisy, clean) on the plain model; noisy targets on the ETD model
ref_batch = 31          # other training examples in each target's batch (fixed per target, seeded); at least 1
unit = "channel"        # as neuron_flipping.py: channel (a conv filter is one unit, other parameters per element,
                        # the authors') | channel_out (a conv's output channel after its BatchNorm) | weight
max_k = 20              # K: every ranking is judged by zeroing its top k units, k = 1..K
methods = list(METHODS) # the methods compared, in this order in tables and figures
ig_steps = 16           # integrated gradients: points on each layer group's path (midpoint rule)
mask_steps = 50         # Adam steps of each learned mask, per target
hc_lr = 0.1             # Adam learning rate of the HardConcrete mask's log_alpha
slim_lr = 0.02          # Adam learning rate of the slimming mask
l0_penalty = 0.01       # HardConcrete: weight of the expected number of removed units
l1_penalty = 0.01       # slimming: weight of the L1 norm of the removal mask
collateral_n = 200      # collateral accuracy on this many clean, noisy and test examples (0: all; no targets)
collateral_k = [1, 2, 3, 5, 10, 20]  # the k at which the collateral accuracy is measured (those <= max_k)
etd = True              # also judge the methods on the example-tied dropout model against its known channels
p_gen = etd_script.p_gen                # the ETD model: example_tied_dropout.py's knobs, same names and defaults
p_mem = etd_script.p_mem
drop_rescale = etd_script.drop_rescale
etd_epochs = etd_script.etd_epochs
dropout_after = etd_script.dropout_after
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("n_examples", 1, None)
config.range_check("ref_batch", 0, None)
config.choice_check("unit", UNITS)
config.range_check("max_k", 1, None)
config.range_check("ig_steps", 1, None)
config.range_check("mask_steps", 1, None)
config.range_check("hc_lr", 0, None, lo_open=True)
config.range_check("slim_lr", 0, None, lo_open=True)
config.range_check("l0_penalty", 0, None)
config.range_check("l1_penalty", 0, None)
config.range_check("collateral_n", 0, None)
config.register_check("methods", lambda v, cfg: None if v and len(set(v)) == len(v) and set(v) <= set(METHODS) else
                      f"methods={v!r}: give distinct names from {', '.join(METHODS)}; e.g. --methods=[\"oneshot\",\"random\"]")
config.register_check("collateral_k", lambda v, cfg: None if all(type(k) is int and k >= 1 for k in v) else
                      f"collateral_k={v!r} must list integers >= 1; e.g. --collateral_k=[1,5,20]")
# Records computed under the same settings are reused by an interrupted or extended run. Not drop_rescale:
# it changes only the ETD drop-mode evaluation, which the methods never use (tied mode is the ground truth).
SETTINGS = ("unit", "ref_batch", "max_k", "ig_steps", "mask_steps", "hc_lr", "slim_lr", "l0_penalty", "l1_penalty",
            "collateral_n", "collateral_k", "p_gen", "p_mem", "etd_epochs", "dropout_after")
OPTIONS = ("max_k", "ig_steps", "mask_steps", "hc_lr", "slim_lr", "l0_penalty", "l1_penalty")  # Localizer's


def target_batch(data, index, cfg):
    """The target's batch, as neuron_flipping.py's: the target first, then its reference examples."""
    idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
    return idx, data.batch(idx), data.labels(idx)


def tied_dropout_model(cfg, data, run):
    """example_tied_dropout.py's ETD model: its variant directory (trained there by the same code if missing)."""
    name = f"etd_pgen{cfg.p_gen:g}_pmem{cfg.p_mem:g}_ep{etd_script.variant_epochs(cfg)}"  # as example_tied_dropout.main
    factory = dropout.etd_factory(cfg.p_gen, cfg.p_mem, cfg.model_seed, cfg.drop_rescale)
    model, etd_run, _ = etd_script.train_variant(cfg, data, run, name, factory, {"p_gen": cfg.p_gen, "p_mem": cfg.p_mem})
    return model.eval(), etd_run


def judge(localizer, method, model, units, x, y, index, k_max, whole_batch=False):
    """Rank with `method`, then zero its top k units, k = 1..k_max: the target's predictions (and with
    `whole_batch` the fraction of its reference examples still predicted with their label). Returns
    (ranking, record); the record's seconds are the ranking's alone."""
    t0 = time.perf_counter()
    ranking, extra = localizer.rank(method, x, y, index)
    seconds = time.perf_counter() - t0
    if whole_batch:
        preds, kept = topk_batch(model, units, ranking, x, y, k_max)
        extra["refs_kept"] = kept
    else:
        preds = topk_predictions(model, units, ranking, x, k_max)
    top = ranking[:k_max].tolist()
    return ranking, {"top": top, "groups": [units.describe(u)["group"] for u in top], "predictions": preds,
                     "flipped": [p != int(y[0]) for p in preds], "seconds": round(seconds, 6), **extra}


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    if cfg.ref_batch < 1:
        raise UserError(f"ref_batch={cfg.ref_batch}: activation selectivity compares the target with its "
                        f"reference examples; pass --ref_batch=1 or more")
    t_start = time.time()
    model, data, run = trained_run(cfg)
    model.eval()
    units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
    if cfg.max_k > len(units):
        raise UserError(f"max_k={cfg.max_k}, but the model has only {len(units)} units; pass --max_k={len(units)} or less")
    ks = sorted({k for k in cfg.collateral_k if k <= cfg.max_k})
    options = {k: getattr(cfg, k) for k in OPTIONS}
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    partial_path, final_path = run.path("localization_methods.partial.json"), run.path("localization_methods.json")
    records = {}
    for path in (final_path, partial_path):  # resume: records of the same settings with every method asked for
        if path.is_file():
            saved = read_json(path)
            if saved.get("settings") == settings:
                done = saved.get("records") or (saved["plain"]["records"] + ((saved.get("etd") or {}).get("records") or []))
                records.update({(r["model"], r["index"]): r for r in done if set(cfg.methods) <= set(r["methods"])})

    def save(key, record):
        records[key] = record
        write_json(partial_path, {"settings": settings, "records": list(records.values())})

    # The plain model: noisy and clean targets (neuron_flipping.py's), flips and collateral damage.
    with strict_fp32():  # like the rankings and the flip checks
        fits = predict(model, data, "train", amp=False) == data.y_train
    targets = pick_targets(data, fits, cfg.n_examples, cfg.seed)
    collateral = Collateral(model, data, collateral_sets(data, cfg.collateral_n, cfg.seed))
    baseline = collateral.accuracies(collateral.before)
    print(f"{run.dir.name}: {len(units)} units ({cfg.unit}); {cfg.n_examples} noisy + {cfg.n_examples} clean targets, "
          f"batch of 1 + {cfg.ref_batch}; methods {', '.join(cfg.methods)}; top k = 1..{cfg.max_k}")
    localizer = Localizer(model, units, cfg.seed, **options)
    for index, kind in tqdm([t for t in targets if ("plain", t[0]) not in records], desc="plain model", disable=None):
        idx, x, y = target_batch(data, index, cfg)
        before = collateral.accuracies(collateral.before, index)
        rec = {"model": "plain", "index": index, "kind": kind, "label": int(y[0]),
               "true_label": int(data.y_true[index]), "methods": {}}
        for method in cfg.methods:
            ranking, r = judge(localizer, method, model, units, x, y, index, cfg.max_k)
            after = collateral_curve(model, units, ranking, collateral, ks, index)
            r["collateral_after"] = {str(k): a for k, a in after.items()}
            r["collateral_drop"] = {str(k): {s: before[s] - a[s] for s in a} for k, a in after.items()}
            rec["methods"][method] = r
        save(("plain", index), rec)
    plain = [records["plain", i] for i, _ in targets]

    # The ETD model, evaluated tied: noisy targets, and the channels each was tied to (the known answer).
    etd = None
    if cfg.etd:
        etd_model, etd_run = tied_dropout_model(cfg, data, run)
        etd_units = Units(etd_model, cfg.unit, sample=data.batch(torch.tensor([0])))
        truth = ChannelUnits(etd_model, etd_units)
        with dropout.mode(etd_model, "tied"), strict_fp32():
            tied_fits = predict(etd_model, data, "train", amp=False) == data.y_train
        etd_targets = [i for i, kind in pick_targets(data, tied_fits, cfg.n_examples, cfg.seed) if kind == "noisy"]
        print(f"ETD model {etd_run.dir.name} (tied): {len(etd_targets)} noisy targets")
        for index in tqdm([i for i in etd_targets if ("etd", i) not in records], desc="ETD model", disable=None):
            idx, x, y = target_batch(data, index, cfg)
            pinned = pin_tied(etd_model, idx)  # tied evaluation of this batch, without example indices
            own = truth.own(tied_channels(etd_model, cfg.p_gen, cfg.p_mem, cfg.model_seed, idx[:1]))
            rec = {"model": "etd", "index": index, "kind": "noisy", "label": int(y[0]),
                   "true_label": int(data.y_true[index]), "own_channels": int(own.sum()),
                   "chance_precision": truth.chance(own), "methods": {}}
            local = Localizer(pinned, etd_units, cfg.seed, **options)
            for method in cfg.methods:
                ranking, r = judge(local, method, pinned, etd_units, x, y, index, cfg.max_k, whole_batch=True)
                rec["methods"][method] = {**r, **truth.scores(ranking, own, cfg.max_k)}
            save(("etd", index), rec)
        etd_records = [records["etd", i] for i in etd_targets]
        etd = {"variant_dir": str(etd_run.dir), "p_gen": cfg.p_gen, "p_mem": cfg.p_mem,
               "own_channels_mean": sum(r["own_channels"] for r in etd_records) / len(etd_records),
               "chance_precision": sum(r["chance_precision"] for r in etd_records) / len(etd_records),
               "records": etd_records}

    summary = {"plain": summarize(plain, cfg.methods, cfg.max_k)}
    if etd:
        summary["etd"] = summarize(etd["records"], cfg.methods, cfg.max_k, kinds=("noisy",))
    every = plain + (etd["records"] if etd else [])
    cost = {m: sum(r["methods"][m]["seconds"] for r in every) / len(every) for m in cfg.methods}
    # relative cost: per target over one-shot's (measured moments apart), median over targets (robust to load)
    ratio = {m: statistics.median(r["methods"][m]["seconds"] / max(r["methods"]["oneshot"]["seconds"], 1e-9)
                                  for r in every) for m in cfg.methods} if "oneshot" in cfg.methods else None
    results = {"config": vars(cfg), "settings": settings, "methods": cfg.methods, "n_units_total": len(units),
               "collateral_k": ks, "baseline": baseline, "eval_sizes": {k: len(v) for k, v in collateral.sets.items()},
               "summary": summary, "cost_seconds": cost,
               "cost_ratio_to_oneshot": ratio,
               "plain": {"records": plain}, "etd": etd, "wall_seconds": round(time.time() - t_start, 1)}
    write_json(final_path, results)
    if partial_path.is_file():
        partial_path.unlink()

    print_table(results)
    plot_plain(results, cfg, run.path("localization_methods.png"))
    if etd:
        plot_etd(results, cfg, run.path("localization_methods_etd.png"))
    plot_cost(results, cfg, run.path("localization_methods_cost.png"))
    print(f"wrote {final_path} and localization_methods{{,_etd,_cost}}.png ({results['wall_seconds']:.0f} s)")
    return results


def print_table(results):
    s, k_max, methods = results["summary"], results["config"]["max_k"], results["methods"]
    k5, kc = min(5, k_max), max(results["collateral_k"], default=None)
    etd = "etd" in s
    print(f"\n{'method':<25} {'noisy flipped @1':>16} {'@' + str(k5):>5} {'@' + str(k_max):>5} {'clean @' + str(k_max):>9}"
          f"  {'drop @' + str(kc) + ': clean / test':>22}" + (f"  {'ETD prec @' + str(k5):>12} {'recall @' + str(k_max):>10}"
                                                              if etd else "") + f"  {'s/target':>9} {'x oneshot':>9}")
    ratio = results["cost_ratio_to_oneshot"] or {}
    for m in methods:
        n, c = s["plain"][m]["noisy"], s["plain"][m]["clean"]
        drop = n.get("collateral_drop", {}).get(str(kc), {})
        cells = (f"{LABELS[m]:<25} {n['flip_rate'][0]:>16.0%} {n['flip_rate'][k5 - 1]:>5.0%} {n['flip_rate'][-1]:>5.0%} "
                 f"{c['flip_rate'][-1]:>9.0%}  {drop.get('clean', float('nan')):>+11.3f} / {drop.get('test', float('nan')):+.3f}")
        if etd:
            e = s["etd"][m]["noisy"]
            cells += f"  {e['precision'][k5 - 1]:>12.0%} {e['recall'][-1]:>10.0%}"
        cells += f"  {results['cost_seconds'][m]:>9.3f} {ratio.get(m, float('nan')):>9.2f}"
        print(cells)
    if etd:
        print(f"(ETD chance precision {results['etd']['chance_precision']:.1%}: a random unit's odds of writing one of "
              f"the target's {results['etd']['own_channels_mean']:.0f} own memorization channels)")


def _finish(ax, title, ylabel, k_max=None):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("k: top-k units of the ranking zeroed")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if k_max:
        ax.set_xlim(0.5, k_max + 0.5)


def plot_plain(results, cfg, path):
    """Flip rate vs k (noisy, clean targets) and collateral accuracy drop vs k (clean train, test)."""
    s, k_max = results["summary"]["plain"], results["config"]["max_k"]
    ks = list(range(1, k_max + 1))
    fig, axes = plots.figure(f"Localization methods on the plain model: zeroing each method's top-k units "
                             f"({cfg.unit} units, {cfg.n_examples} noisy + {cfg.n_examples} clean targets)", cfg,
                             ncols=4, panel=(4.4, 3.8))
    for m in results["methods"]:
        for ax, kind in zip(axes[0], ("noisy", "clean")):
            ax.plot(ks, [100 * v for v in s[m][kind]["flip_rate"]], color=COLORS[m], marker=".", label=LABELS[m])
        drops = s[m]["noisy"].get("collateral_drop", {})
        cks = sorted(drops, key=int)
        for ax, split in zip(axes[0, 2:], ("clean", "test")):
            ax.plot([int(k) for k in cks], [100 * drops[k][split] for k in cks], color=COLORS[m], marker="o",
                    label=LABELS[m])
    _finish(axes[0, 0], "noisy (memorized) targets flipped", "targets predicted off their label (%)", k_max)
    _finish(axes[0, 1], "clean targets flipped", "targets predicted off their label (%)", k_max)
    _finish(axes[0, 2], "collateral: clean training examples\n(after a noisy target's edit)",
            "accuracy drop (percentage points)", k_max)
    _finish(axes[0, 3], "collateral: test examples\n(after a noisy target's edit)", "accuracy drop (percentage points)",
            k_max)
    for ax in axes[0, :2]:
        ax.set_ylim(-3, 103)
    axes[0, 3].legend(fontsize=7, loc="upper left")  # the drops start at 0 and rise to the right
    return plots.save(fig, path)


def plot_etd(results, cfg, path):
    """Precision and recall of the noisy targets' own memorization channels at k, the flip rate and the
    reference examples kept."""
    s, k_max, e = results["summary"]["etd"], results["config"]["max_k"], results["etd"]
    ks = list(range(1, k_max + 1))
    fig, axes = plots.figure(f"Localization methods against a known answer: example-tied dropout model (p_gen "
                             f"{e['p_gen']:g}, p_mem {e['p_mem']:g}), evaluated tied, {len(e['records'])} noisy targets",
                             cfg, ncols=4, panel=(4.6, 3.8))
    for m in results["methods"]:
        n = s[m]["noisy"]
        for ax, key in zip(axes[0], ("precision", "recall", "flip_rate", "refs_kept")):
            ax.plot(ks, [100 * v for v in n[key]], color=COLORS[m], marker=".", label=LABELS[m])
    chance = axes[0, 0].axhline(100 * e["chance_precision"], color="gray", ls="--", lw=1, label="chance (a random unit)")
    cap = [100 * min(1, k / e["own_channels_mean"]) for k in ks]
    axes[0, 1].plot(ks, cap, color="gray", ls=":", lw=1, label="best possible (one unit per channel)")
    _finish(axes[0, 0], "precision: top-k units that write one of\nthe target's own memorization channels",
            "precision (%)", k_max)
    _finish(axes[0, 1], f"recall: own memorization channels written\nby a top-k unit "
                        f"(~{e['own_channels_mean']:.0f} per target)", "recall (%)", k_max)
    _finish(axes[0, 2], "noisy targets flipped (tied evaluation)", "targets predicted off their label (%)", k_max)
    _finish(axes[0, 3], "collateral in the batch: reference examples\nstill predicted with their label (tied)",
            "reference examples kept (%)", k_max)
    for ax in axes[0]:
        ax.set_ylim(-3, 103)
    axes[0, 0].legend(handles=[chance], fontsize=7, loc="center right")
    axes[0, 1].legend(fontsize=7, loc="upper left")  # recall stays low: the upper left is free
    return plots.save(fig, path)


def plot_cost(results, cfg, path):
    """Seconds per target of each method's ranking (log scale), labelled with the ratio to one-shot."""
    methods, cost, ratio = results["methods"], results["cost_seconds"], results["cost_ratio_to_oneshot"] or {}
    fig, axes = plots.figure(f"Localization methods: cost of one ranking (per target, both models; "
                             f"{torch.get_num_threads()} threads)", cfg, panel=(9.5, 4.2))
    ax = axes[0, 0]
    bars = ax.bar(range(len(methods)), [max(cost[m], 1e-5) for m in methods], color=[COLORS[m] for m in methods])
    for b, m in zip(bars, methods):
        label = f"{cost[m]:.3g} s" + (f"\nx{ratio[m]:.2g}" if m in ratio else "")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() * 1.1, label, ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("seconds per target (log scale)")
    ax.set_title("bar labels: seconds, and x the time of one-shot w*dL/dw (median over targets)", fontsize=9)
    ax.set_ylim(top=ax.get_ylim()[1] * 5)
    ax.grid(alpha=0.3, axis="y")
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
