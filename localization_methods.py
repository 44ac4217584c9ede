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
import contextlib
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

import example_tied_dropout as etd_script
from common import cli, config, dropout, plots
from common.cli import UserError
from common.evaluation import predict
from common.flipping import UNITS, Collateral, Units, collateral_sets, pick_targets, reference_batch, zeroed_copy
from common.localization import (COLORS, LABELS, MASKS, METHODS, ORACLE, PASSES, ChannelUnits, HeldOut, Localizer,
                                 collateral_curve, compare, flip_auc, oracle_ranking, pin_tied, summarize,
                                 tied_channels, topk_batch, topk_predictions, tune_penalties)
from common.precision import strict_fp32
from common.provenance import code_difference, code_version
from common.runs import read_json, sole_writer, write_json
from common.training import trained_run

# ----------------------------------------------------------------------------- the run (shared keys)
# Defined once, with each key's meaning, in common/config.py (RUN_DEFAULTS); shown here to be edited
# for this script (a config file or --key=value changes them for every script).
dataset = "mnist_5k"    # mnist_5k (embedded) | mnist | fashion_mnist | cifar10 | cifar100 | svhn | npz:PATH
model = "resnet9"       # resnet9 | resnet18 | resnet50 | vit | cnn | torchvision:<name> |
                        # path/file.py:factory (docs/own_model.md)
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
n_examples = 10         # targets of each kind: noisy and clean on the plain model, noisy and clean on the ETD model
n_dev = 2               # development targets (noisy, after the measured ones) on which each mask's penalty is chosen
ref_batch = 31          # other training examples in each target's batch (fixed per target, seeded); at least 1
unit = "channel"        # as neuron_flipping.py: channel (a conv filter is one unit, other parameters per element,
                        # the authors') | channel_out (a conv's output channel after its BatchNorm) | weight
max_k = 20              # K: every ranking is judged by zeroing its top k units, k = 1..K
methods = list(METHODS) # the methods compared, in this order in tables and figures
ig_steps = 16           # integrated gradients (weights and activations): points on each path (midpoint rule)
mask_max_steps = 1000   # learned masks: Adam steps at most (a mask stops earlier when converged)
mask_window = 25        # ... the stopping rule: every this many steps, compare the window's mean loss with the last
mask_tol = 0.01         # ... converged when it fell by less than this fraction and the top K units did not change
hc_lr = 0.1             # Adam learning rate of the HardConcrete masks' log_alpha (removal and keep)
slim_lr = 0.02          # Adam learning rate of the slimming masks (removal and keep)
l0_penalty = 0.01       # removal HardConcrete: weight of the expected number of removed units
l1_penalty = 0.01       # removal slimming: weight of the L1 norm of the removal mask
keep_hc_penalty = 1.0   # HardConcrete keep mask (Chang et al.): weight of the mean open-gate probability
keep_slim_penalty = 1.0 # slimming keep mask (Chang et al.): weight of the mean mask
penalty_factors = [0.1, 1, 10]  # each mask's penalty is its default times the factor best on the dev targets
                        # (one factor: no choice, the dev targets are not ranked)
collateral_n = 200      # collateral accuracy on this many clean, noisy and test examples (0: all; no targets)
collateral_k = [1, 2, 3, 5, 10, 20]  # the k at which the collateral accuracy is measured (those <= max_k)
etd = True              # also judge the methods on the example-tied dropout model against its known channels
p_gen = etd_script.p_gen                # the ETD model: example_tied_dropout.py's knobs, same names and defaults
p_mem = etd_script.p_mem
drop_rescale = etd_script.drop_rescale
etd_epochs = etd_script.etd_epochs
dropout_after = etd_script.dropout_after
resamples = 2000        # bootstrap resamples of every CI
combine = []            # instead of running: each seed's localization_methods.json -> the comparison over seeds
combine_out = "docs/experiments/localization_methods"  # ... written to this path + .json and _cost.png
store = ""              # a directory that keeps this seed's records (partial, then final) instead of the run directory,
                        # e.g. docs/results/localization_methods/seed0: committed, the targets run in other sessions or
                        # on other machines add up (records of another run, settings or code version are refused)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("n_examples", 1, None)
