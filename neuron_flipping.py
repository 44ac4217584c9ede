"""Neuron flipping: how few units must be zeroed to flip a memorized prediction? (docs/protocol.md)

For `n_examples` noisy (mislabeled, memorized) and `n_examples` clean training examples, and as many
clean ones matched to the noisy ones on the model's margin, greedily zero the unit -- a conv filter,
or one BatchNorm / linear parameter -- that most raises the example's loss while keeping a reference
batch of other examples fit (first-order score w * dL/dw of the cross-entropy of the mean logits over
noised copies of the batch redrawn at every step, as the authors' code), until the prediction leaves
the training label. Then measure what the edit costs the other examples.
Paper: memorized examples flip after a handful of units, clean ones need many more; the units are
spread over the layers; the edit hurts the rest of the data little.

    python neuron_flipping.py [configs/preset.py] [--key=value ...]
"""
import itertools
import statistics
import time

import torch
from matplotlib.patches import Patch

from common import claims, cli, config, plots
from common.flipping import (OBJECTIVES, UNITS, Collateral, Units, candidates, collateral_sets, flip_batched,
                             flip_sequential, graph_rows, margins, nearest_on_margin, reference_batch,
                             refresh_batchnorm, summarize, zeroed_copy)
from common.data import KINDS as EXAMPLE_KINDS
from common.memorization import write_examples
from common.models import layer_groups
from common.runs import read_json, write_json
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
n_examples = 20         # target examples of each kind (noisy, clean, matched): distinct, seeded, fitted by the model
matched = True          # also n_examples clean targets matched to the noisy ones on the trained model's margin
                        # (kind "clean_matched": is it mislabeling, or a low margin, that flips easily?)
ref_batch = 511         # other training examples in each target's batch (fixed per target, seeded; the authors: 511)
unit = "channel"        # channel: a conv filter is one unit, other parameters per element (the authors) |
                        # channel_out: a conv's output channel after its BatchNorm | weight: every element
objective = "mean_logits"  # mean_logits: cross-entropy of the copies' mean logits (the authors' current code) |
                        # mean_loss: the mean of the copies' losses (their code before their fix, as in the paper)
max_units = 100         # give up after zeroing this many units (the example counts as not flipped)
n_eot = 5               # noised copies of the batch per step, redrawn every step (the authors: 5; 0: clean input)
eot_noise = 0.01        # each copy's noise norm as a fraction of the whole batch's norm (the authors: 1%)
bn_train = False        # first one train-mode pass over the training set re-estimates the BatchNorm statistics
                        # (what the authors' analysis script does; no parameter changes)
collateral_n = 300      # collateral damage measured on this many clean, noisy and test examples (0: all; no targets)
graph_gb = 0            # GiB for the autograd graph of one forward (larger steps run in pieces, one more forward);
                        # 0: auto, a quarter of a CUDA device's memory, elsewhere 1.5
batch_targets = 0       # targets searched together in one forward (per-target parameters); 0: auto, on CUDA as
                        # many as the graph memory holds (at most 16), elsewhere 1 (the plain loop; same answers)
n_show = 4              # examples of each kind shown in the examples figure
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("n_examples", 1, None)
config.range_check("ref_batch", 0, None)
config.choice_check("unit", UNITS)
config.choice_check("objective", OBJECTIVES)
config.range_check("max_units", 1, None)
config.range_check("n_eot", 0, None)
config.range_check("eot_noise", 0, None)
config.range_check("collateral_n", 0, None)
config.range_check("graph_gb", 0, None)
config.range_check("batch_targets", 0, None)
config.range_check("n_show", 0, None)
# Results computed under the same settings are reused by an interrupted or extended run.
SETTINGS = ("unit", "objective", "ref_batch", "max_units", "n_eot", "eot_noise", "bn_train", "collateral_n")
KINDS = ("noisy", "clean", "clean_matched")
MAX_SLOTS = 16          # batch_targets=0 on CUDA: at most this many targets in one forward
GRAPH_GB = 1.5          # graph_gb=0 off CUDA
VMAP_GRAPH = 2          # the batched search holds about this many times a step's graph per target (measured, CPU)


