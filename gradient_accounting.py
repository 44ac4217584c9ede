"""Gradient accounting: how much of each layer's gradient comes from the memorized examples?

Trains the run (this script is its trainer: its checkpoints are the ones the other experiments
reuse) and splits every minibatch gradient exactly into the part of its clean examples and the part
of its mislabeled ("noisy", memorized) examples; a control group (a seeded random subset of the
clean examples, as large as the noisy set) is accounted as its own part: total = clean-rest +
control + noisy; so is a loss-matched control, chosen before every epoch: for each noisy example the
clean example whose loss (at the start of the epoch) is nearest, without replacement. Per layer
group and epoch: the norms of the epoch's gradient sums of each part, the same per example, and the
cosines clean/noisy, clean-rest/noisy, control/clean-rest and loss-matched/the other clean.
Paper: the 10% noisy examples carry a gradient comparable to the 90% clean ones, in every layer, and
point against them (negative cosine) while they are being memorized. The control shows what any
10% of the data would carry, the loss-matched control what equally hard clean examples carry; the
claim's rule is in docs/protocol.md ("How each claim is judged").
With memorized=both the noisy part (the memorized set) is also reported split by kind: mislabeled and
atypical clean, beside the typical clean part (docs/experiments/atypical.md).

    python gradient_accounting.py [configs/preset.py] [--key=value ...]
"""
import math

import numpy as np
import torch

from common import claims, cli, config, plots
from common.accounting import (GradientAccountant, accounted_prefix, control_mask, epoch_table, example_losses,
                               loss_matched_mask, memorization_phase, summarize)
from common.cli import UserError
from common.data import KINDS, load_data
from common.memorization import write_examples
from common.models import model_for
from common.plots import COLORS, LABELS, accuracy_curves, figure, save
from common.rewinding import auto_rewind_epochs
from common.runs import Run, write_json
from common.training import pick_device, train_run

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
window = 5              # epochs per panel of the norm-per-layer figures (besides the all-epochs panel)
keep_checkpoints = "all"  # all | needed: once trained, keep only epoch 0, the automatic rewind epochs and the
                          # final epoch (what rewinding and retraining use by default; see docs/reliability.md, "Disk")
memorized_at = 0.9      # noisy-train accuracy (noisy labels) that ends the memorization phase
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("window", 1, None)
config.choice_check("keep_checkpoints", ("all", "needed"))
config.range_check("memorized_at", 0, 1, lo_open=True)

SERIES = ("total", "clean", "noisy", "control", "matched")
SPLIT_SERIES = ("mislabeled", "atypical")  # the noisy part by kind, with memorized=both (appended to SERIES then)
SERIES_COLORS = {**COLORS, "control": "tab:gray", "matched": "tab:purple"}
SERIES_LABELS = {"total": LABELS["total"], "clean": "clean part", "noisy": "noisy part",
                 "control": "control part (random clean, as many as noisy)",
                 "matched": "loss-matched control part (clean, as hard as noisy)",
                 "mislabeled": "mislabeled part (of noisy)", "atypical": "atypical clean part (of noisy)"}
SPLIT_DEFINITIONS = {
    "split": "memorized=both: the memorized set (noisy) holds mislabeled and atypical clean examples; clean = the "
             "typical clean examples. noisy = mislabeled + atypical, each part accounted like the others "
             "(atypical by its own backward, mislabeled = noisy - atypical)",
    "norm_mislabeled, norm_atypical": "norm_* of the mislabeled and atypical parts (per_example_*: over n_mislabeled, "
                                      "n_atypical)",
    "cosine_clean_mislabeled, cosine_clean_atypical, cosine_mislabeled_atypical": "cosines of those sums",
    "share_*": "a part's share of the total gradient, <part, total> / |total|^2 (the total's squared norm split "
               "exactly): share_clean + share_mislabeled + share_atypical = 1, share_mislabeled + share_atypical "
               "= share_noisy"}


def restart_epoch(cfg):
    """(k, last saved epoch): training (re)starts after epoch k, the last epoch of the contiguous
    accounted prefix that has a checkpoint (0 if none). Epochs after it that were trained without
    accounting (e.g. by another script) are re-trained: bit-identical checkpoints on a CPU."""
    run = Run(cfg)
    try:
        run.check_config()
    except UserError:
        return 0, 0  # another configuration: train_run refuses it, or (overwrite) moves it aside
    saved = set(run.saved_epochs())
    split = getattr(cfg, "memorized", "noisy") == "both"  # accounted with the atypical split (split_mask)
    k = max([e for e in range(accounted_prefix(run.metrics(), control=True, matched=True, split=split) + 1)
             if e in saved], default=0)
    return k, max(saved, default=0)