config.range_check("ref_batch", 0, None)
config.choice_check("unit", UNITS)
config.range_check("max_k", 1, None)
config.range_check("n_dev", 1, None)
config.range_check("ig_steps", 1, None)
config.range_check("mask_max_steps", 1, None)
config.range_check("mask_window", 1, None)
config.range_check("mask_tol", 0, None)
config.range_check("hc_lr", 0, None, lo_open=True)
config.range_check("slim_lr", 0, None, lo_open=True)
config.range_check("l0_penalty", 0, None)
config.range_check("l1_penalty", 0, None)
config.range_check("keep_hc_penalty", 0, None)
config.range_check("keep_slim_penalty", 0, None)
config.range_check("collateral_n", 0, None)
config.range_check("resamples", 1, None)
config.register_check("penalty_factors", lambda v, cfg: None if v and all(isinstance(f, (int, float)) and f > 0 for f in v)
                      else f"penalty_factors={v!r}: give positive numbers, e.g. --penalty_factors=[0.1,1,10]")
config.register_check("methods", lambda v, cfg: None if v and len(set(v)) == len(v) and set(v) <= set(METHODS) else
                      f"methods={v!r}: give distinct names from {', '.join(METHODS)}; e.g. --methods=[\"oneshot\",\"random\"]")
config.register_check("collateral_k", lambda v, cfg: None if all(type(k) is int and k >= 1 for k in v) else
                      f"collateral_k={v!r} must list integers >= 1; e.g. --collateral_k=[1,5,20]")
# Records computed on the same run, with the same code and settings, are reused by an interrupted or extended run. Not drop_rescale:
# it changes only the ETD drop-mode evaluation, which the methods never use (tied mode is the ground truth).
SETTINGS = ("unit", "n_dev", "ref_batch", "max_k", "ig_steps", "mask_max_steps", "mask_window", "mask_tol", "hc_lr",
            "slim_lr", "l0_penalty", "l1_penalty", "keep_hc_penalty", "keep_slim_penalty",
            "penalty_factors", "collateral_n", "collateral_k",
            "p_gen", "p_mem", "etd_epochs", "dropout_after")
OPTIONS = ("max_k", "ig_steps", "mask_max_steps", "mask_window", "mask_tol", "hc_lr", "slim_lr")  # Localizer's
PENALTY = {"hardconcrete": "l0_penalty", "slimming": "l1_penalty", "keep_hc": "keep_hc_penalty",
           "keep_slim": "keep_slim_penalty"}


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


def judge(localizer, method, model, units, x, y, index, k_max, whole_batch=False, ranking=None):
    """Rank with `method` (or take `ranking`), then zero its top k units, k = 1..k_max: the target's
    predictions (and with `whole_batch` the fraction of its reference examples still predicted with their
    label). Returns (ranking, record); the record's seconds and passes are the ranking's alone."""
    t0 = time.perf_counter()
    ranking, extra = (ranking, {"passes": None}) if ranking is not None else localizer.rank(method, x, y, index)
    seconds = time.perf_counter() - t0
    if whole_batch:
        preds, kept = topk_batch(model, units, ranking, x, y, k_max)
        extra["refs_kept"] = kept
    else:
        preds = topk_predictions(model, units, ranking, x, k_max)
    top = ranking[:k_max].tolist()
    flipped = [p != int(y[0]) for p in preds]
    return ranking, {"top": top, "groups": [units.describe(u)["group"] for u in top], "predictions": preds,
                     "flipped": flipped, "flip_k": next((k for k, f in enumerate(flipped, 1) if f), None),
                     "auc": flip_auc(flipped), "seconds": round(seconds, 6), **extra}


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    if cfg.combine:
        missing = [p for p in cfg.combine if not Path(p).is_file()]
        if missing:
            raise UserError(f"combine: no file {missing[0]}; pass each seed's localization_methods.json")
        return combine(cfg)
    if cfg.ref_batch < 1:
        raise UserError(f"ref_batch={cfg.ref_batch}: activation selectivity compares the target with its "
                        f"reference examples; pass --ref_batch=1 or more")
    with sole_writer(cfg.store, "store") if cfg.store else contextlib.nullcontext():
        return localize(cfg)


