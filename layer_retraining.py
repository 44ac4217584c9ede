"""Layer retraining: reset one layer to its initialization and retrain it alone on clean examples only;
do the memorized (mislabeled) examples come back although none of them is ever shown? (docs/protocol.md)

For every layer group: start from the final model, reset the group (weights and BatchNorm
statistics) to epoch 0, freeze every other parameter for real, then train the group on the clean
training examples with the authors' budget (up to 20 epochs, triangle schedule peaking at lr 0.01
halfway, early stop after 3 epochs at 100% training accuracy). Right after the reset and after every
epoch: clean, noisy (w.r.t. the noisy label: memorized again?), noisy w.r.t. the true label, and test
accuracy. If the noisy examples come back, their labels are stored elsewhere in the network.
Positive control, per group: the same reset group retrained on ALL examples (noisy included) with
the same budget; a group whose control does not re-memorize the noisy examples cannot tell us
anything (the rule: common/claims.py). The frozen BatchNorm layers stay in train mode as in the
authors' loop; holding them in eval mode is an optional ablation, reported side by side. With
memorized=both every accuracy of the memorized set is also reported for its two kinds apart,
mislabeled and atypical clean (docs/experiments/atypical.md).

    python layer_retraining.py [configs/preset.py] [--key=value ...]
"""
import time
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from common import claims, cli, config, plots
from common.cli import UserError
from common.evaluation import accuracies, split_kinds
from common.models import MODELS, build_model
from common.retraining import (FROZEN_BN, RunningAccuracy, changed_outside, freeze_except, group_names, hold_eval,
                               reset_group, unfreeze)
from common.rng import derive_seed
from common.runs import write_json
from common.training import SCHEDULES, batch_order, make_optimizer, train_epoch, trained_run

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
retrain_groups = []         # layer groups to retrain, e.g. ["conv1", "head"]; [] = every group
retrain_epochs = 20         # at most this many epochs per group (the authors' budget)
retrain_lr = 0.01           # peak lr, the authors' (momentum and weight decay: the run's)
retrain_batch_size = 128
retrain_schedule = "triangle"  # triangle | cosine | constant over retrain_epochs (an early stop cuts it short)
retrain_warmup = 0.5        # warm-up fraction: the authors' triangle peaks after 10 of 20 epochs
stop_after = 3              # stop after this many epochs (not necessarily in a row) at 100% training accuracy on
                            # the retraining set, as the authors (0: never)
frozen_bn = "train"         # BatchNorm outside the group while retraining: train (the authors' loop: batch statistics,
                            # running statistics follow the retraining data) | eval (held fixed, as at test time)
control = True              # positive control: each reset group also retrained on ALL examples (noisy included)
bn_ablation = False         # also run every group (and its control) with the other frozen_bn mode, side by side
curve_every = 1             # accuracies measured every this many epochs (always right after the reset and at the end;
                            # 0: only those two): a cost knob, the early stop and the results do not depend on it
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("retrain_epochs", 1, None)
config.range_check("retrain_lr", 0, None, lo_open=True)
config.range_check("retrain_batch_size", 2, None)
config.choice_check("retrain_schedule", SCHEDULES)
config.range_check("retrain_warmup", 0, 1)
config.range_check("stop_after", 0, None)
config.choice_check("frozen_bn", FROZEN_BN)
config.range_check("curve_every", 0, None)
config.register_check("retrain_groups", lambda v, cfg: None if all(isinstance(g, str) for g in v) else
                      f"retrain_groups={v!r} must be a list of group names, e.g. --retrain_groups=['conv1','head']")

ACC_KEYS = ("clean", "noisy", "noisy_true", "train", "test")


def retrain_config(cfg, name, purpose="retrain"):
    """The namespace train_epoch and make_optimizer read, with the retraining knobs substituted and a
    seed of this group's own (batch order), so every group's result is reproducible on its own."""
    return SimpleNamespace(**{**vars(cfg), "lr": cfg.retrain_lr, "batch_size": cfg.retrain_batch_size,
                              "schedule": cfg.retrain_schedule, "warmup": cfg.retrain_warmup,
                              "model_seed": derive_seed(cfg.model_seed, purpose, name)})


