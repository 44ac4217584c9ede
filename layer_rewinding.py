"""Layer rewinding: which single layers does memorization need? (docs/protocol.md)

Take the final model of a run. For every layer group and every earlier checkpoint (0 = initialization),
put only that group back to the checkpoint's weights and measure accuracy on clean training examples,
on the mislabeled ones w.r.t. their noisy label (still memorized?) and their true label, and on the
test set (with memorized=both also on the mislabeled and the atypical clean examples apart,
docs/experiments/atypical.md). A group is *critical* for memorization if rewinding it alone makes the
model stop predicting the noisy labels (the rule and its threshold: common/claims.py, docs/protocol.md).
The paper finds most layers redundant and the critical ones not the last. The rewound group's BatchNorm statistics
are a choice the paper leaves open: the authors' (the final model's) is the primary result, and a
re-estimate for the rewound network is computed in the same run, side by side.

    python layer_rewinding.py [configs/preset.py] [--key=value ...]
"""
import time

from common import claims, cli, config, plots
from common.evaluation import accuracies, split_kinds
from common.models import group_params
from common.rewinding import (BN_MODES, Rewinder, clone_states, load_rewind_states, resolve_rewind_epochs,
                              rewind_keys, rewind_sweep)
from common.runs import write_json
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
rewind_epochs = None          # checkpoints to rewind to (0 = initialization); None: 0, 10/25/50/75% of epochs, epochs-1
rewind_bn_stats = "final"     # BatchNorm statistics of the rewound group in the primary result (figures, `accuracy`):
                              # final (parameters only, as the authors: old weights, final statistics) | recompute
                              # (re-estimated on the training images for the network it now sits in) | checkpoint
                              # (the checkpoint's, with its weights)
compare_bn_stats = ["recompute"]  # further BatchNorm modes computed in the same run, reported side by side ([]: none)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())   # the constants above; overridden by config files and --key=value
config.choice_check("rewind_bn_stats", BN_MODES)
config.register_check("compare_bn_stats", lambda v, cfg: None if all(m in BN_MODES for m in v) else
                      f"compare_bn_stats={v!r} must list BatchNorm modes among {', '.join(BN_MODES)}; "
                      f"e.g. --compare_bn_stats=['recompute']")