def made_with(saved, settings, made_by, methods, dev):
    """Why records saved in a file cannot join this run's (another run, code version, settings, development
    targets or fewer methods), as one line, or None."""
    if saved.get("run") != made_by["run"]:
        return f"run ({saved.get('run')!r} there, {made_by['run']!r} now)"
    why = code_difference(saved.get("code") or {}, made_by["code"])
    if why:
        return f"code version ({why})"
    theirs = saved.get("settings") or {}
    key = next((k for k in settings if theirs.get(k) != settings[k]), None)
    if key:
        return f"setting ({key}: {theirs.get(key)!r} there, {settings[key]!r} now)"
    if saved.get("dev_targets") != dev:  # the masks' penalties were chosen on them
        return f"n_examples (development targets {saved.get('dev_targets')} there, {dev} now)"
    done = saved.get("records") or [r for part in ("plain", "etd") for r in (saved.get(part) or {}).get("records", [])]
    lacking = sorted({m for r in done for m in methods if m not in r["methods"]})
    return f"list of methods ({', '.join(lacking)} not there)" if lacking else None


def localize(cfg):
    """The comparison on one seed's run (records resumed from an interrupted or extended run, or a store)."""
    t_start = time.time()
    model, data, run = trained_run(cfg)
    model.eval()
    units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
    if cfg.max_k > len(units):
        raise UserError(f"max_k={cfg.max_k}, but the model has only {len(units)} units; pass --max_k={len(units)} or less")
    ks = sorted({k for k in cfg.collateral_k if k <= cfg.max_k})
    options = {k: getattr(cfg, k) for k in OPTIONS}
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    # The plain model: noisy and clean targets (neuron_flipping.py's), flips and collateral damage; after
    # them in the same seeded order, the development targets on which each mask's penalty is chosen.
    with strict_fp32():  # like the rankings and the flip checks
        fits = predict(model, data, "train", amp=False) == data.y_train
    chosen = pick_targets(data, fits, cfg.n_examples + cfg.n_dev, cfg.seed)
    targets, dev = chosen[:2 * cfg.n_examples], [i for i, kind in chosen[2 * cfg.n_examples:] if kind == "noisy"]
    # Resume: records of this run, code, settings and development targets, with every method asked for.
    where = Path(cfg.store) if cfg.store else run.dir
    partial_path, final_path = where / "localization_methods.partial.json", where / "localization_methods.json"
    made_by = {"run": run.dir.name, "code": code_version("localization_methods")}
    records, tuning = {}, None
    for path in (final_path, partial_path):
        if path.is_file():
            saved = read_json(path)
            why = made_with(saved, settings, made_by, cfg.methods, dev)
            if why and cfg.store:  # committed records are never replaced
                raise UserError(f"{path} holds records made with another {why}; pass another --store, or move "
                                f"that file aside to start over")
            if why is None:
                done = saved.get("records") or [r for part in ("plain", "etd") for r in (saved.get(part) or {}).get("records", [])]
                records.update({(r["model"], r["index"]): r for r in done})
                tuning = saved.get("tuning") if set(cfg.methods) & set(MASKS) <= set(saved.get("tuning") or {}) else tuning

    def save(key, record):
        records[key] = record
        write_json(partial_path, {"settings": settings, **made_by, "tuning": tuning, "dev_targets": dev,
                                  "records": list(records.values())})

    collateral = Collateral(model, data, collateral_sets(data, cfg.collateral_n, cfg.seed))
    baseline = collateral.accuracies(collateral.before)
    print(f"{run.dir.name}: {len(units)} units ({cfg.unit}); {cfg.n_examples} noisy + {cfg.n_examples} clean targets, "
          f"batch of 1 + {cfg.ref_batch}; methods {', '.join(cfg.methods)}; top k = 1..{cfg.max_k}")
    masks = [m for m in cfg.methods if m in MASKS]
    base = {m: getattr(cfg, PENALTY[m]) for m in masks}
    localizer = Localizer(model, units, cfg.seed, penalties=base, **options)
    if masks and tuning is None:  # the penalties, chosen on the plain model's development targets, used everywhere
        tuning = tune_penalties(localizer, [(*target_batch(data, i, cfg)[1:], i) for i in dev], base,
                                cfg.penalty_factors, cfg.max_k)
        print("penalties chosen on the development targets: " +
              ", ".join(f"{m} {t['chosen']:g}" for m, t in tuning.items()))
        write_json(partial_path, {"settings": settings, **made_by, "tuning": tuning, "dev_targets": dev,
                                  "records": list(records.values())})
    penalties = {m: t["chosen"] for m, t in (tuning or {}).items()}
    localizer.penalties.update(penalties)
    for index, kind in cli.progress([t for t in targets if ("plain", t[0]) not in records], desc="plain model"):
        idx, x, y = target_batch(data, index, cfg)
        before = collateral.accuracies(collateral.before, index)
        rec = {"model": "plain", "index": index, "kind": kind, "label": int(y[0]),
               "true_label": int(data.y_true[index]), "methods": {}}
        for method in cfg.methods:
            ranking, r = judge(localizer, method, model, units, x, y, index, cfg.max_k)
            at = sorted(set(ks) | ({r["flip_k"]} if r["flip_k"] else set()))
            after = collateral_curve(model, units, ranking, collateral, at, index)
            drop = {str(k): {s: before[s] - a[s] for s in a} for k, a in after.items()}
            r["collateral_after"] = {str(k): a for k, a in after.items() if k in ks}
            r["collateral_drop"] = {k: d for k, d in drop.items() if int(k) in ks}
            r["collateral_at_flip"] = drop[str(r["flip_k"])] if r["flip_k"] else None
            rec["methods"][method] = r
        save(("plain", index), rec)
    plain = [records["plain", i] for i, _ in targets]

    # The ETD model, evaluated tied: noisy and clean targets and the channels each was tied to (the known
    # answer); baseline (a): the plain model's weights in the same architecture with the same masks pinned,
    # on the same noisy targets; baseline (b): the clean targets. The oracle zeroes the own channels first.
    etd = None
    if cfg.etd:
        etd_model, etd_run = tied_dropout_model(cfg, data, run)
        base_model = copy.deepcopy(etd_model)
        base_model.load_state_dict(model.state_dict())  # ETD modules hold no state: the same keys
        etd_units = Units(etd_model, cfg.unit, sample=data.batch(torch.tensor([0])))
        truth = ChannelUnits(etd_model, etd_units)
        with dropout.mode(etd_model, "tied"), strict_fp32():
            tied_fits = predict(etd_model, data, "train", amp=False) == data.y_train
        etd_targets = pick_targets(data, tied_fits, cfg.n_examples, cfg.seed)
        held_sets = collateral_sets(data, cfg.collateral_n, cfg.seed)
        held = {"etd": HeldOut(etd_model, data, held_sets), "etd_base": HeldOut(base_model, data, held_sets)}
        jobs = [("etd", i, kind) for i, kind in etd_targets] + [("etd_base", i, "noisy") for i, kind in etd_targets
                                                                   if kind == "noisy"]
        print(f"ETD model {etd_run.dir.name} (tied): {cfg.n_examples} noisy + {cfg.n_examples} clean targets; "
              f"baseline (a): the plain weights with the same masks pinned, on the noisy ones")
        for name, index, kind in cli.progress([j for j in jobs if (j[0], j[1]) not in records], desc="ETD models"):
            idx, x, y = target_batch(data, index, cfg)
            pinned = pin_tied(etd_model if name == "etd" else base_model, idx)  # tied, without example indices
            own = truth.own(tied_channels(etd_model, cfg.p_gen, cfg.p_mem, cfg.model_seed, idx[:1]))
            rec = {"model": name, "index": index, "kind": kind, "label": int(y[0]),
                   "true_label": int(data.y_true[index]), "own_channels": int(own.sum()),
                   "chance_precision": truth.chance(own), "methods": {}}
            before = held[name].accuracies(held[name].before, idx.tolist())
            local = Localizer(pinned, etd_units, cfg.seed, penalties={**base, **penalties}, **options)
            for method in cfg.methods + [ORACLE]:
                oracle = oracle_ranking(truth, own, local.gen(ORACLE, index)) if method == ORACLE else None
                ranking, r = judge(local, method, pinned, etd_units, x, y, index, cfg.max_k, whole_batch=True,
                                   ranking=oracle)
                if r["flip_k"]:
                    after = held[name].after(etd_units, ranking, r["flip_k"], idx.tolist())
                    r["held_out_at_flip"] = {s: before[s] - after[s] for s in after}
                rec["methods"][method] = {**r, **truth.scores(ranking, own, cfg.max_k)}
            with torch.no_grad(), strict_fp32():  # the oracle's end point: every own channel's units zeroed
                every = zeroed_copy(pinned, etd_units, torch.nonzero((truth.unit_channel >= 0) &
                                                                     own[truth.unit_channel.clamp_min(0)]).flatten().tolist())
                rec["oracle_all_flipped"] = int(every(x[:1])[0].argmax()) != int(y[0])
            save((name, index), rec)
        etd_records = [records[name, i] for name, i, _ in jobs]
        etd = {"variant_dir": str(etd_run.dir), "p_gen": cfg.p_gen, "p_mem": cfg.p_mem,
               "own_channels_mean": statistics.fmean(r["own_channels"] for r in etd_records),
               "chance_precision": statistics.fmean(r["chance_precision"] for r in etd_records),
               "held_out_before": {name: h.accuracies(h.before) for name, h in held.items()},
               "records": etd_records}

    summary = {"plain": summarize(plain, cfg.methods, cfg.max_k)}
    if etd:
        for name in ("etd", "etd_base"):
            rs = [r for r in etd["records"] if r["model"] == name]
            summary[name] = summarize(rs, cfg.methods + [ORACLE], cfg.max_k, kinds=("noisy", "clean"))
    every = plain + (etd["records"] if etd else [])
    cost = {m: statistics.fmean(r["methods"][m]["seconds"] for r in every) for m in cfg.methods}
    passes = {m: {k: statistics.fmean(r["methods"][m]["passes"][k] for r in every) for k in PASSES}
              for m in cfg.methods}
    # relative cost: per target over one-shot's (measured moments apart), median over targets (robust to load)
    ratio = {m: statistics.median(r["methods"][m]["seconds"] / max(r["methods"]["oneshot"]["seconds"], 1e-9)
                                  for r in every) for m in cfg.methods} if "oneshot" in cfg.methods else None
    results = {"config": vars(cfg), "settings": settings, **made_by, "methods": cfg.methods, "n_units_total": len(units),
               "collateral_k": ks, "baseline": baseline, "eval_sizes": {k: len(v) for k, v in collateral.sets.items()},
               "dev_targets": dev, "tuning": tuning, "summary": summary, "cost_seconds": cost, "cost_passes": passes,
               "cost_ratio_to_oneshot": ratio,
               "plain": {"records": plain}, "etd": etd, "wall_seconds": round(time.time() - t_start, 1)}
    results["comparison"] = compare([results], cfg.resamples)
    write_json(final_path, results)
    if partial_path.is_file():
        partial_path.unlink()

    print_table(results)
    plot_plain(results, cfg, run.path("localization_methods.png"))
    if etd:
        plot_etd(results, cfg, run.path("localization_methods_etd.png"))
    plot_cost(results, cfg, run.path("localization_methods_cost.png"))
    plot_convergence(results, cfg, run.path("localization_methods_convergence.png"))
    print(f"wrote {final_path} and localization_methods{{,_etd,_cost,_convergence}}.png ({results['wall_seconds']:.0f} s)")
    return results


