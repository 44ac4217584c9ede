"""Neuron flipping: how few units must be zeroed to flip a memorized prediction? (docs/protocol.md)

For `n_examples` noisy (mislabeled, memorized) and `n_examples` clean training examples, greedily zero
the unit -- a conv filter, or one BatchNorm / linear parameter -- that most raises the example's loss
while keeping a reference batch of other examples fit (first-order score w * dL/dw, on noised copies
of the batch redrawn at every step, as the authors), until the prediction leaves the training label.
Then measure what the edit costs the other examples.
Paper: memorized examples flip after a handful of units, clean ones need many more; the units are
spread over the layers; the edit hurts the rest of the data little.

    python neuron_flipping.py [configs/preset.py] [--key=value ...]
"""
import time

import torch
from matplotlib.patches import Patch
from tqdm.auto import tqdm

from common import cli, config, plots
from common.evaluation import predict
from common.flipping import (UNITS, Collateral, Flipper, Units, candidates, collateral_sets, flip_sequential,
                             reference_batch, refresh_batchnorm, summarize, zeroed_copy)
from common.models import layer_groups
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
n_examples = 20         # target examples of each kind (noisy, clean): distinct, seeded, fitted by the model
ref_batch = 511         # other training examples in each target's batch (fixed per target, seeded; the authors: 511)
unit = "channel"        # channel: a conv filter is one unit, other parameters per element (the authors) |
                        # channel_out: a conv's output channel after its BatchNorm | weight: every element
max_units = 100         # give up after zeroing this many units (the example counts as not flipped)
n_eot = 5               # noised copies of the batch per step, redrawn every step (the authors: 5; 0: clean input)
eot_noise = 0.01        # each copy's noise norm as a fraction of the whole batch's norm (the authors: 1%)
bn_train = False        # first one train-mode pass over the training set re-estimates the BatchNorm statistics
                        # (what the authors' analysis script does; no parameter changes)
collateral_n = 300      # collateral damage measured on this many clean, noisy and test examples (0: all; no targets)
fast = None             # the search: None or "auto": the fast exact path on a CPU, the authors' plain loop
                        # on CUDA / MPS (where it is not faster) | True: the fast path | False: the plain loop
                        # (the same answers either way)
n_show = 4              # examples of each kind shown in the examples figure
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("n_examples", 1, None)
config.range_check("ref_batch", 0, None)
config.choice_check("unit", UNITS)
config.range_check("max_units", 1, None)
config.range_check("n_eot", 0, None)
config.range_check("eot_noise", 0, None)
config.range_check("collateral_n", 0, None)
config.range_check("n_show", 0, None)
config.register_check("fast", lambda v, cfg: None if isinstance(v, bool) or v in (None, "auto") else
                      f"fast={v!r}: pass --fast=auto (on a CPU the fast path, elsewhere the plain loop), "
                      f"--fast=True or --fast=False")
# Results computed under the same settings are reused by an interrupted or extended run.
SETTINGS = ("unit", "ref_batch", "max_units", "n_eot", "eot_noise", "bn_train", "collateral_n")


def results_file(cfg, ending=".json"):
    """neuron_flipping.json for the default unit without the BatchNorm pass; a variant gets its own name
    (neuron_flipping_channel_out.json, neuron_flipping_bntrain.json, ...) so variants sit side by side.
    `ending`: ".partial.json", ".png", "_examples.png" for the files that go with it."""
    stem = "neuron_flipping"
    if cfg.unit != KNOBS["unit"]:
        stem += f"_{cfg.unit}"
    if cfg.bn_train:
        stem += "_bntrain"
    return stem + ending


def use_fast(fast, device):
    """Whether the search runs the fast exact path (Flipper) rather than the plain loop on `device`:
    `fast` itself, or for auto (None, "auto") on a CPU only (docs/experiments/neuron_flipping.md)."""
    return fast if isinstance(fast, bool) else device.type == "cpu"


