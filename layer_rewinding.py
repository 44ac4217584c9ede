"""Layer rewinding: which single layers does memorization need? (PROTOCOLS.md, section 2)

Take the final model of a run. For every layer group and every earlier checkpoint (0 = initialization),
put only that group back to the checkpoint's weights and measure accuracy on clean training examples,
on the mislabeled ones w.r.t. their noisy label (still memorized?) and their true label, and on the
test set. A group is *critical* for memorization if rewinding it alone makes the model stop predicting
the noisy labels. The paper finds most layers redundant and the critical ones not the last.

    python layer_rewinding.py [configs/preset.py] [--key=value ...]
"""
import time

from common import cli, config, plots
from common.evaluation import accuracies
from common.models import group_params
from common.rewinding import (BN_MODES, Rewinder, load_rewind_states, resolve_rewind_epochs, rewind_keys,
                              rewind_sweep)
from common.runs import write_json
from common.training import trained_run

# ----------------------------------------------------------------------------- the run (shared keys)
# The same names and defaults in all five scripts: together they identify the trained run.
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
RUN_KNOBS = config.run_knobs(globals())  # the shared keys above (one definition of the run's identity)
# ----------------------------------------------------------------------------- this experiment
rewind_epochs = None          # checkpoints to rewind to (0 = initialization); None: 0, 10/25/50/75% of epochs, epochs-1
rewind_bn_stats = "recompute"  # BatchNorm statistics of the rewound group: recompute (re-estimated on the training
                              # images for the network it now sits in) | checkpoint (the checkpoint's, with its
                              # weights) | final (parameters only, as the authors: old weights, final statistics)
critical_threshold = 0.5      # critical group: rewound alone to the earliest rewind epoch, it leaves fewer than this
                              # fraction of the noisy examples predicted with their noisy label
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())   # the constants above; overridden by config files and --key=value
config.choice_check("rewind_bn_stats", BN_MODES)
config.range_check("critical_threshold", 0, 1)

SUBSETS = ("clean", "noisy", "noisy_true", "test")
BN_TEXT = {"recompute": "weights; BatchNorm statistics re-estimated on the training images",
           "checkpoint": "weights and the checkpoint's BatchNorm statistics",
           "final": "parameters only; the final model's BatchNorm statistics (the authors' way)"}


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    # Checked here, before any training, not with config.register_check: those checks are global and
    # would also judge other scripts' (or tests') keys of the same name.
    epochs = resolve_rewind_epochs(cfg.rewind_epochs, cfg.epochs)
    model, data, run = trained_run(cfg)                       # the final model (trained first if missing)
    keys = rewind_keys(model, cfg.rewind_bn_stats)            # per group: parameters (+ BatchNorm buffers)
    groups = list(keys)
    states = load_rewind_states(run, epochs, keys, model, data.device)   # each checkpoint read once
    rewinder = Rewinder(model, states, keys)
    final = accuracies(model, data, amp=cfg.amp)              # the baseline row: nothing rewound

    # The sweep: one model, one group's tensors swapped in and back per (group, epoch); the layers
    # before the group run once per batch, not once per rewind epoch.
    t0, cpu0 = time.time(), time.process_time()
    acc = rewind_sweep(model, data, rewinder, epochs, amp=cfg.amp, recompute_bn=cfg.rewind_bn_stats == "recompute")
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    if rewinder.changed_keys():  # cheap insurance: every number below is about the final model plus one group
        raise RuntimeError(f"the final model was not restored after rewinding: {rewinder.changed_keys()[:3]}")

    # Critical groups: memorization (noisy examples predicted with their noisy label) does not survive
    # rewinding the group alone to the earliest rewind point (initialization by default).
    first = epochs[0]
    critical = [g for g in groups if acc[g][first]["noisy"] < cfg.critical_threshold]
    print_table(run, cfg, groups, epochs, acc, final, critical, seconds)

    results = {
        "experiment": "layer_rewinding", "run": run.dir.name, "config": vars(cfg),
        "rewind_bn_stats": cfg.rewind_bn_stats, "bn_stats": BN_TEXT[cfg.rewind_bn_stats], "rewound_keys": keys,
        "groups": groups, "group_params": {g: sum(p.numel() for p in ps) for g, ps in group_params(model).items()},
        "rewind_epochs": epochs, "subsets": list(SUBSETS), "final": final,
        "accuracy": {g: {str(e): acc[g][e] for e in epochs} for g in groups},
        "critical": {"rule": f"noisy-example accuracy w.r.t. the noisy label after rewinding the group alone to "
                             f"epoch {first} < critical_threshold", "epoch": first,
                     "threshold": cfg.critical_threshold, "groups": critical},
        "sweep_seconds": round(seconds, 2), "sweep_cpu_seconds": round(cpu_seconds, 2),
        "evaluations": len(groups) * len(epochs),
    }
    write_json(run.path("layer_rewinding.json"), results)
    plot_by_depth(cfg, groups, epochs, acc, final, run.path("layer_rewinding_depth.png"))
    plot_heatmap(cfg, groups, epochs, acc, final, critical, first, run.path("layer_rewinding_heatmap.png"))
    print(f"wrote {run.path('layer_rewinding.json')} and layer_rewinding_{{depth,heatmap}}.png")
    return results