SUBSETS = ("clean", "noisy", "noisy_true", "test")
BN_TEXT = {"final": "parameters only; the final model's BatchNorm statistics (the authors' way)",
           "recompute": "weights; BatchNorm statistics re-estimated on the training images",
           "checkpoint": "weights and the checkpoint's BatchNorm statistics"}


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    # Checked here, before any training, not with config.register_check: those checks are global and
    # would also judge other scripts' (or tests') keys of the same name.
    epochs = resolve_rewind_epochs(cfg.rewind_epochs, cfg.epochs)
    modes = list(dict.fromkeys([cfg.rewind_bn_stats, *cfg.compare_bn_stats]))  # the primary first
    model, data, run = trained_run(cfg)                       # the final model (trained first if missing)
    keys = {m: rewind_keys(model, m) for m in modes}          # per group: parameters (+ BatchNorm buffers)
    groups = list(keys[modes[0]])
    widest = max(modes, key=lambda m: sum(map(len, keys[m].values())))
    states = load_rewind_states(run, epochs, keys[widest], model, data.device)  # each checkpoint read once
    final = accuracies(model, data, amp=cfg.amp)              # the baseline row: nothing rewound

    # The sweep, once per BatchNorm mode: one model, one group's tensors swapped in and back per (group,
    # epoch); the layers before the group run once per batch, not once per rewind epoch.
    by_mode = {}
    for mode in modes:
        rewinder = Rewinder(model, clone_states(states) if mode == "recompute" else states, keys[mode])
        t0, cpu0 = time.time(), time.process_time()
        acc = rewind_sweep(model, data, rewinder, epochs, amp=cfg.amp, recompute_bn=mode == "recompute")
        seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
        if rewinder.changed_keys():  # cheap insurance: every number is about the final model plus one group
            raise RuntimeError(f"the final model was not restored after rewinding: {rewinder.changed_keys()[:3]}")
        by_mode[mode] = {"bn_stats": BN_TEXT[mode], "rewound_keys": keys[mode],
                         "accuracy": {g: {str(e): acc[g][e] for e in epochs} for g in groups},
                         "sweep_seconds": round(seconds, 2), "sweep_cpu_seconds": round(cpu_seconds, 2)}
    primary = by_mode[modes[0]]

    results = {
        "experiment": "layer_rewinding", "run": run.dir.name, "config": vars(cfg),
        "rewind_bn_stats": modes[0], "bn_stats": primary["bn_stats"], "rewound_keys": primary["rewound_keys"],
        "groups": groups, "group_params": {g: sum(p.numel() for p in ps) for g, ps in group_params(model).items()},
        "rewind_epochs": epochs, "subsets": list(SUBSETS) + list(split_kinds(cfg.memorized)), "final": final,
        "accuracy": primary["accuracy"],                      # the primary BatchNorm mode's, as bn_modes[mode]
        "bn_modes": by_mode,
        "sweep_seconds": round(sum(m["sweep_seconds"] for m in by_mode.values()), 2),
        "sweep_cpu_seconds": round(sum(m["sweep_cpu_seconds"] for m in by_mode.values()), 2),
        "evaluations": len(groups) * len(epochs) * len(modes),
    }
    write_json(run.path("layer_rewinding.json"), results)
    print_table(run, results, split_kinds(cfg.memorized))
    judged = claims.rewinding(results)                        # claim 2, one verdict per BatchNorm mode
    for claim in judged:
        print(claim.line())
    plot_by_depth(cfg, results, run.path("layer_rewinding_depth.png"), split_kinds(cfg.memorized))
    plot_heatmaps(cfg, results, {c.values["mode"]: c for c in judged}, run.path("layer_rewinding_heatmap.png"))
    print(f"wrote {run.path('layer_rewinding.json')} and layer_rewinding_{{depth,heatmap}}.png")
    return results


def print_table(run, res, kinds=()):
    """The primary mode's accuracies rewound to the first epoch, noisy accuracy per rewind epoch; `kinds`
    (memorized=both: mislabeled, atypical): those columns too, and each kind's accuracy per rewind epoch."""
    groups, epochs, final, modes = res["groups"], res["rewind_epochs"], res["final"], list(res["bn_modes"])
    subsets = SUBSETS + tuple(kinds)
    first = str(epochs[0])
    acc = res["accuracy"]
    print(f"\nlayer rewinding of {run.dir.name}: {len(groups)} groups x {len(epochs)} rewind epochs x "
          f"{len(modes)} BatchNorm modes in {res['sweep_seconds']:.1f} s; primary: {res['bn_stats']}")
    print(f"accuracy (%) with one group rewound to epoch {first}" + (" (initialization)" if first == "0" else "")
          + "; then noisy accuracy per rewind epoch")
    print(f"{'group':<10} {'clean':>6} {'noisy':>6} {'n.true':>6} {'test':>6}"
          + "".join(f" {k[:6]:>6}" for k in kinds) + "  |" + "".join(f"{e:>6}" for e in epochs))
    row = lambda a: "".join(f"{100 * a[s]:>7.1f}" for s in subsets)
    print(f"{'final':<10}{row(final)}  |" + "".join(f"{100 * final['noisy']:>6.1f}" for _ in epochs))
    for g in groups:
        print(f"{g:<10}{row(acc[g][first])}  |" + "".join(f"{100 * acc[g][str(e)]['noisy']:>6.1f}" for e in epochs))
    for k in kinds:  # memorized=both: each kind of the memorized set per rewind epoch
        print(f"\n{k} accuracy (%) per rewind epoch (final model: {100 * final[k]:.1f})")
        print(f"{'group':<10}" + "".join(f"{e:>6}" for e in epochs))
        for g in groups:
            print(f"{g:<10}" + "".join(f"{100 * acc[g][str(e)][k]:>6.1f}" for e in epochs))
    if len(modes) > 1:
        print(f"\nnoisy / clean accuracy (%) rewound to epoch {first}, per BatchNorm mode")
        print(f"{'group':<10}" + "".join(f"{m:>18}" for m in modes))
        for g in groups:
            print(f"{g:<10}" + "".join(f"{100 * res['bn_modes'][m]['accuracy'][g][first]['noisy']:>11.1f} /"
                                       f"{100 * res['bn_modes'][m]['accuracy'][g][first]['clean']:>5.1f}"
                                       for m in modes))
    print()