def split_mask(data):
    """The atypical clean examples inside the memorized set when it holds two kinds (memorized=both):
    the accountant splits the noisy part into mislabeled and atypical; None otherwise (one kind: no split)."""
    return data.kind == KINDS.index("atypical") if getattr(data, "memorized", "noisy") == "both" else None


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    data = load_data(cfg, pick_device(cfg.device))
    net = model_for(cfg, data)
    control = control_mask(data.noisy, cfg.seed)  # seeded by the data seed: the same examples for every model
    accountant = GradientAccountant(net, data.noisy, control=control, matched=True, atypical=split_mask(data))
    # The accounting of each epoch is returned by on_epoch and stored in that epoch's metrics row
    # and checkpoint: a crash can never separate the numbers from the weights they describe.
    start, trained = restart_epoch(cfg)
    if start < trained:
        print(f"epochs {start + 1}..{trained} were trained without gradient accounting (with its control groups): "
              f"re-training them with it"
              + (" (bit-identical checkpoints on a CPU)" if data.device.type == "cpu" else
                 f" (on {data.device.type} the new checkpoints may differ slightly: non-deterministic kernels)"))
    if start:  # the model training restarts from (a fresh model is epoch 0's)
        Run(cfg).load_model(net, start)

    def match():  # the loss-matched control of the next epoch, from the losses of the model as it starts it
        accountant.match(*loss_matched_mask(example_losses(net, data, amp=cfg.amp), data.noisy))

    def on_epoch(epoch):
        out = accountant.end_epoch(epoch)
        match()
        return out

    match()
    net, data, run = train_run(cfg, data=data, model=net, backward=accountant.backward,
                               on_epoch=on_epoch, restart_from=start)
    if cfg.keep_checkpoints == "needed":
        run.prune_checkpoints({0, cfg.epochs, *auto_rewind_epochs(cfg.epochs)})
    rows = run.metrics()
    table = epoch_table(rows)
    assert [t["epoch"] for t in table] == list(range(1, cfg.epochs + 1)), "every epoch is accounted"
    phase = memorization_phase(rows, cfg.memorized_at)
    summary = summarize(table, phase["epochs"])
    results = {"run": run.dir.name, "config": {**run.config, "window": cfg.window, "memorized_at": cfg.memorized_at},
               "groups": accountant.groups, "group_params": accountant.sizes,
               "n_train": data.n_train, "n_noisy": int(data.noisy.sum()),
               **({"n_mislabeled": int(data.mislabeled.sum()), "n_atypical": int(accountant.atypical.sum())}
                  if accountant.atypical is not None else {}),
               "control": torch.nonzero(control).flatten().tolist(),
               "definitions": {
                   "norm_*": "L2 norm, per layer group, of the sum over the epoch's steps of that part of the "
                             "minibatch gradient: clean part = grad of sum_{clean i} l_i / B, noisy part = "
                             "grad of sum_{noisy i} l_i / B, total = their sum = the gradient plain SGD "
                             "stepped on (loss gradient only, weight decay excluded); control part = the same "
                             "over the control examples (`control`: a seeded random subset of the clean "
                             "examples, as many as the noisy ones), clean_rest = clean - control",
                   "per_example_*": "norm_* divided by the number of examples of that kind seen in the epoch",
                   "cosine": "cosine similarity of the epoch's clean and noisy sums (null if one is zero)",
                   "cosine_rest_noisy": "the same for the clean-rest and noisy sums",
                   "cosine_control_rest": "the same for the control and clean-rest sums",
                   "norm_matched": "the same sum over the loss-matched control: chosen before each epoch from the "
                                   "per-example losses of the model as it starts the epoch (eval mode), for each "
                                   "noisy example (hardest first) the clean example of nearest loss not taken yet; "
                                   "`matching`: the mean losses of the noisy, matched and all clean examples and "
                                   "the mean absolute loss gap of the pairs",
                   "norm_clean_unmatched": "clean - matched: the clean examples outside the loss-matched control",
                   "cosine_matched_noisy": "cosine of the loss-matched and noisy sums",
                   "cosine_matched_unmatched": "cosine of the loss-matched and the other clean examples' sums",
                   "memorization_phase": "epochs whose training took noisy-train accuracy from its last low "
                                         f"to >= memorized_at ({cfg.memorized_at:g})",
                   **(SPLIT_DEFINITIONS if accountant.atypical is not None else {})},
               "epochs": table, "memorization_phase": phase, "summary": summary}
    write_json(run.path("gradient_accounting.json"), results)
    write_examples(run, data)  # examples.csv: this experiment's per-example results beside the scores
    print(f"wrote {run.path('gradient_accounting.json')}")

    plot_norms(table, "norm_", "Gradient norm per layer: epoch sums of total, clean and noisy parts",
               "norm of the epoch's gradient sum", cfg, run.path("gradient_accounting_norms.png"))
    plot_norms(table, "per_example_", "Gradient norm per layer, per example (sum / number of examples)",
               "norm of the sum / examples", cfg, run.path("gradient_accounting_per_example.png"))
    plot_cosine(table, phase, cfg, run.path("gradient_accounting_cosine.png"))
    plot_accuracy(rows, phase, cfg, run.path("gradient_accounting_accuracy.png"),
                  ("mislabeled", "atypical") if accountant.atypical is not None else ())

    print_summary(results)
    return results