def retrain_group(model, data, name, init_state, cfg, seen=None, indices=None, purpose="retrain", reset_acc=None):
    """Reset group `name` of `model` (holding the final weights) to `init_state` and train it alone on
    `indices` (default: the clean training examples), the BatchNorm layers outside it as cfg.frozen_bn
    says. Returns one row of accuracies per epoch (epoch 0: right after the reset; `fit`: the training
    accuracy on the retraining set during the epoch); epochs between cfg.curve_every's have only
    epoch, loss and fit. `seen` (a list) receives every batch's indices; `reset_acc`: the accuracies
    right after this reset when already measured (they do not depend on what is trained next)."""
    seen = [] if seen is None else seen
    indices = data.clean_idx if indices is None else indices
    reset_group(model, name, init_state)
    params, frozen_norms = freeze_except(model, name)
    rcfg = retrain_config(cfg, name, purpose)
    optimizer = make_optimizer(params, rcfg)  # the group's parameters only
    steps = len(batch_order(indices, rcfg.batch_size, rcfg.model_seed, 0))

    def on_batch(idx):  # runs after train_epoch's model.train(), before every forward
        if cfg.frozen_bn == "eval":
            hold_eval(frozen_norms)
        seen.append(idx.detach().cpu())

    reset_acc = reset_acc or accuracies(model, data, amp=cfg.amp)
    rows, perfect = [{"epoch": 0, "loss": None, "fit": None, **reset_acc}], 0
    for epoch in range(1, cfg.retrain_epochs + 1):
        with RunningAccuracy(model, data) as fit:
            loss = train_epoch(model, data, indices, optimizer, rcfg, epoch, step0=(epoch - 1) * steps,
                               total_steps=cfg.retrain_epochs * steps, on_batch=on_batch, desc=f"{name} epoch {epoch}")
        rows.append({"epoch": epoch, "loss": loss, "fit": fit.value()})
        perfect += rows[-1]["fit"] == 1.0
        stop = cfg.stop_after and perfect >= cfg.stop_after  # the authors' early stop
        if stop or epoch == cfg.retrain_epochs or (cfg.curve_every and epoch % cfg.curve_every == 0):
            rows[-1].update(accuracies(model, data, amp=cfg.amp))
        if stop:
            break
    unfreeze(model)
    return rows


def retrain_checked(model, data, name, init_state, final_state, cfg, control=False, reset_acc=None):
    """retrain_group from the final model on the clean examples (or on all of them: the control), with the
    guarantees the authors' script broke checked on every run: no parameter outside the group moves, no
    noisy example is shown (clean retraining), and with frozen_bn=eval no BatchNorm statistic outside moves."""
    t0 = time.time()
    model.load_state_dict(final_state)  # every retraining starts from the final model
    seen = []
    indices = torch.arange(data.n_train, device=data.device) if control else data.clean_idx
    rows = retrain_group(model, data, name, init_state, cfg, seen, indices,
                         purpose="retrain-control" if control else "retrain", reset_acc=reset_acc)
    shown = torch.cat(seen).to(data.noisy.device)
    noisy_shown = int(data.noisy[shown].sum())
    params_changed, buffers_changed = changed_outside(model, name, final_state)
    if params_changed or (noisy_shown and not control) or (buffers_changed and cfg.frozen_bn == "eval"):
        raise RuntimeError(f"retraining {name}: {noisy_shown} noisy examples shown, changed outside: "
                           f"{(params_changed + buffers_changed)[:3]}")
    acc = lambda r: {k: r[k] for k in ACC_KEYS + split_kinds(cfg.memorized)}  # noqa: E731
    return {"reset": acc(rows[0]), "curve": [r for r in rows if "clean" in r], "final": acc(rows[-1]),
            "fit": [r["fit"] for r in rows[1:]], "epochs_trained": rows[-1]["epoch"],
            "stopped_early": rows[-1]["epoch"] < cfg.retrain_epochs, "examples_shown": len(shown),
            "noisy_examples_shown": noisy_shown, "frozen_state_unchanged": not params_changed,
            "frozen_bn_stats_moved": bool(buffers_changed), "seconds": round(time.time() - t0, 2)}


