"""Layer retraining: reset one layer to its initialization and retrain it alone on clean examples only;
do the memorized (mislabeled) examples come back although none of them is ever shown? (PROTOCOLS §3)

For every layer group: start from the final model, reset the group (weights and BatchNorm
statistics) to epoch 0, freeze every other parameter for real and hold the other BatchNorm layers'
statistics fixed, then train the group on the clean training examples. Before retraining and after
every epoch: clean, noisy (w.r.t. the noisy label: memorized again?), noisy w.r.t. the true label,
and test accuracy. If the noisy examples come back, their labels are stored elsewhere in the network.

    python layer_retraining.py [configs/preset.py] [--key=value ...]
"""
import time
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from common import cli, config, plots
from common.cli import UserError
from common.evaluation import accuracies
from common.models import build_model
from common.retraining import changed_outside, freeze_except, group_names, hold_eval, reset_group, unfreeze
from common.rng import derive_seed
from common.runs import write_json
from common.training import SCHEDULES, batch_order, make_optimizer, train_epoch, trained_run

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
retrain_groups = []         # layer groups to retrain, e.g. ["conv1", "head"]; [] = every group
retrain_epochs = 3          # at most this many epochs per group (the authors: up to 20; 3 keeps CPU runs short)
retrain_lr = 0.01           # the authors' retraining lr (momentum and weight decay: the run's)
retrain_batch_size = 128
retrain_schedule = "constant"  # constant | cosine | triangle over retrain_epochs (an early stop cuts it short)
retrain_warmup = 0.1        # warm-up fraction for cosine/triangle
stop_after = 3              # stop once clean train accuracy has been 100% this many epochs in a row (0: never)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("retrain_epochs", 1, None)
config.range_check("retrain_lr", 0, None, lo_open=True)
config.range_check("retrain_batch_size", 2, None)
config.choice_check("retrain_schedule", SCHEDULES)
config.range_check("retrain_warmup", 0, 1)
config.range_check("stop_after", 0, None)
config.register_check("retrain_groups", lambda v, cfg: None if all(isinstance(g, str) for g in v) else
                      f"retrain_groups={v!r} must be a list of group names, e.g. --retrain_groups=['conv1','head']")


def retrain_config(cfg, name):
    """The namespace train_epoch and make_optimizer read, with the retraining knobs substituted and a
    seed of this group's own (batch order), so every group's result is reproducible on its own."""
    return SimpleNamespace(**{**vars(cfg), "lr": cfg.retrain_lr, "batch_size": cfg.retrain_batch_size,
                              "schedule": cfg.retrain_schedule, "warmup": cfg.retrain_warmup,
                              "model_seed": derive_seed(cfg.model_seed, "retrain", name)})


def retrain_group(model, data, name, init_state, cfg, seen=None):
    """Reset group `name` of `model` (holding the final weights) to `init_state` and train it alone on
    the clean training examples. Returns one row of accuracies per epoch (epoch 0: right after the
    reset). `seen` (a list) receives every training batch's example indices."""
    seen = [] if seen is None else seen
    reset_group(model, name, init_state)
    params, frozen_norms = freeze_except(model, name)
    rcfg = retrain_config(cfg, name)
    optimizer = make_optimizer(params, rcfg)  # the group's parameters only
    steps = len(batch_order(data.clean_idx, rcfg.batch_size, rcfg.model_seed, 0))

    def on_batch(idx):  # runs after train_epoch's model.train(), before every forward
        hold_eval(frozen_norms)
        seen.append(idx.detach().cpu())

    rows, perfect = [{"epoch": 0, "loss": None, **accuracies(model, data, amp=cfg.amp)}], 0
    for epoch in range(1, cfg.retrain_epochs + 1):
        loss = train_epoch(model, data, data.clean_idx, optimizer, rcfg, epoch, step0=(epoch - 1) * steps,
                           total_steps=cfg.retrain_epochs * steps, on_batch=on_batch, desc=f"{name} epoch {epoch}")
        rows.append({"epoch": epoch, "loss": loss, **accuracies(model, data, amp=cfg.amp)})
        perfect = perfect + 1 if rows[-1]["clean"] == 1.0 else 0
        if cfg.stop_after and perfect >= cfg.stop_after:  # the authors' early stop
            break
    unfreeze(model)
    return rows


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    names = group_names(build_model(cfg.model, 1, 10, 32, width=0.1))  # names depend on the architecture only
    unknown = [g for g in cfg.retrain_groups if g not in names]
    if unknown:  # before any training or writing
        raise UserError(f"unknown layer group {unknown[0]!r} for {cfg.model}; valid: {', '.join(names)}")
    groups = cfg.retrain_groups or names
    model, data, run = trained_run(cfg)
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    init_state = run.load_checkpoint(0)["model"]
    final_acc = accuracies(model, data, amp=cfg.amp)
    print(f"{run.dir.name}: final model  clean {final_acc['clean']:.3f}  noisy {final_acc['noisy']:.3f}  "
          f"test {final_acc['test']:.3f}; retraining {len(groups)} groups on {len(data.clean_idx)} clean examples")

    results = {"config": vars(cfg), "final_model": final_acc, "n_clean": len(data.clean_idx),
               "n_noisy": len(data.noisy_idx), "groups": {}}
    t_start = time.time()
    for name in tqdm(groups, desc="groups", disable=None):
        t0 = time.time()
        model.load_state_dict(final_state)  # every group starts from the final model
        seen = []
        rows = retrain_group(model, data, name, init_state, cfg, seen)
        # The two guarantees the authors' script broke, checked on every run, not only in tests.
        shown = torch.cat(seen).to(data.noisy.device)
        noisy_shown = int(data.noisy[shown].sum())
        changed = changed_outside(model, name, final_state)
        if noisy_shown or changed:
            raise RuntimeError(f"retraining {name}: {noisy_shown} noisy examples shown, changed outside: {changed[:3]}")
        results["groups"][name] = {
            "curve": rows, "epochs_trained": rows[-1]["epoch"],
            "stopped_early": rows[-1]["epoch"] < cfg.retrain_epochs,
            "examples_shown": len(shown), "noisy_examples_shown": noisy_shown,
            "frozen_state_unchanged": not changed, "seconds": round(time.time() - t0, 2)}
        tqdm.write(f"{name:<10} noisy after reset {rows[0]['noisy']:.3f} -> after {rows[-1]['epoch']} epochs "
                   f"{rows[-1]['noisy']:.3f}  (clean {rows[-1]['clean']:.3f}, test {rows[-1]['test']:.3f})")
    results["seconds"] = round(time.time() - t_start, 2)
    write_json(run.path("layer_retraining.json"), results)

    print_summary(results)
    plot_curves(results, cfg, run.path("layer_retraining_curves.png"))
    plot_final_noisy(results, cfg, run.path("layer_retraining_noisy.png"))
    print(f"wrote {run.path('layer_retraining.json')} and layer_retraining_{{curves,noisy}}.png "
          f"({results['seconds']:.0f} s)")
    return results