# ----------------------------------------------------------------------------- figures and summary

def plot_accuracy(rows, phase, cfg, path, kinds=()):
    """Accuracy per epoch (the metrics rows), the memorization phase shaded; `kinds`: the memorized set's
    kinds shown apart (memorized=both: "mislabeled", "atypical")."""
    fig, axes = figure("Accuracy during training: when are the noisy labels memorized?", cfg, panel=(8.5, 4.2))
    accuracy_curves(axes[0, 0], rows, keys=("clean", "noisy", "noisy_true", "test") + tuple(kinds))
    shade_phase(axes[0, 0], phase)
    return save(fig, path)


def shade_phase(ax, phase):
    if phase["epochs"]:
        ax.axvspan(phase["epochs"][0] - 0.5, phase["epochs"][-1] + 0.5, color="gold", alpha=0.25,
                   label="memorization phase")
        plots.legend_beside(ax)


def _nanmean(v):
    """Column means over the finite entries (NaN where there is none, e.g. per-example noisy at noise 0)."""
    ok = np.isfinite(v)
    return np.where(ok.any(0), np.where(ok, v, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)


def plot_norms(table, prefix, title, ylabel, cfg, path):
    """(a)/(b): x = layer group (input to output), lines total / clean / noisy / control; one panel averaging
    all epochs, then one per window of `cfg.window` epochs (means of the per-epoch norms)."""
    groups = list(table[0]["groups"])
    series = SERIES + (SPLIT_SERIES if "norm_atypical" in table[0]["groups"][groups[0]] else ())
    windows = [("all epochs", table)] + [(f"epochs {w[0]['epoch']}-{w[-1]['epoch']}" if len(w) > 1
                                          else f"epoch {w[0]['epoch']}", w)
                                         for w in (table[i:i + cfg.window] for i in range(0, len(table), cfg.window))]
    ncols = min(3, len(windows))
    fig, axes = figure(title, cfg, ncols=ncols, nrows=math.ceil(len(windows) / ncols), panel=(4.6, 3.4))
    for ax, (name, rows) in zip(axes.flat, windows):
        for k, s in enumerate(series):  # dots, not lines: the groups are categories
            v = np.array([[np.nan if r["groups"][g].get(prefix + s) is None else r["groups"][g][prefix + s]
                           for g in groups] for r in rows], dtype=float)
            if np.isnan(v).all():  # a part this run did not account
                continue
            plots.dots(ax, None, _nanmean(v), offset=0.12 * (k - (len(series) - 1) / 2), color=SERIES_COLORS[s],
                       label=SERIES_LABELS[s], fmt={"control": "s", "matched": "D", "mislabeled": "v",
                                                    "atypical": "^"}.get(s, "o"))
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=7)
        ax.set_xlabel("layer group (input -> output)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    plots.legend_beside(axes[0, -1], fontsize=7)
    for ax in list(axes.flat)[len(windows):]:
        ax.axis("off")
    save(fig, path)


COSINES = (("cosine", "cosine(clean, noisy)"),
           ("cosine_control_rest", "cosine(control, clean-rest): the control group"))


def plot_cosine(table, phase, cfg, path):
    """(c): heatmaps of cosine(clean sum, noisy sum) and of cosine(control sum, clean-rest sum),
    layer group x epoch; blue < 0 < red."""
    groups = list(table[0]["groups"])
    epochs_ = [r["epoch"] for r in table]
    panels = [(key, label) for key, label in COSINES if key in table[0]["groups"][groups[0]]]
    fig, axes = figure("Cosine of gradient sums per epoch: clean vs noisy, and the control", cfg,
                       nrows=len(panels), panel=(max(8.0, 0.35 * len(epochs_) + 2), 0.35 * len(groups) + 1.8))
    for ax, (key, label) in zip(axes[:, 0], panels):
        cos = np.array([[np.nan if r["groups"][g][key] is None else r["groups"][g][key] for r in table]
                        for g in groups], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(cos), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        fig.colorbar(im, ax=ax, label="cosine")
        if len(epochs_) <= 40:
            for i in range(len(groups)):
                for j in range(len(epochs_)):
                    if np.isfinite(cos[i, j]):
                        ax.text(j, i, f"{cos[i, j]:.1f}", ha="center", va="center", fontsize=6,
                                color="white" if abs(cos[i, j]) > 0.6 else "black")
        step = max(1, len(epochs_) // 20)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(0, len(epochs_), step), epochs_[::step])
        ax.set_yticks(range(len(groups)), groups, fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("layer group (input at top)")
        if phase["epochs"]:  # heatmap columns are 0-based epoch positions
            ax.axvspan(epochs_.index(phase["epochs"][0]) - 0.5, epochs_.index(phase["epochs"][-1]) + 0.5,
                       fill=False, edgecolor="gold", linewidth=2.5, label="memorization phase")
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1.0))
    save(fig, path)


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_summary(results):
    phase = results["memorization_phase"]
    if not phase["epochs"]:
        print("no memorization phase (no noisy examples, or no trained epoch)")
        return
    how = "reached" if phase["reached"] else "NOT reached (last epoch used)"
    print(f"memorization phase: epochs {phase['epochs'][0]}-{phase['epochs'][-1]} (noisy-train accuracy "
          f"{phase['noisy_low']:.1%} after epoch {phase['low']} -> {phase['noisy_end']:.1%} after epoch "
          f"{phase['end']}; {results['config']['memorized_at']:.0%} {how})")
    print(f"{'group':<10} {'noisy/clean':>11} {'per example':>11} {'cosine':>7} | {'noisy/rest':>10} "
          f"{'control/rest':>12} {'cos(rest,noisy)':>15} {'cos(control,rest)':>17} | {'noisy/matched':>13}")
    for g, s in results["summary"].items():
        print(f"{g:<10} {_fmt(s['noisy_clean_ratio'], '11.3f')} {_fmt(s['noisy_clean_ratio_per_example'], '11.2f')} "
              f"{_fmt(s['mean_cosine'], '7.3f')} | {_fmt(s.get('noisy_rest_ratio'), '10.3f')} "
              f"{_fmt(s.get('control_rest_ratio'), '12.3f')} {_fmt(s.get('mean_cosine_rest_noisy'), '15.3f')} "
              f"{_fmt(s.get('mean_cosine_control_rest'), '17.3f')} | {_fmt(s.get('noisy_matched_ratio'), '13.3f')}")
    print("(means over the memorization phase; rest = clean examples outside the control group; matched = the "
          "loss-matched control)")
    if any("mislabeled_clean_ratio" in s for s in results["summary"].values()):
        print_split(results)
    claims.print_claims([claims.accounting(results)])


def print_split(results):
    """memorized=both: the memorized set's gradient by kind, means over the memorization phase."""
    print(f"\nthe noisy part by kind ({results['n_mislabeled']} mislabeled, {results['n_atypical']} atypical clean; "
          f"clean = the typical clean examples)")
    print(f"{'group':<10} {'mislab/clean':>12} {'atyp/clean':>10} {'per ex. m/c':>11} {'per ex. a/c':>11} "
          f"{'cos(c,m)':>8} {'cos(c,a)':>8} | {'share typ.':>10} {'mislab.':>8} {'atyp.':>8}")
    for g, s in results["summary"].items():
        print(f"{g:<10} {_fmt(s['mislabeled_clean_ratio'], '12.3f')} {_fmt(s['atypical_clean_ratio'], '10.3f')} "
              f"{_fmt(s['mislabeled_clean_ratio_per_example'], '11.2f')} "
              f"{_fmt(s['atypical_clean_ratio_per_example'], '11.2f')} "
              f"{_fmt(s['mean_cosine_clean_mislabeled'], '8.3f')} "
              f"{_fmt(s['mean_cosine_clean_atypical'], '8.3f')} | {_fmt(s['mean_share_clean'], '10.3f')} "
              f"{_fmt(s['mean_share_mislabeled'], '8.3f')} {_fmt(s['mean_share_atypical'], '8.3f')}")
    print("(share = <part, total> / |total|^2: the three shares add up to 1)")


if __name__ == "__main__":
    cli.run(main)