def retrain_all(model, data, groups, init_state, final_state, cfg, resets):
    """{group: clean retraining result + "control"} for cfg.frozen_bn. `resets` ({group: accuracies right
    after the reset}) is filled on the first call and reused: every run of a group starts from that state."""
    out = {}
    for name in cli.progress(groups, desc=f"groups (frozen BatchNorm: {cfg.frozen_bn})"):
        out[name] = retrain_checked(model, data, name, init_state, final_state, cfg, reset_acc=resets.get(name))
        resets[name] = out[name]["reset"]
        if cfg.control:
            out[name]["control"] = retrain_checked(model, data, name, init_state, final_state, cfg, control=True,
                                                   reset_acc=resets[name])
        g, c = out[name], out[name].get("control")
        tqdm.write(f"{name:<10} noisy after reset {g['reset']['noisy']:.3f} -> retrained on clean data "
                   f"{g['final']['noisy']:.3f} in {g['epochs_trained']} epochs (clean {g['final']['clean']:.3f}, test "
                   f"{g['final']['test']:.3f})" + (f"; control (all data) {c['final']['noisy']:.3f}" if c else ""))
    model.load_state_dict(final_state)
    return out


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    if cfg.model in MODELS and cfg.groups is None:  # a zoo model's groups are known before any training
        check_groups(cfg, group_names(build_model(cfg.model, 1, 10, 32, width=0.1)))
    model, data, run = trained_run(cfg)
    names = group_names(model)
    check_groups(cfg, names)
    groups = cfg.retrain_groups or names
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    init_state = {k: v.to(data.device) for k, v in run.load_checkpoint(0)["model"].items()}
    final_acc = accuracies(model, data, amp=cfg.amp)
    print(f"{run.dir.name}: final model  clean {plots.pct(final_acc['clean'])}  noisy {plots.pct(final_acc['noisy'])}  "
          f"test {plots.pct(final_acc['test'])}; retraining {len(groups)} groups on {len(data.clean_idx)} clean examples"
          + (" (and on all examples: the control)" if cfg.control else ""))

    t_start, resets = time.time(), {}
    results = {"config": vars(cfg), "final_model": final_acc, "n_clean": len(data.clean_idx),
               "n_noisy": len(data.noisy_idx), "frozen_bn": cfg.frozen_bn,
               "groups": retrain_all(model, data, groups, init_state, final_state, cfg, resets), "ablation": None}
    if cfg.bn_ablation:
        other = next(m for m in FROZEN_BN if m != cfg.frozen_bn)
        acfg = SimpleNamespace(**{**vars(cfg), "frozen_bn": other})
        results["ablation"] = {"frozen_bn": other,
                               "groups": retrain_all(model, data, groups, init_state, final_state, acfg, resets)}
    results["seconds"] = round(time.time() - t_start, 2)
    write_json(run.path("layer_retraining.json"), results)

    print_summary(results)
    for claim in claims.retraining(results):  # claim 3 (and its ablation), with the positive control
        print(claim.line())
    plot_curves(results, cfg, run.path("layer_retraining_curves.png"), split_kinds(cfg.memorized))
    plot_final_noisy(results, cfg, run.path("layer_retraining_noisy.png"), split_kinds(cfg.memorized))
    print(f"wrote {run.path('layer_retraining.json')} and layer_retraining_{{curves,noisy}}.png "
          f"({results['seconds']:.0f} s)")
    return results


def check_groups(cfg, names):
    unknown = [g for g in cfg.retrain_groups if g not in names]
    if unknown:  # before anything is written
        raise UserError(f"unknown layer group {unknown[0]!r} for {cfg.model}; valid: {', '.join(names)}")


def print_summary(results):
    print(f"\nnoisy-example accuracy w.r.t. the noisy label (final model: {plots.pct(results['final_model']['noisy'])}); "
          f"no noisy example was shown during the clean retraining; control = retrained on all examples")
    sections = [(results["frozen_bn"], results["groups"])]
    if results["ablation"]:
        sections.append((results["ablation"]["frozen_bn"], results["ablation"]["groups"]))
    for frozen, groups in sections:
        print(f"frozen BatchNorm in {frozen} mode")
        print(f"{'group':<10} {'after reset':>12} {'retrained':>10} {'control':>8} {'epochs':>7} {'clean':>7} "
              f"{'noisy_true':>11} {'test':>6}")
        for name, g in groups.items():
            control = plots.pct(g["control"]["final"]["noisy"] if "control" in g else None, 8)
            print(f"{name:<10} {plots.pct(g['reset']['noisy'], 12)} {plots.pct(g['final']['noisy'], 10)} {control} "
                  f"{g['epochs_trained']:>7d} {plots.pct(g['final']['clean'], 7)} "
                  f"{plots.pct(g['final']['noisy_true'], 11)} {plots.pct(g['final']['test'], 6)}")
        kinds = split_kinds(results["config"].get("memorized", "noisy"))
        if kinds:  # memorized=both: the memorized set's two kinds apart (w.r.t. their training label)
            print("by kind: " + "; ".join(f"{k} {plots.pct(results['final_model'][k])}" for k in kinds)
                  + " in the final model")
            print(f"{'group':<10}" + "".join(f" {f'{k} {when}':>22}" for k in kinds
                                            for when in ("after reset", "retrained", "control")))
            for name, g in groups.items():
                value = lambda k, when: (g["control"]["final"][k] if "control" in g else None) \
                    if when == "control" else g[when][k]  # noqa: E731
                print(f"{name:<10}" + "".join(f" {plots.pct(value(k, when), 22)}"
                                              for k in kinds for when in ("reset", "final", "control")))