def print_summary(results):
    print(f"\nnoisy-example accuracy w.r.t. the noisy label (final model: {results['final_model']['noisy']:.3f}); "
          f"no noisy example was shown during retraining")
    print(f"{'group':<10} {'after reset':>12} {'retrained':>10} {'epochs':>7} {'clean':>7} {'noisy_true':>11} {'test':>6}")
    for name, g in results["groups"].items():
        first, last = g["curve"][0], g["curve"][-1]
        print(f"{name:<10} {first['noisy']:>12.3f} {last['noisy']:>10.3f} {g['epochs_trained']:>7d} "
              f"{last['clean']:>7.3f} {last['noisy_true']:>11.3f} {last['test']:>6.3f}")


def retrain_note(cfg):
    return (f"retrained alone on clean examples only: lr {cfg.retrain_lr:g} {cfg.retrain_schedule}, "
            f"batch {cfg.retrain_batch_size}, at most {cfg.retrain_epochs} epochs")


def plot_curves(results, cfg, path):
    """One panel per group: accuracies over retraining epochs (epoch 0 = right after the reset)."""
    names = list(results["groups"])
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    # an extra thin row holds the one legend of the figure
    legend_cols = {1: 1, 2: 2}.get(ncols, 5)
    fig, axes = plots.figure(f"Layer retraining: does memorization come back?\n{retrain_note(cfg)}", cfg,
                             ncols=ncols, nrows=nrows + 1, panel=(4.2 if ncols > 1 else 8.0, 2.9),
                             gridspec_kw={"height_ratios": [1] * nrows + [0.07 * -(-5 // legend_cols)]})
    for ax, name in zip(axes.flat, names):
        plots.accuracy_curves(ax, results["groups"][name]["curve"], keys=("clean", "noisy", "noisy_true", "test"),
                              xlabel="retraining epoch (0 = after reset)")
        ax.axhline(100 * results["final_model"]["noisy"], color=plots.COLORS["noisy"], ls=":", lw=1,
                   label="noisy, final model (before reset)")
        ax.set_title(f"retrain {name}", fontsize=10)
        ax.get_legend().remove()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8)
    return plots.save(fig, path)


def plot_final_noisy(results, cfg, path):
    """Per group: noisy-example accuracy (noisy label) right after the reset and after retraining."""
    names = list(results["groups"])
    fig, axes = plots.figure(f"Memorized examples after retraining one layer\n{retrain_note(cfg)}", cfg,
                             panel=(max(5.0, 0.75 * len(names) + 1.5), 4.0))
    ax = axes[0, 0]
    x = list(range(len(names)))
    after_reset = [100 * results["groups"][n]["curve"][0]["noisy"] for n in names]
    retrained = [100 * results["groups"][n]["curve"][-1]["noisy"] for n in names]
    ax.bar([i - 0.2 for i in x], after_reset, 0.4, color="tab:red", alpha=0.35, label="right after reset")
    ax.bar([i + 0.2 for i in x], retrained, 0.4, color="tab:red", label="after retraining")
    ax.axhline(100 * results["final_model"]["noisy"], color="black", ls=":", lw=1, label="final model")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30)
    ax.set_xlabel("retrained layer group (input -> output)")
    ax.set_ylabel("noisy examples predicted with\ntheir noisy label (%)")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