def make_record(data, index, kind, units, result, after, drop, settled, seconds, search):
    """The JSON record of one searched target. A search that zeroed nothing means the target was not
    fitted when the search judged it, which the caller must have ruled out: an error, never a record."""
    if not result.units:
        raise ValueError(f"target {index}: a record with 0 units (its prediction was not its training label "
                         f"before any edit); such a target must be passed over, not recorded")
    return {"index": index, "kind": kind, "label": int(data.y_train[index]), "true_label": int(data.y_true[index]),
            "n_units": len(result.units), "flipped": result.flipped, "prediction": result.prediction,
            "units": [units.describe(u) for u in result.units],
            "accuracy_after": after, "accuracy_drop": drop,  # on the evaluation sets, this example left out
            "reference_steps": settled,  # greedy steps decided by the reference computation (near-ties)
            "search": search,  # the implementation that searched: "fast" (Flipper) or "sequential"
            "seconds": round(seconds, 3)}


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    model, data, run = trained_run(cfg)
    if cfg.bn_train:
        refresh_batchnorm(model, data, cfg.batch_size)
    model.eval()
    units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
    if cfg.max_units > len(units):
        raise cli.UserError(f"max_units={cfg.max_units}, but the model has only {len(units)} units; "
                            f"pass --max_units={len(units)} or less")

    # Candidates: training examples whose training label the model predicts (strict fp32, like the search).
    with strict_fp32():
        fits = predict(model, data, "train", amp=False) == data.y_train
    order = candidates(data, fits, cfg.seed)
    for kind, pool in order.items():
        if len(pool) < cfg.n_examples:
            raise cli.UserError(f"n_examples={cfg.n_examples}, but only {len(pool)} {kind} training examples are "
                                f"predicted with their training label; pass --n_examples={len(pool)} or less")
    collateral = Collateral(model, data, collateral_sets(data, cfg.collateral_n, cfg.seed))
    baseline = collateral.accuracies(collateral.before)
    fast = use_fast(cfg.fast, data.device)
    searcher = "fast" if fast else "sequential"
    print(f"{run.dir.name}: {len(units)} units ({cfg.unit}); {cfg.n_examples} noisy + {cfg.n_examples} clean "
          f"targets, batch of 1 + {cfg.ref_batch}, {cfg.n_eot} noised copies, {searcher} search; before any edit: clean "
          f"{baseline['clean']:.3f}  noisy {baseline['noisy']:.3f}  test {baseline['test']:.3f}")

    # Resume: records of an interrupted (or smaller) run with the same settings are kept (whichever
    # implementation searched them: both give the same answers, so `fast` is not a setting).
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    partial_path, final_path = run.path(results_file(cfg, ".partial.json")), run.path(results_file(cfg))
    records, passed_over = {}, {}
    for path in (final_path, partial_path):
        if path.is_file():
            saved = read_json(path)
            if saved.get("settings") == settings:
                records.update({r["index"]: r for r in saved.get("records", [])})
                passed_over.update({p["index"]: p for p in saved.get("passed_over", [])})

    def search(index, kind):
        """The greedy search for one target and its collateral damage: a record, or None where the search
        finds the target not predicted with its training label to begin with (on its noised copies)."""
        t0 = time.time()
        idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
        x, y = data.batch(idx), data.labels(idx)
        args = (x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise, (cfg.seed, index))
        settled = flipper.exact_steps if fast else 0
        result = flipper.flip(*args) if fast else flip_sequential(model, units, *args)
        settled = flipper.exact_steps - settled if fast else len(result.units)
        if not result.units:
            return None
        changed = units.changed(result.units)  # the edit runs from its first changed stage
        after, drop = collateral(zeroed_copy(model, units, result.units), changed, index)
        return make_record(data, index, kind, units, result, after, drop, settled, time.time() - t0, searcher)

    # Targets: the candidates of each kind in their seeded order, interleaved noisy, clean, noisy, ...; a
    # candidate that the search's own first step finds mispredicted (noise can do that to a borderline
    # example) is passed over and listed. Every finished example is saved at once.
    flipper = Flipper(model, units) if fast else None
    targets, reused, pools = [], 0, {kind: iter(order[kind]) for kind in order}
    with tqdm(total=2 * cfg.n_examples, desc="examples", disable=None) as bar:
        for kind in ("noisy", "clean") * cfg.n_examples:
            for index in pools[kind]:
                if index in records:
                    reused += 1
                elif index not in passed_over:
                    record = search(index, kind)
                    if record is None:
                        passed_over[index] = {"index": index, "kind": kind}
                    else:
                        records[index] = record
                    write_json(partial_path, {"settings": settings, "records": list(records.values()),
                                              "passed_over": list(passed_over.values())})
                if index in records:
                    targets.append((index, kind))
                    bar.update()
                    break
            else:
                n = sum(k == kind for _, k in targets)
                raise cli.UserError(f"n_examples={cfg.n_examples}, but only {n} {kind} examples keep their training "
                                    f"label on their noised copies; pass --n_examples={n} or less")
    if reused:
        print(f"resumed: {reused} examples were already done")

    chosen = [records[i] for i, _ in targets]
    results = {"config": vars(cfg), "settings": settings, "n_units_total": len(units),
               "search": searcher,  # what this invocation searches with (each record names its own)
               "groups": [g for g, _ in layer_groups(model)], "baseline": baseline,
               "eval_sizes": {k: len(v) for k, v in collateral.sets.items()},
               "summary": summarize(chosen, baseline, cfg.max_units),
               "seconds": round(sum(r["seconds"] for r in chosen), 2),  # search + collateral
               "seconds_per_target": {kind: round(sum(r["seconds"] for r in chosen if r["kind"] == kind)
                                                  / cfg.n_examples, 2) for kind in ("noisy", "clean")},
               "passed_over": list(passed_over.values()),  # mispredicted on their noised copies before any edit
               "records": chosen}
    write_json(final_path, results)
    if partial_path.is_file():
        partial_path.unlink()

    print_summary(results)
    plot_summary(results, cfg, run.path(results_file(cfg, ".png")))
    plot_examples(results, data, cfg, run.path(results_file(cfg, "_examples.png")))
    print(f"wrote {final_path} and its figures ({results['seconds']:.0f} s of search and evaluation: "
          f"{results['seconds_per_target']['noisy']:.1f} s per noisy, {results['seconds_per_target']['clean']:.1f} s "
          f"per clean target; {sum(r['reference_steps'] for r in chosen)} of {sum(r['n_units'] for r in chosen)} "
          f"steps settled by the reference computation; {len(passed_over)} candidates passed over)")
    return results