def results_file(cfg, ending=".json"):
    """neuron_flipping.json for the default unit and objective without the BatchNorm pass; a variant gets
    its own name (neuron_flipping_channel_out.json, neuron_flipping_bntrain.json,
    neuron_flipping_mean_loss.json, ...) so variants sit side by side. `ending`: ".partial.json",
    ".png", "_examples.png" for the files that go with it."""
    stem = "neuron_flipping"
    if cfg.unit != KNOBS["unit"]:
        stem += f"_{cfg.unit}"
    if getattr(cfg, "objective", KNOBS["objective"]) != KNOBS["objective"]:
        stem += f"_{cfg.objective}"
    if cfg.bn_train:
        stem += "_bntrain"
    return stem + ending


def graph_budget(graph_gb, device):
    """Bytes for the autograd graph of one forward: graph_gb GiB, or for 0 (auto) a quarter of a CUDA
    device's memory (processes may share the card), elsewhere GRAPH_GB."""
    if graph_gb:
        return graph_gb * 2 ** 30
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4
    return GRAPH_GB * 2 ** 30


def slots_for(batch_targets, device, rows, step_rows):
    """Targets per forward: batch_targets, or for 0 (auto) on CUDA as many whole steps (step_rows input
    rows each, VMAP_GRAPH times over) as `rows` holds, at most MAX_SLOTS, and 1 elsewhere
    (docs/experiments/neuron_flipping.md)."""
    if batch_targets:
        return batch_targets
    return max(1, min(MAX_SLOTS, rows // (VMAP_GRAPH * step_rows))) if device.type == "cuda" else 1


def make_record(data, index, kind, units, result, after, drop, margin, seconds, search):
    """The JSON record of one searched target. A search that zeroed nothing means the target was not
    fitted when the search judged it, which the caller must have ruled out: an error, never a record."""
    if not result.units:
        raise ValueError(f"target {index}: a record with 0 units (its prediction was not its training label "
                         f"before any edit); such a target must be passed over, not recorded")
    return {"index": index, "kind": kind, "example_kind": EXAMPLE_KINDS[int(data.kind[index])],  # mislabeled/atypical/typical
            "label": int(data.y_train[index]), "true_label": int(data.y_true[index]),
            "margin": margin,  # logit of the training label minus the largest other logit, the unedited model
            "n_units": len(result.units), "flipped": result.flipped, "prediction": result.prediction,
            "units": [units.describe(u) for u in result.units],
            "accuracy_after": after, "accuracy_drop": drop,  # on the evaluation sets, this example left out
            "search": search,  # the implementation that searched: "sequential" or "batched"
            "seconds": round(seconds, 3)}


def plan_targets(cfg, order, margin, records, passed_over):
    """({kind: [chosen index, ...]}, [(index, kind) still to search]): per kind the first n_examples
    candidates of its seeded order that are not passed over, noisy and clean interleaved (a partial run
    is balanced); once the noisy targets are settled, for each of them in order the clean candidate
    nearest to it on the margin, not matched before (clean_matched). A candidate not yet searched
    ends a kind's list: it is to search."""
    chosen, todo = {}, {}
    for kind in order:  # noisy, (atypical,) clean: common.flipping.target_kinds
        chosen[kind], todo[kind] = [], []
        for index in order[kind]:
            if len(chosen[kind]) + len(todo[kind]) == cfg.n_examples:
                break
            if index not in passed_over:
                (chosen if index in records else todo)[kind].append(index)
    if cfg.matched and not todo["noisy"]:
        chosen["clean_matched"], todo["clean_matched"], taken = [], [], set(passed_over)
        for j in chosen["noisy"]:
            index = nearest_on_margin(margin, float(margin[j]), order["clean"], taken)
            if index is None:
                break
            taken.add(index)
            (chosen if index in records else todo)["clean_matched"].append(index)
    interleaved = [(i, kind) for group in itertools.zip_longest(*todo.values()) for i, kind in zip(group, todo)
                   if i is not None]
    first = {}  # an example wanted by two kinds is searched once
    return chosen, [(i, kind) for i, kind in interleaved if first.setdefault(i, kind) == kind]


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
    margin = margins(model, data)
    fits = (margin > 0).to(data.device)
    order = candidates(data, fits, cfg.seed)
    for kind, pool in order.items():
        if len(pool) < cfg.n_examples:
            kind = "atypical (the memorized set)" if kind == "noisy" and data.memorized == "atypical" else kind
            raise cli.UserError(f"n_examples={cfg.n_examples}, but only {len(pool)} {kind} training examples are "
                                f"predicted with their training label; pass --n_examples={len(pool)} or less")
    noisy_fit = float(fits[data.noisy].float().mean()) if bool(data.noisy.any()) else float("nan")
    if not noisy_fit >= claims.MEMORIZED:
        print(f"warning: the model predicts {plots.pct(noisy_fit)} of the noisy training examples with their noisy label "
              f"(< {claims.MEMORIZED:.0%}): it has not memorized them, so what flipping them shows is inconclusive "
              f"for claim 4 (train longer, or a larger model)")
    collateral = Collateral(model, data, collateral_sets(data, cfg.collateral_n, cfg.seed))
    baseline = collateral.accuracies(collateral.before)
    x0 = data.batch(reference_batch(data.n_train, 0, min(2, data.n_train - 1), cfg.seed))
    rows = graph_rows(model, x0, graph_budget(cfg.graph_gb, data.device))
    step_rows = max(cfg.n_eot, 1) * (1 + cfg.ref_batch)
    slots = slots_for(cfg.batch_targets, data.device, rows, step_rows)
    searcher = "batched" if slots > 1 else "sequential"
    print(f"{run.dir.name}: {len(units)} units ({cfg.unit}); " + " + ".join(f"{cfg.n_examples} {k}" for k in order) +
          f" {'+ ' + str(cfg.n_examples) + ' margin-matched clean ' if cfg.matched else ''}targets, batch of "
          f"1 + {cfg.ref_batch}, {cfg.n_eot} noised copies, objective {cfg.objective}, "
          f"{f'{slots} targets per forward' if slots > 1 else 'one target at a time'}"
          f"{f', steps in pieces of {rows} rows' if rows < step_rows * slots else ''}; before any edit: "
          f"clean {plots.pct(baseline['clean'])}  noisy {plots.pct(baseline['noisy'])}  test {plots.pct(baseline['test'])}")

    # Resume: records of an interrupted (or smaller) run with the same settings are kept (whichever
    # implementation searched them: both give the same answers). Records are keyed by example: a clean
    # example that is also a margin-matched target is searched once.
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    partial_path, final_path = run.path(results_file(cfg, ".partial.json")), run.path(results_file(cfg))
    records, passed_over = {}, {}
    for path in (final_path, partial_path):
        if path.is_file():
            saved = read_json(path)
            if saved.get("settings") == settings:
                records.update({r["index"]: r for r in saved.get("records", [])})
                passed_over.update({p["index"]: p for p in saved.get("passed_over", [])})
    before = set(records)

    def jobs(todo):
        for index, kind in todo:
            idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
            yield (index, kind), data.batch(idx), data.labels(idx), (cfg.seed, index)

    def searched(todo):
        """(index, kind, FlipResult) as each target of `todo` is searched."""
        if slots == 1:
            for (index, kind), x, y, noise_key in jobs(todo):
                yield index, kind, flip_sequential(model, units, x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise,
                                                   noise_key, cfg.objective, rows)
        else:
            for (index, kind), result in flip_batched(model, units, jobs(todo), slots, cfg.max_units, cfg.n_eot,
                                                      cfg.eot_noise, cfg.objective):
                yield index, kind, result

    # Targets: see plan_targets. A candidate that the search's own first step finds mispredicted (noise can
    # do that to a borderline example) is passed over and listed, and the next one taken: rounds of
    # searches until every kind has its targets. Every finished example is saved at once.
    with cli.progress(total=(len(order) + cfg.matched) * cfg.n_examples, desc="examples") as bar:
        while True:
            chosen, todo = plan_targets(cfg, order, margin, records, passed_over)
            bar.n = sum(map(len, chosen.values()))
            bar.refresh()
            if not todo:
                break
            t0 = time.time()
            for index, kind, result in searched(todo):
                if not result.units:
                    passed_over[index] = {"index": index, "kind": kind}
                else:
                    changed = units.changed(result.units)  # the edit runs from its first changed stage
                    after, drop = collateral(zeroed_copy(model, units, result.units), changed, index)
                    records[index] = make_record(data, index, kind, units, result, after, drop, float(margin[index]),
                                                 time.time() - t0, searcher)  # the time since the last finished
                    bar.update()
                t0 = time.time()
                write_json(partial_path, {"settings": settings, "records": list(records.values()),
                                          "passed_over": list(passed_over.values())})
    for kind in tuple(order) + (("clean_matched",) if cfg.matched else ()):
        if len(chosen[kind]) < cfg.n_examples:
            n = len(chosen[kind])
            raise cli.UserError(f"n_examples={cfg.n_examples}, but only {n} {kind} examples keep their training "
                                f"label on their noised copies; pass --n_examples={n} or less")
    reused = len(before & {i for group in chosen.values() for i in group})
    if reused:
        print(f"resumed: {reused} examples were already done")

    matched_to = dict(zip(chosen.get("clean_matched", []), chosen["noisy"]))
    bare = lambda i: {k: v for k, v in records[i].items() if k != "matched_to"}  # a record read back may carry one
    chosen_records = [{**bare(i), "kind": kind, **({"matched_to": matched_to[i]} if kind == "clean_matched" else {})}
                      for group in itertools.zip_longest(*chosen.values()) for i, kind in zip(group, chosen)
                      if i is not None]
    kinds = list(chosen)
    results = {"config": vars(cfg), "settings": settings, "n_units_total": len(units),
               "search": searcher,  # what this invocation searches with (each record names its own)
               "groups": [g for g, _ in layer_groups(model)], "baseline": baseline,
               "noisy_fit": noisy_fit,  # share of all noisy training examples predicted with their noisy label
               "eval_sizes": {k: len(v) for k, v in collateral.sets.items()},
               "summary": summarize(chosen_records, baseline, cfg.max_units),
               "seconds": round(sum(records[i]["seconds"] for i in {r["index"] for r in chosen_records}), 2),
               "seconds_per_target": {kind: round(statistics.fmean(r["seconds"] for r in chosen_records
                                                                   if r["kind"] == kind), 2) for kind in kinds},
               "passed_over": list(passed_over.values()),  # mispredicted on their noised copies before any edit
               "records": chosen_records}
    write_json(final_path, results)
    write_examples(run, data)  # examples.csv: this experiment's per-example results beside the scores
    if partial_path.is_file():
        partial_path.unlink()

    print_summary(results)
    plot_summary(results, cfg, run.path(results_file(cfg, ".png")))
    plot_examples(results, data, cfg, run.path(results_file(cfg, "_examples.png")))
    per = ", ".join(f"{results['seconds_per_target'][k]:.1f} s per {k}" for k in kinds)
    print(f"wrote {final_path} and its figures {run.path(results_file(cfg, '.png'))}, "
          f"{run.path(results_file(cfg, '_examples.png'))} ({results['seconds']:.0f} s of search and evaluation: "
          f"{per} target; {len(passed_over)} candidates passed over)")
    return results


def print_summary(results):
    s = results["summary"]
    print(f"\n{'':<13} {'flipped':>8} {'units: median':>14} {'mean':>6} {'q1-q3':>8} {'layers/ex':>10} "
          f"{'-> true label':>14}   accuracy drop (percentage points): clean / noisy / test")
    for kind in s:
        k = s[kind]
        drop = k["accuracy_drop"]
        print(f"{kind:<13} {plots.pct(k['flipped'], 8)} {k['units_median']:>14g} {k['units_mean']:>6.1f} "
              f"{k['units_q1']:>3g}-{k['units_q3']:<4g} {k['groups_per_example']:>10.1f} "
              f"{plots.pct(k['to_true_label'], 14)}   "
              f"{100 * drop['clean']:+.1f} / {100 * drop['noisy']:+.1f} / {100 * drop['test']:+.1f}")


def plot_summary(results, cfg, path):
    """Units needed (CDF), where the zeroed units are (layer groups), and the collateral accuracy drop."""
    records, s, groups = results["records"], results["summary"], results["groups"]
    color = {"noisy": plots.COLORS["noisy"], "atypical": plots.COLORS["atypical"], "clean": plots.COLORS["clean"],
             "clean_matched": plots.COLORS["clean"]}
    bars = [k for k in ("noisy", "atypical", "clean") if k in s]  # the kinds side by side in the bar panels
    w = 0.8 / len(bars)
    fig, axes = plots.figure(f"Neuron flipping: units zeroed to flip a training prediction ({cfg.unit} units)",
                             cfg, ncols=3, panel=(5.0, 3.9))
    ax = axes[0, 0]
    for kind in s:
        counts = sorted(r["n_units"] for r in records if r["kind"] == kind and r["flipped"])
        n = sum(r["kind"] == kind for r in records)
        cum = [100 * (i + 1) / n for i in range(len(counts))]
        ax.step([0] + counts + [cfg.max_units], [0] + cum + [cum[-1] if cum else 0], where="post", color=color[kind],
                ls="--" if kind == "clean_matched" else "-",
                label=f"{kind.replace('_', ', margin-')} (median {s[kind]['units_median']:g})")
    ax.set_xscale("symlog", linthresh=1)
    flipped = [r["n_units"] for r in records if r["flipped"]]
    plots.integer_ticks(ax, [0] + flipped + [cfg.max_units], keep=[s[k]["units_median"] for k in s])
    ax.set_xlabel(f"units zeroed (cap {cfg.max_units})")
    ax.set_ylabel("examples flipped (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    plots.legend_beside(ax)  # a curve that stops rising (targets not flipped) runs along the bottom to the cap
    ax.set_title("units needed to flip (CDF)", fontsize=10)

    ax = axes[0, 1]
    xs = list(range(len(groups)))
    for j, kind in enumerate(bars):
        frac = s[kind]["group_fraction"]
        ax.bar([x + (j - (len(bars) - 1) / 2) * w for x in xs], [100 * frac.get(g, 0) for g in groups], w, color=color[kind],
               label=f"{kind} ({s[kind]['groups_per_example']:.1f} groups per example)")
    ax.set_xticks(xs)
    ax.set_xticklabels(groups, rotation=45, fontsize=8)
    ax.set_xlabel("layer group (input -> output)")
    ax.set_ylabel("zeroed units in this group (%)")
    ax.grid(alpha=0.3, axis="y")
    plots.legend_beside(ax)
    ax.set_title("where the zeroed units are", fontsize=10)

    ax = axes[0, 2]
    splits = ("clean", "noisy", "test")
    for j, kind in enumerate(bars):
        drops = [[100 * r["accuracy_drop"][k] for r in records if r["kind"] == kind]
                 for k in splits]
        means = [sum(d) / len(d) for d in drops]
        sd = [(sum((v - m) ** 2 for v in d) / max(1, len(d) - 1)) ** 0.5 for d, m in zip(drops, means)]
        ax.bar([x + (j - (len(bars) - 1) / 2) * w for x in range(3)], means, w, yerr=sd, capsize=3, color=color[kind],
               label=f"after flipping a {kind} example")
    ax.set_xticks(range(3))
    ax.set_xticklabels([plots.LABELS[k].replace(" (noisy label = memorized)", "\n(noisy label)") for k in splits],
                       fontsize=8)
    ax.set_xlabel("evaluated on (other examples)")
    ax.set_ylabel("accuracy drop (percentage points, mean +- sd)")
    ax.axhline(0, color="black", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    plots.legend_beside(ax)
    ax.set_title("collateral damage of the edit", fontsize=10)
    return plots.save(fig, path)


def plot_examples(results, data, cfg, path):
    """A few targets of each kind: image, training label, true label, prediction after the edit."""
    kinds = [k for k in ("noisy", "atypical", "clean") if k in results["summary"]]
    shown = [r for kind in kinds
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
    fig.legend(handles=[Patch(color=plots.COLORS[k], label=f"{k} target") for k in kinds],
               loc="lower center", ncol=len(kinds), fontsize=8)
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