STATS = [("auc", "flip AUC (plain, noisy)", 1), ("auc_vs_greedy", "AUC - greedy", 1), ("median_k", "median k to flip", 0),
         ("collateral_at_flip", "test drop at own flip (pts)", 100), ("etd_auc", "ETD flip AUC", 1),
         ("held_out_at_flip", "ETD held-out drop at flip (pts)", 100), ("ap", "ETD AP", 1),
         ("ap_minus_a", "AP - base (a)", 1), ("ap_minus_b", "AP - clean (b)", 1),
         ("precision5_minus_a", "prec@5 - (a)", 1), ("precision5_minus_b", "prec@5 - (b)", 1),
         ("layer_ap_minus_a", "layer AP - (a)", 1), ("layer_ap_minus_b", "layer AP - (b)", 1),
         ("forward_equivalents", "forward-equivalents / target", 0)]


def _cell(v, scale):
    if not v or v["value"] is None or not np.isfinite(v["value"]):
        return "n/a"
    fmt = (lambda x: f"{x * scale:.2f}") if scale == 1 else (lambda x: f"{x * scale:.1f}" if scale else f"{x:.0f}")
    if scale == 0 and v["value"] >= 1000:
        fmt = lambda x: f"{x:.3g}"
    ci = f" [{fmt(v['ci'][0])}, {fmt(v['ci'][1])}]" if v.get("ci") and np.isfinite(v["ci"][0]) else ""
    return fmt(v["value"]) + ci