def print_summary(results):
    s = results["summary"]
    print(f"\n{'':<6} {'flipped':>8} {'units: median':>14} {'mean':>6} {'q1-q3':>8} {'layers/ex':>10} "
          f"{'-> true label':>14}   accuracy drop (percentage points): clean / noisy / test")
    for kind in ("noisy", "clean"):
        k = s[kind]
        drop = k["accuracy_drop"]
        print(f"{kind:<6} {plots.pct(k['flipped'], 8)} {k['units_median']:>14g} {k['units_mean']:>6.1f} "
              f"{k['units_q1']:>3g}-{k['units_q3']:<4g} {k['groups_per_example']:>10.1f} "
              f"{plots.pct(k['to_true_label'], 14)}   "
              f"{100 * drop['clean']:+.1f} / {100 * drop['noisy']:+.1f} / {100 * drop['test']:+.1f}")


def plot_summary(results, cfg, path):
    """Units needed (CDF), where the zeroed units are (layer groups), and the collateral accuracy drop."""
    records, s, groups = results["records"], results["summary"], results["groups"]
    color = {"noisy": plots.COLORS["noisy"], "clean": plots.COLORS["clean"]}
    fig, axes = plots.figure(f"Neuron flipping: units zeroed to flip a training prediction ({cfg.unit} units)",
                             cfg, ncols=3, panel=(5.0, 3.9))
    ax = axes[0, 0]
    for kind in ("noisy", "clean"):
        counts = sorted(r["n_units"] for r in records if r["kind"] == kind and r["flipped"])
        n = sum(r["kind"] == kind for r in records)
        cum = [100 * (i + 1) / n for i in range(len(counts))]
        ax.step([0] + counts + [cfg.max_units], [0] + cum + [cum[-1] if cum else 0], where="post", color=color[kind],
                label=f"{kind} (median {s[kind]['units_median']:g})")
    ax.set_xscale("symlog", linthresh=1)
    flipped = [r["n_units"] for r in records if r["flipped"]]
    plots.integer_ticks(ax, [0] + flipped + [cfg.max_units], keep=[s[k]["units_median"] for k in ("noisy", "clean")])
    ax.set_xlabel(f"units zeroed (cap {cfg.max_units})")
    ax.set_ylabel("examples flipped (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # the curves start at the lower left and rise to the upper right
    ax.set_title("units needed to flip (CDF)", fontsize=10)

    ax = axes[0, 1]
    xs = list(range(len(groups)))
    for j, kind in enumerate(("noisy", "clean")):
        frac = s[kind]["group_fraction"]
        ax.bar([x + (j - 0.5) * 0.4 for x in xs], [100 * frac.get(g, 0) for g in groups], 0.4, color=color[kind],
               label=f"{kind} ({s[kind]['groups_per_example']:.1f} groups per example)")
    ax.set_xticks(xs)
    ax.set_xticklabels(groups, rotation=45, fontsize=8)
    ax.set_xlabel("layer group (input -> output)")
    ax.set_ylabel("zeroed units in this group (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("where the zeroed units are", fontsize=10)

    ax = axes[0, 2]
    splits = ("clean", "noisy", "test")
    for j, kind in enumerate(("noisy", "clean")):
        drops = [[100 * r["accuracy_drop"][k] for r in records if r["kind"] == kind]
                 for k in splits]
        means = [sum(d) / len(d) for d in drops]
        sd = [(sum((v - m) ** 2 for v in d) / max(1, len(d) - 1)) ** 0.5 for d, m in zip(drops, means)]
        ax.bar([x + (j - 0.5) * 0.4 for x in range(3)], means, 0.4, yerr=sd, capsize=3, color=color[kind],
               label=f"after flipping a {kind} example")
    ax.set_xticks(range(3))
    ax.set_xticklabels([plots.LABELS[k].replace(" (noisy label = memorized)", "\n(noisy label)") for k in splits],
                       fontsize=8)
    ax.set_xlabel("evaluated on (other examples)")
    ax.set_ylabel("accuracy drop (percentage points, mean +- sd)")
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("collateral damage of the edit", fontsize=10)
    return plots.save(fig, path)


def plot_examples(results, data, cfg, path):
    """A few targets of each kind: image, training label, true label, prediction after the edit."""
    shown = [r for kind in ("noisy", "clean")
             for r in [r for r in results["records"] if r["kind"] == kind][:cfg.n_show]]
    fig, axes = plots.figure("Neuron flipping: examples (train = training label, true = original label)", cfg,
                             ncols=max(1, len(shown)), panel=(1.9, 2.3))
    for ax, r in zip(axes.flat, shown):
        img = data.x_train[r["index"]].cpu().numpy()
        ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
        units = f"{r['n_units']} unit{'s' if r['n_units'] != 1 else ''}"
        status = units if r["flipped"] else f"not flipped after {units}"
        back = " = true" if r["kind"] == "noisy" and r["prediction"] == r["true_label"] else ""
        ax.set_title(f"{r['kind']} #{r['index']}\ntrain {r['label']}, true {r['true_label']}\n"
                     f"now {r['prediction']}{back} ({status})", fontsize=8, color=plots.COLORS[r["kind"]])
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes[0, 0].set_xlabel("28 x 28 input" if data.image_size == 28 else "input image", fontsize=8)
    axes[0, 0].set_ylabel("target example", fontsize=8)
    fig.legend(handles=[Patch(color=plots.COLORS[k], label=f"{k} target") for k in ("noisy", "clean")],
               loc="lower center", ncol=2, fontsize=8)
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