def epoch_label(e):
    return "epoch 0 (init)" if e == 0 else f"epoch {e}"


def plot_by_depth(cfg, res, path, kinds=()):
    """The paper's view, primary BatchNorm mode: accuracy per layer group (input at top) x rewind epoch, one
    panel per subset (and per kind of `kinds`: memorized=both's mislabeled and atypical). Cells, not
    lines: the groups are categories, and a line between them is no trend."""
    groups, epochs, final, acc = res["groups"], res["rewind_epochs"], res["final"], res["accuracy"]
    fig, axes = plots.figure(f"Layer rewinding: accuracy (%) with one layer group rewound to an earlier checkpoint "
                             f"(BatchNorm statistics: {res['rewind_bn_stats']})", cfg,
                             ncols=len(SUBSETS) + len(kinds),
                             panel=(0.55 * len(epochs) + 2.6, 0.32 * len(groups) + 1.6))
    for ax, subset in zip(axes[0], SUBSETS + tuple(kinds)):
        im = plots.heatmap(ax, [[100 * acc[g][str(e)][subset] for e in epochs] for g in groups],
                           [str(e) for e in epochs], groups)
        ax.set_title(f"{plots.LABELS[subset]}\nfinal model (epoch {cfg.epochs}): {100 * final[subset]:.1f}%", fontsize=9)
        ax.set_xlabel("rewound to epoch (0 = init)")
        ax.set_ylabel("layer group (input at top)")
    fig.colorbar(im, ax=axes[0][-1], label="accuracy (%)")
    return plots.save(fig, path)


def plot_heatmaps(cfg, res, judged, path):
    """Noisy-example accuracy (noisy label) per group x rewind epoch, one panel per BatchNorm mode
    (the primary first): the compact comparison of the modes. Groups that claim 2's rule (`judged`:
    {mode: Claim}) finds critical are boxed: red for memorization only, gray for everything."""
    from matplotlib.patches import Patch, Rectangle
    groups, epochs, modes = res["groups"], res["rewind_epochs"], list(res["bn_modes"])
    boxes = {"memorization": ("tab:red", "critical for memorization"), "everything": ("tab:gray", "critical for everything")}
    fig, axes = plots.figure("Layer rewinding: is memorization still there? (noisy train accuracy w.r.t. the "
                             "noisy label, %)", cfg, ncols=len(modes),
                             panel=(1.1 * len(epochs) + 3.0, 0.45 * len(groups) + 1.9))
    for k, (ax, mode) in enumerate(zip(axes[0], modes)):
        acc = res["bn_modes"][mode]["accuracy"]
        grid = [[100 * acc[g][str(e)]["noisy"] for e in epochs] for g in groups]
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(epochs)), [epoch_label(e).replace("epoch ", "") for e in epochs])
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xlabel("rewound to checkpoint of epoch")
        ax.set_ylabel("layer group (input -> output)")
        ax.set_title(f"BatchNorm statistics: {mode}" + (" (primary)" if k == 0 else "") + f"\n{BN_TEXT[mode]}",
                     fontsize=8)
        classes = judged[mode].values["classes"] if mode in judged else {}
        col = epochs.index(judged[mode].values["epoch"]) if mode in judged else 0
        for i, g in enumerate(groups):
            if classes.get(g) in boxes:
                ax.add_patch(Rectangle((col - 0.5, i - 0.5), 1, 1, fill=False, ec=boxes[classes[g]][0], lw=2.5))
    fig.colorbar(im, ax=axes[0][-1], label=f"noisy train accuracy (%); final model {100 * res['final']['noisy']:.0f}%")
    axes[0][0].legend(handles=[Patch(fill=False, ec=c, lw=2.5, label=f"{text} (claim 2's rule)")
                               for c, text in boxes.values()],
                      loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8, frameon=False)
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