def comparison_table(comparison):
    """Markdown: one row per method, one column per statistic of `compare` (value [95% CI])."""
    rows = ["| method | " + " | ".join(label for _, label, _ in STATS) + " |", "|---" * (len(STATS) + 1) + "|"]
    for m, o in comparison.items():
        rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(o.get(key), scale) for key, _, scale in STATS) + " |")
    return "\n".join(rows)


def print_table(results):
    print("\n" + comparison_table(results["comparison"]))
    if results["tuning"]:
        print("penalties (dev targets' mean flip AUC per penalty): " + "; ".join(
            f"{m}: {t['chosen']:g} ({', '.join(f'{p} {a:.2f}' for p, a in t['auc'].items())})"
            for m, t in results["tuning"].items()))
    if results["etd"]:
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
    plots.legend_beside(axes[0, 3], fontsize=7)  # the same methods in every panel
    return plots.save(fig, path)


def plot_etd(results, cfg, path):
    """ETD model (tied), noisy targets: precision at k of their own memorization channels beside the same
    method's on baseline (a) (dashed) with the oracle; the average-precision margins over baselines (a)
    and (b) with their CIs; the flip rate; the held-out collateral at each method's own flip point."""
    s, k_max, e, c = results["summary"], results["config"]["max_k"], results["etd"], results["comparison"]
    ks, methods = list(range(1, k_max + 1)), results["methods"] + [ORACLE]
    fig, axes = plots.figure(f"Localization methods against a known answer: example-tied dropout model (p_gen "
                             f"{e['p_gen']:g}, p_mem {e['p_mem']:g}), tied; baseline (a): the plain model's weights with "
                             f"the same masks pinned; (b): clean ETD targets", cfg, ncols=4, panel=(4.6, 3.8))
    for m in methods:
        axes[0, 0].plot(ks, [100 * v for v in s["etd"][m]["noisy"]["precision"]], color=COLORS[m], marker=".",
                        label=LABELS[m])
        axes[0, 0].plot(ks, [100 * v for v in s["etd_base"][m]["noisy"]["precision"]], color=COLORS[m], ls="--", lw=0.8)
        axes[0, 2].plot(ks, [100 * v for v in s["etd"][m]["noisy"]["flip_rate"]], color=COLORS[m], marker=".")
    axes[0, 0].axhline(100 * e["chance_precision"], color="gray", ls=":", lw=1)
    for j, (key, ax) in enumerate((("ap_minus_a", axes[0, 1]), ("ap_minus_b", axes[0, 1]))):
        for i, m in enumerate(methods):
            v = c[m].get(key)
            if v and np.isfinite(v["value"]):
                ci = v["ci"] if np.isfinite(v["ci"][0]) else [v["value"]] * 2
                ax.errorbar(i + (j - 0.5) * 0.3, v["value"], yerr=[[v["value"] - ci[0]], [ci[1] - v["value"]]],
                            fmt="o" if j == 0 else "s", color=COLORS[m], capsize=2)
    axes[0, 1].axhline(0, color="gray", lw=0.8)
    axes[0, 1].set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=60, ha="right", fontsize=6)
    for i, m in enumerate(methods):
        v = c[m].get("held_out_at_flip")
        if v and np.isfinite(v["value"]):
            axes[0, 3].bar(i, 100 * v["value"], color=COLORS[m])
    axes[0, 3].set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=60, ha="right", fontsize=6)
    _finish(axes[0, 0], "precision at k of own memorization channels\n(dashed: baseline (a); dotted: chance)",
            "precision (%)", k_max)
    axes[0, 1].set_title("average precision minus baseline\n(circles: (a) paired; squares: (b) clean); 95% CI",
                         fontsize=9)
    axes[0, 1].set_ylabel("AP margin")
    axes[0, 1].grid(alpha=0.3)
    _finish(axes[0, 2], "noisy targets flipped (tied)", "targets predicted off their label (%)", k_max)
    axes[0, 3].set_title("held-out clean training accuracy drop\n(tied) at each method's own flip point", fontsize=9)
    axes[0, 3].set_ylabel("accuracy drop (points)")
    axes[0, 3].grid(alpha=0.3, axis="y")
    plots.legend_beside(axes[0, -1], axes[0, 0].get_legend_handles_labels(), fontsize=6)  # the methods' colours
    return plots.save(fig, path)