def print_table(run, cfg, groups, epochs, acc, final, critical, seconds):
    first = epochs[0]
    bn = BN_TEXT[cfg.rewind_bn_stats]
    print(f"\nlayer rewinding of {run.dir.name}: {len(groups)} groups x {len(epochs)} rewind epochs "
          f"in {seconds:.1f} s; rewound: {bn}")
    print(f"accuracy (%) with one group rewound to epoch {first}" + (" (initialization)" if first == 0 else "")
          + f"; then noisy accuracy per rewind epoch")
    head = f"{'group':<10} {'clean':>6} {'noisy':>6} {'n.true':>6} {'test':>6}  |" + "".join(f"{e:>6}" for e in epochs)
    print(head + "  critical")
    row = lambda a: "".join(f"{100 * a[s]:>7.1f}" for s in SUBSETS)
    print(f"{'final':<10}{row(final)}  |" + "".join(f"{100 * final['noisy']:>6.1f}" for _ in epochs))
    for g in groups:
        print(f"{g:<10}{row(acc[g][first])}  |" + "".join(f"{100 * acc[g][e]['noisy']:>6.1f}" for e in epochs)
              + ("  CRITICAL" if g in critical else ""))
    print(f"critical (noisy accuracy < {cfg.critical_threshold:.0%} after rewinding to epoch {first}): "
          f"{', '.join(critical) or 'none'}\n")


def epoch_label(e):
    return "epoch 0 (init)" if e == 0 else f"epoch {e}"


def plot_by_depth(cfg, groups, epochs, acc, final, path):
    """The paper's view: x = layer depth, one line per rewind epoch, one panel per subset."""
    fig, axes = plots.figure(f"Layer rewinding: accuracy with one layer group rewound to an earlier checkpoint "
                             f"(BatchNorm statistics: {cfg.rewind_bn_stats})", cfg,
                             ncols=len(SUBSETS), panel=(4.6, 4.0))
    cmap = plots.plt.get_cmap("viridis")
    x = range(1, len(groups) + 1)
    for ax, subset in zip(axes[0], SUBSETS):
        for i, e in enumerate(epochs):
            ax.plot(x, [100 * acc[g][e][subset] for g in groups], marker="o", ms=4,
                    color=cmap(i / max(1, len(epochs) - 1)), label=f"rewound to {epoch_label(e)}")
        ax.axhline(100 * final[subset], color="black", ls="--", lw=1, label=f"final model (epoch {cfg.epochs})")
        if subset == "noisy":
            ax.axhline(100 * cfg.critical_threshold, color="tab:red", ls=":", lw=1.2, label="critical threshold")
        ax.set_title(plots.LABELS[subset], fontsize=9)
        ax.set_xticks(list(x), groups, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer group (input -> output)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][1].get_legend_handles_labels()  # the noisy panel has every line
    axes[0][-1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    return plots.save(fig, path)


def plot_heatmap(cfg, groups, epochs, acc, final, critical, first, path):
    """Noisy-example accuracy (noisy label) per group x rewind epoch; critical groups boxed in red."""
    from matplotlib.patches import Patch, Rectangle
    fig, axes = plots.figure(f"Layer rewinding: is memorization still there? (noisy train accuracy, noisy label; "
                             f"BatchNorm statistics: {cfg.rewind_bn_stats})", cfg,
                             panel=(1.1 * len(epochs) + 3.5, 0.45 * len(groups) + 1.6))
    ax = axes[0][0]
    grid = [[100 * acc[g][e]["noisy"] for e in epochs] for g in groups]
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(epochs)), [epoch_label(e).replace("epoch ", "") for e in epochs])
    ax.set_yticks(range(len(groups)), [f"{g} (critical)" if g in critical else g for g in groups])
    for i, g in enumerate(groups):
        if g in critical:
            ax.get_yticklabels()[i].set_color("tab:red")
            ax.add_patch(Rectangle((-0.5, i - 0.5), len(epochs), 1, fill=False, ec="tab:red", lw=2.5))
    ax.set_xlabel("rewound to checkpoint of epoch")
    ax.set_ylabel("layer group (input -> output)")
    fig.colorbar(im, ax=ax, label=f"noisy train accuracy (%); final model {100 * final['noisy']:.0f}%")
    ax.legend(handles=[Patch(fill=False, ec="tab:red", lw=2.5,
                             label=f"critical: < {cfg.critical_threshold:.0%} after rewinding to epoch {first}")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