def retrain_note(cfg):
    return (f"retrained alone: lr {cfg.retrain_lr:g} {cfg.retrain_schedule}, batch {cfg.retrain_batch_size}, "
            f"at most {cfg.retrain_epochs} epochs (stop after {cfg.stop_after} at 100% training accuracy), "
            f"frozen BatchNorm in {cfg.frozen_bn} mode")


def plot_curves(results, cfg, path, kinds=()):
    """One panel per group: accuracies over retraining epochs on clean data (epoch 0 = right after the
    reset; with `kinds`, memorized=both's mislabeled and atypical too), and the control's noisy accuracy
    (retrained on all examples)."""
    names = list(results["groups"])
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    # an extra thin row holds the one legend of the figure
    legend_cols = {1: 1, 2: 2}.get(ncols, 3)
    fig, axes = plots.figure(f"Layer retraining on clean examples only: does memorization come back?\n"
                             f"{retrain_note(cfg)}", cfg, ncols=ncols, nrows=nrows + 1,
                             panel=(4.2 if ncols > 1 else 8.0, 2.9),
                             gridspec_kw={"height_ratios": [1] * nrows + [0.07 * -(-7 // legend_cols)]})
    for ax, name in zip(axes.flat, names):
        g = results["groups"][name]
        plots.accuracy_curves(ax, g["curve"], keys=("clean", "noisy", "noisy_true", "test") + tuple(kinds),
                              xlabel="retraining epoch (0 = after reset)")
        if "control" in g:
            ax.plot([r["epoch"] for r in g["control"]["curve"]], [100 * r["noisy"] for r in g["control"]["curve"]],
                    color=plots.COLORS["noisy"], ls="--", marker="x", ms=4,
                    label="noisy train, control (retrained on all examples)")
        ax.axhline(100 * results["final_model"]["noisy"], color=plots.COLORS["noisy"], ls=":", lw=1,
                   label="noisy, final model (before reset)")
        ax.set_title(f"retrain {name}", fontsize=10)
        ax.get_legend().remove()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8)
    return plots.save(fig, path)


def plot_final_noisy(results, cfg, path, kinds=()):
    """Per group: noisy-example accuracy (noisy label) right after the reset, after retraining on clean
    data, after the control's retraining on all data (and with the other frozen-BatchNorm mode); with
    `kinds` (memorized=both: mislabeled, atypical) one more panel per kind of the memorized set."""
    names = list(results["groups"])
    groups, ablation = results["groups"], results["ablation"]
    n_bars = 2 + bool(ablation) + all("control" in g for g in groups.values())
    fig, axes = plots.figure(f"Memorized examples after retraining one layer\n{retrain_note(cfg)}", cfg,
                             nrows=1 + len(kinds), panel=(max(6.5, 0.3 * n_bars * len(names) + 4.0), 4.2))
    for ax, key in zip(axes[:, 0], ("noisy",) + tuple(kinds)):
        color = "tab:red" if key == "noisy" else plots.COLORS[key]
        bars = [("right after reset", [g["reset"][key] for g in groups.values()], color, 0.3),
                (f"retrained on clean data (frozen BN {results['frozen_bn']})",
                 [g["final"][key] for g in groups.values()], color, 1.0)]
        if ablation:
            bars.append((f"retrained on clean data (frozen BN {ablation['frozen_bn']})",
                         [ablation["groups"][n]["final"][key] for n in names], "tab:purple", 1.0))
        if all("control" in g for g in groups.values()):
            bars.append(("control: retrained on all data", [g["control"]["final"][key] for g in groups.values()],
                         "tab:gray", 1.0))
        w = 0.8 / len(bars)
        for k, (label, values, c, alpha) in enumerate(bars):
            ax.bar([i + (k - (len(bars) - 1) / 2) * w for i in range(len(names))], [100 * v for v in values], w,
                   color=c, alpha=alpha, label=label)
        ax.axhline(100 * results["final_model"][key], color="black", ls=":", lw=1, label="final model")
        ax.axhline(100 * claims.MEMORIZED, color="tab:gray", ls="--", lw=1, label="control must reach (claim 3's rule)")
        ax.axhline(100 * claims.RETAINED, color="tab:red", ls="--", lw=1, label="memorized from here (claim 3's rule)")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30)
        ax.set_xlabel("retrained layer group (input -> output)")
        ax.set_ylabel("noisy examples predicted with\ntheir noisy label (%)" if key == "noisy" else
                      f"{key} examples predicted with\ntheir training label (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, off the data
    return plots.save(fig, path)


if __name__ == "__main__":
    cli.run(main)