def plot_cost(results, cfg, path):
    """Cost vs quality: forward-equivalents per target (log scale) against the flip AUC on the plain
    model's noisy targets and against the ETD average-precision margin over baseline (a), with 95% CIs."""
    return plot_tradeoff(results["comparison"], results["methods"], cfg, path)


def plot_tradeoff(comparison, methods, cfg, path):
    if cfg.combine:  # over seeds: the subtitle names the inputs' configuration and seeds, not this command's
        from types import SimpleNamespace
        configs = [read_json(p)["config"] for p in cfg.combine]
        if all(c["seed"] == c["model_seed"] for c in configs):
            cfg = SimpleNamespace(**{**configs[0], "seeds": [c["seed"] for c in configs]})
    keys = [("auc", "area under the flip curve\n(plain model, noisy targets)"),
            ("ap_minus_a", "ETD average precision minus baseline (a)")]
    fig, axes = plots.figure("Localization methods: cost vs quality (per target; 95% CIs)", cfg, ncols=2,
                             panel=(5.2, 4.2))
    for ax, (key, title) in zip(axes[0], keys):
        for m in methods:
            cost, v = comparison[m].get("forward_equivalents"), comparison[m].get(key)
            if not cost or not v or not np.isfinite(v["value"]):
                continue
            x = max(cost["value"], 0.5)
            ci = v["ci"] if v["ci"] and np.isfinite(v["ci"][0]) else [v["value"]] * 2
            ax.errorbar(x, v["value"], yerr=[[v["value"] - ci[0]], [ci[1] - v["value"]]], fmt="o", color=COLORS[m],
                        capsize=2, label=LABELS[m])
        ax.set_xscale("log")
        ax.set_xlabel("forward-equivalents per target\n(example-forwards + 2 x backwards; log)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    plots.legend_beside(axes[0, -1], axes[0, 0].get_legend_handles_labels(), fontsize=6)  # the methods' colours
    return plots.save(fig, path)


def plot_convergence(results, cfg, path):
    """Each learned mask's loss (window means, relative to the first window) against Adam steps, one line
    per target and model; the title says how many stopped by the rule rather than at the step cap."""
    masks = [m for m in results["methods"] if m in MASKS]
    if not masks:
        return None
    every = results["plain"]["records"] + ((results["etd"] or {}).get("records") or [])
    fig, axes = plots.figure(f"Learned masks run to convergence (stopping rule: window {cfg.mask_window} steps, "
                             f"relative tolerance {cfg.mask_tol:g}, top {cfg.max_k} stable; cap {cfg.mask_max_steps})",
                             cfg, ncols=len(masks), panel=(3.8, 3.4))
    for ax, m in zip(axes[0], masks):
        facts = [r["methods"][m]["mask"] for r in every]
        for f in facts:
            t = np.array(f["trace"], dtype=float)
            if len(t):
                ax.plot(np.arange(1, len(t) + 1) * cfg.mask_window, t / (abs(t[0]) or 1), color=COLORS[m], lw=0.6,
                        alpha=0.5)
        n = sum(f["converged"] for f in facts)
        steps = np.median([f["steps"] for f in facts])
        ax.set_title(f"{LABELS[m]}\n{n}/{len(facts)} converged, median {steps:.0f} steps", fontsize=9)
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("loss / first window's")
        ax.grid(alpha=0.3)
    return plots.save(fig, path)


def _records(results):
    return results["plain"]["records"] + ((results["etd"] or {}).get("records") or [])


def combine(cfg):
    """The measured comparison over seeds: each seed's localization_methods.json (`combine` paths) ->
    the statistics of `compare` with CIs over seeds and targets, written as JSON and a cost-quality figure."""
    res = [read_json(p) for p in cfg.combine]
    comparison = compare(res, cfg.resamples)
    methods = [m for m in res[0]["methods"] if m in comparison]
    out = {"inputs": [str(p) for p in cfg.combine], "seeds": [r["config"]["seed"] for r in res],
           "config": {k: res[0]["config"][k] for k in ("dataset", "model", "width", "noise", "epochs")},
           "settings": res[0]["settings"], "n_examples": [r["config"]["n_examples"] for r in res],
           "tuning": [r["tuning"] for r in res], "comparison": comparison,
           "converged": {m: [sum(t["methods"][m]["mask"]["converged"] for t in _records(r)) for r in res]
                         for m in methods if m in MASKS},
           "mask_steps": {m: [t["methods"][m]["mask"]["steps"] for r in res for t in _records(r)]
                          for m in methods if m in MASKS},
           "targets": [{f"{model}/{kind}": sum((t["model"], t["kind"]) == (model, kind) for t in _records(r))
                        for model, kind in (("plain", "noisy"), ("plain", "clean"), ("etd", "noisy"), ("etd", "clean"),
                                            ("etd_base", "noisy"))} for r in res],
           "cost_seconds": [r["cost_seconds"] for r in res], "wall_seconds": [r["wall_seconds"] for r in res]}
    prefix = Path(cfg.combine_out)
    write_json(prefix.with_suffix(".json"), out)
    plot_tradeoff(comparison, list(comparison), cfg, prefix.with_name(prefix.name + "_cost.png"))
    print(measured_section(out))
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.name}_cost.png")
    return out


def measured_section(out):
    """The docs' measured block, from a combined JSON: what was measured, the comparison table, the masks'
    convergence and chosen penalties, seconds per target (tests check the docs hold it verbatim)."""
    masks = list(out["converged"])
    lines = [f"Seeds {out['seeds']}; targets per seed: " + "; ".join(
                 ", ".join(f"{k} {v}" for k, v in t.items()) for t in out["targets"]) + ".", "",
             comparison_table(out["comparison"]), "",
             "Masks stopped by the rule (not the cap): " + ", ".join(
                 f"{LABELS[m]} {sum(out['converged'][m])}/{len(out['mask_steps'][m])} (median "
                 f"{statistics.median(out['mask_steps'][m]):.0f} steps, max {max(out['mask_steps'][m])})" for m in masks) + ".",
             "Penalties chosen on the development targets, per seed: " + "; ".join(
                 ", ".join(f"{m} {t[m]['chosen']:g}" for m in t) for t in out["tuning"] if t) + ".",
             "Seconds per target (mean over both models' targets; 2 shared cores): " + ", ".join(
                 f"{m} {statistics.fmean(c[m] for c in out['cost_seconds']):.2f}" for m in out["cost_seconds"][0]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
