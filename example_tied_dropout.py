"""Example-tied dropout: can memorization be directed into chosen neurons, and then dropped? (docs/protocol.md)

After every conv block (resnet9, cnn; resnet18: after layer2 and layer3, the authors' ETD model;
resnet50: every stage; vit: every MLP's hidden units) the channels are split into generalization
channels (the first floor(p_gen * C), always on) and memorization channels; each training example trains with only its own fixed subset of the
memorization channels (each kept with probability p_mem, a function of the example's index). Then
the memorization channels are dropped. On the same data and label noise as the plain run, this
trains the example-tied dropout (ETD) model and a standard-dropout model at the matched
rate, and compares them with the plain run: clean / noisy (noisy label = memorized) / noisy (true
label) / test accuracy and the generalization gap, the ETD model in its three evaluation modes
(tied: each training example with its own channels, keep: all channels at their expected value,
drop: memorization channels zeroed). The drop mode is evaluated both ways from the same trained
model: generalization channels rescaled by (p_gen + p_mem) / p_gen (the authors' code) and not
rescaled (the method's description); `drop_rescale` picks the one the "drop" keys hold. Negative
control: the plain model with as many randomly chosen channels dropped at the same places. The paper:
noisy accuracy 100% -> ~3% after the drop, test accuracy kept (judged by common/claims.py, for
each scaling, from the per-example results written here). With memorized=both every table row and the
bars also show the memorized set's two kinds apart, mislabeled and atypical clean (docs/experiments/atypical.md).

    python example_tied_dropout.py [configs/preset.py] [--key=value ...]
    python example_tied_dropout.py --model=resnet18 --width=0.125   # claim 5's primary row (reproduce.py)
"""
import time
from types import SimpleNamespace

import torch

from common import claims, cli, config, dropout, plots
from common.data import KINDS
from common.evaluation import SPLIT_KINDS, predict, split_accuracy, split_kinds
from common.memorization import write_examples
from common.models import model_for
from common.precision import autocast
from common.rng import derive_seed
from common.runs import Run, write_json
from common.training import train_run, trained_run

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
p_gen = 0.5             # fraction of channels that are generalization channels (always on); why 0.5:
                        # docs/experiments/example_tied_dropout.md
p_mem = 0.2             # probability that an example keeps a memorization channel (fixed per example and layer)
drop_rescale = True     # drop mode: multiply generalization channels by (p_gen + p_mem) / p_gen as the authors'
                        # code did (False: no rescaling, as in the method's description); evaluation only:
                        # both are measured on every run, this picks the one the "drop" keys hold
etd_epochs = 0          # epochs of the dropout variants; 0 = `epochs`, the plain run's budget (the no-dropout
                        # baseline, same schedule, lr and initial weights); an earlier default was 30
p_mem_sweep = []        # optional extra p_mem values: one more ETD model each, e.g. [0.1, 0.3]
control_draws = 3       # negative control: the plain model with as many random channels dropped at the same
                        # places, this many random draws (evaluation only); 0: none
gallery_size = 8        # examples per gallery row
dropout_after = "auto"  # where the dropout layers go: auto (zoo: its blocks; other models: after every
                        # Conv2d+norm+activation and on transformer MLP hidden units) | a list of module
                        # class names or name patterns, e.g. ["ReLU"] (docs/own_model.md)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())   # the constants above; overridden by config files and --key=value
config.range_check("p_gen", 0, 1, lo_open=True, hi_open=True)
config.range_check("p_mem", 0, 1, lo_open=True, hi_open=True)
config.range_check("etd_epochs", 0, None)
config.range_check("gallery_size", 0, None)
config.range_check("control_draws", 0, None)
config.also_accepts("dropout_after", list)  # "auto" or a list of names (its docs)
config.register_check("dropout_after", lambda v, cfg: dropout.check_after(v))
config.register_check("p_mem_sweep", lambda v, cfg: None if all(
    type(p) in (int, float) and 0 < p < 1 for p in v) else f"p_mem_sweep={v!r} must list values in (0, 1); "
                                                         f"e.g. --p_mem_sweep=[0.1,0.3]")

COLUMNS = ("clean", "noisy", "noisy_true", "test", "gap")
CONTROL = "no dropout, random channels dropped"  # the negative control's table rows


def results_file(cfg):
    """The results' file name in the run directory (reproduce.py: a variant of this script, e.g. another
    model, sits beside the default's results, in its own run's directory)."""
    return "example_tied_dropout.json"


def variant_epochs(cfg):
    """Epochs of the dropout variants: etd_epochs, or the plain run's when 0 (like-for-like baseline)."""
    return cfg.etd_epochs or cfg.epochs


def train_variant(cfg, data, plain_run, name, factory, identity, on_epoch=None):
    """Train (or reuse) a dropout variant in <run>/example_tied_dropout/<name>/ for variant_epochs(cfg);
    `identity` (its dropout settings) joins the training keys in its config.json."""
    if cfg.dropout_after != dropout.AFTER_AUTO:  # other places train another model: its own directory
        identity, name = {**identity, "dropout_after": cfg.dropout_after}, f"{name}_{dropout.after_tag(cfg.dropout_after)}"
    vcfg = SimpleNamespace(**{**vars(cfg), "epochs": variant_epochs(cfg), **identity})
    run = Run(vcfg, directory=plain_run.dir / "example_tied_dropout" / name, extra_keys=tuple(identity))
    model = model_for(vcfg, data, dropout=factory)       # same initial weights as the plain run
    t0 = time.time()
    model, _, run = train_run(vcfg, data=data, model=model, run=run, on_epoch=on_epoch and on_epoch(model))
    return model, run, round(time.time() - t0, 1)


def evaluate_drop(model, data, scaling, amp, split=None):
    """The drop mode with one of dropout.DROP_SCALINGS (its name): (accuracies, train predictions), or
    with `split` that split's predictions alone."""
    with dropout.drop_scaling(model, dropout.DROP_SCALINGS[scaling]):
        if split is None:
            return dropout.evaluate(model, data, "drop", amp)
        with dropout.mode(model, "drop"):
            return predict(model, data, split, amp=amp)


def negative_control(cfg, data, plain):
    """The plain model with the drop's number of channels, chosen at random, zeroed at the ETD model's
    places (the others x the drop's factor), `control_draws` draws, per scaling of the drop:
    {scaling: {"accuracy": mean over draws, "noisy_correct": [per noisy example, fraction of draws],
    "test_correct": [per test example, fraction of draws]}}. Does dropping any channels remove
    memorization, or only ETD's memorization channels?"""
    out = {s: {"acc": [], "noisy": 0, "test": 0} for s in dropout.DROP_SCALINGS}
    for draw in range(cfg.control_draws):
        ctl = model_for(cfg, data, dropout=dropout.random_drop_factory(
            cfg.p_gen, cfg.p_mem, derive_seed(cfg.model_seed, "negative_control", draw)))
        ctl.load_state_dict(plain.state_dict())
        for s, rescale in dropout.DROP_SCALINGS.items():
            with dropout.drop_scaling(ctl, rescale):
                train_pred, test_pred = (predict(ctl, data, split, amp=cfg.amp) for split in ("train", "test"))
            acc = split_accuracy(train_pred, test_pred, data)
            o = out[s]
            o["acc"].append({**acc, "gap": acc["train"] - acc["test"]})
            o["noisy"] = o["noisy"] + (train_pred[data.noisy_idx] == data.y_train[data.noisy_idx]).int()
            o["test"] = o["test"] + (test_pred == data.y_test).int()
    n = cfg.control_draws
    return {s: {"accuracy": {k: sum(a[k] for a in o["acc"]) / n for k in COLUMNS + split_kinds(cfg.memorized)},
                "noisy_correct": [c / n for c in o["noisy"].tolist()],
                "test_correct": [c / n for c in o["test"].tolist()]}
            for s, o in out.items()} if n else {}


def etd_curves(data, cfg):
    """on_epoch hook: the ETD model's accuracies in tied mode and in drop mode with each scaling, as
    "drop_rescaled" / "drop_unscaled" (the metrics row itself is keep mode)."""
    return lambda model: lambda epoch: {"tied": dropout.evaluate(model, data, "tied", cfg.amp)[0],
                                        **{f"drop_{s}": evaluate_drop(model, data, s, cfg.amp)[0]
                                           for s in dropout.DROP_SCALINGS}}


def drop_mode_label(scaling):
    """The table's mode of a drop-mode row: "drop rescaled" | "drop unscaled"."""
    return f"drop {scaling}"


def row(label, acc, mode="-", kinds=()):
    """A table row: COLUMNS, and the accuracy of each kind of `kinds` (split_kinds: memorized=both's
    mislabeled and atypical)."""
    return {"model": label, "mode": mode, **{k: acc[k] for k in COLUMNS + tuple(kinds)}}


def row_columns(rows):
    """COLUMNS, then the kinds the rows hold (memorized=both: mislabeled, atypical)."""
    return COLUMNS + tuple(k for k in SPLIT_KINDS if rows and k in rows[0])


def print_table(rows):
    columns = row_columns(rows)
    print(f"\n{'model':<46} {'mode':<13} " + " ".join(f"{c:>10}" for c in columns))
    for r in rows:
        cells = " ".join(f"{'-':>10}" if r[c] is None else f"{100 * r[c]:>9.1f}%" for c in columns)
        print(f"{r['model']:<46} {r['mode']:<13} {cells}")


# ----------------------------------------------------------------------------- figures

def bar_chart(rows, cfg):
    """Grouped bars: one group per subset, one bar per (model, mode) row of the table."""
    fig, axes = plots.figure(f"Example-tied dropout vs baselines (dropout variants: {variant_epochs(cfg)} epochs)", cfg,
                             panel=(11, 4.2))
    ax, subsets = axes[0, 0], ("clean", "noisy", "noisy_true", "test") + row_columns(rows)[len(COLUMNS):]
    shown = [r for r in rows if r["mode"] == "-" or f"p_mem={cfg.p_mem:g}" in r["model"] or r["model"].startswith(CONTROL)]
    w = 0.8 / len(shown)
    for i, r in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * w for j in range(len(subsets))]
        ys = [0 if r[s] is None else 100 * r[s] for s in subsets]
        label = r["model"] + ("" if r["mode"] == "-" else f" [{r['mode']}]")
        bars = ax.bar(xs, ys, w, label=label)
        for x, y, s in zip(xs, ys, subsets):
            ax.text(x, y + 1, "n/a" if r[s] is None else f"{y:.1f}", ha="center", fontsize=5.5)
    ax.set_xticks(range(len(subsets)), [plots.LABELS[s] for s in subsets], fontsize=8)
    ax.set_xlabel("subset")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    plots.legend_beside(ax, fontsize=7)  # bars reach 100% in every subset: no room above them
    return fig


def curves(metrics, plain_test, cfg):
    """ETD accuracy per epoch in each evaluation mode, the drop mode with each scaling (tied has no test
    accuracy). Metrics recorded before both scalings were: one drop panel, its scaling not recorded."""
    fig_drops = [(f"{claims.DROP_VARIANTS[s]}\n(generalization x {dropout.drop_factor(cfg.p_gen, cfg.p_mem, r):.3g}, "
                  f"memorization x 0)", f"drop_{s}") for s, r in dropout.DROP_SCALINGS.items()]
    if not any(k in r for r in metrics for _, k in fig_drops):
        fig_drops = [("drop: memorization channels zeroed\n(scaling not recorded in training)", "drop")]
    fig, axes = plots.figure(f"Example-tied dropout during training (p_gen {cfg.p_gen:g}, p_mem {cfg.p_mem:g})", cfg,
                             ncols=2 + len(fig_drops))
    panels = [("tied: own channels\n(training indices)", "tied", ("clean", "noisy")),
              ("keep: all channels,\nmemorization x p_mem", None, ("clean", "noisy", "test"))]
    panels += [(title, key, ("clean", "noisy", "noisy_true", "test")) for title, key in fig_drops]
    for ax, (title, key, keys) in zip(axes[0], panels):
        rows = metrics if key is None else [{"epoch": r["epoch"], **r[key]} for r in metrics if key in r]
        if "test" in keys:
            ax.axhline(100 * plain_test, color="gray", ls="--", lw=1, label="test, no dropout (final)")
        plots.accuracy_curves(ax, rows, keys)
        ax.set_title(title, fontsize=9)
    for ax in axes[0, :-1]:  # one legend, beside the last panel: it shows every series (the drop panel's)
        ax.get_legend().remove()
    return fig


def plot_gallery(data, scalings, drop_preds, cfg, n=8):
    """Per drop scaling: clean examples forgotten by the drop and noisy examples still memorized after it."""
    n = max(1, n)

    def spread(idx):  # n examples from all over the list (it is sorted by index, and the classes are not mixed)
        idx = torch.as_tensor(idx, dtype=torch.long)
        return idx[torch.linspace(0, len(idx) - 1, min(n, len(idx))).round().long()] if len(idx) else idx

    lines = []
    for s, v in scalings.items():
        lines += [(s, v["clean_forgotten"], f"{s}: clean,\nforgotten after\ndrop ({len(v['clean_forgotten'])})", True),
                  (s, v["noisy_still_memorized"], f"{s}: noisy,\nstill memorized\nafter drop "
                                                  f"({len(v['noisy_still_memorized'])})", False)]
    fig, axes = plots.figure("Example-tied dropout: training examples the drop changes, per scaling of the drop "
                             "(label = the label trained on, true = original label, drop = prediction after the drop)",
                             cfg, ncols=n, nrows=len(lines), panel=(1.7, 1.9))
    for r, (s, idx, what, clean) in enumerate(lines):
        idx = spread(idx)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(idx):
                ax.axis("off")
                continue
            i = int(idx[c])
            img = data.x_train[i].cpu().numpy()
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
            lab, true, p = int(data.y_train[i]), int(data.y_true[i]), int(drop_preds[s][i])
            ax.set_title(f"#{i} label {lab}\ndrop: {p}" if clean else f"#{i} label {lab}\ntrue {true}, drop: {p}",
                         fontsize=7)
        axes[r][0].set_ylabel(what, fontsize=7)
        if not len(idx):
            axes[r][0].axis("on"), axes[r][0].text(0.5, 0.5, "none", ha="center", va="center")
    return fig


def plot_sweep(drops, tied, plain_test, cfg):
    """Drop-mode accuracies against p_mem, one panel per scaling of the drop."""
    fig, axes = plots.figure(f"Example-tied dropout: p_mem sweep (p_gen {cfg.p_gen:g}, drop mode)", cfg,
                             ncols=len(dropout.DROP_SCALINGS))
    pms = sorted(drops)
    for ax, s in zip(axes[0], dropout.DROP_SCALINGS):
        for k in ("clean", "noisy", "noisy_true", "test"):
            ax.plot(pms, [100 * drops[p][s][k] for p in pms], marker="o", color=plots.COLORS[k], label=plots.LABELS[k])
        ax.plot(pms, [100 * tied[p]["noisy"] for p in pms], marker="x", ls=":", color=plots.COLORS["noisy"],
                label="noisy train, tied mode")
        ax.axhline(100 * plain_test, color="gray", ls="--", lw=1, label="test, no dropout")
        ax.set_title(claims.DROP_VARIANTS[s], fontsize=9)
        ax.set_xlabel("p_mem")
        ax.set_ylabel("accuracy (%)")
    plots.legend_beside(axes[0, -1], fontsize=7)  # the same series in every panel
    return fig


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    t_start = time.time()
    plain, data, run = trained_run(cfg)                   # the no-dropout baseline (trained first if missing)
    kinds = split_kinds(cfg.memorized)                   # memorized=both: mislabeled and atypical apart
    rows = [row(f"no dropout ({cfg.epochs} epochs)", dropout.evaluate(plain, data, "keep", cfg.amp)[0], kinds=kinds)]

    # Example-tied dropout, for p_mem and every value of the optional sweep; the drop mode both ways.
    knob = dropout.scaling_name(cfg.drop_rescale)        # the scaling the "drop" keys hold
    results, drops, times, preds, etd_rows = {}, {}, {}, {}, []
    for pm in [cfg.p_mem] + [p for p in cfg.p_mem_sweep if p != cfg.p_mem]:
        name = f"etd_pgen{cfg.p_gen:g}_pmem{pm:g}_ep{variant_epochs(cfg)}"
        etd, etd_run, times[name] = train_variant(
            cfg, data, run, name, dropout.etd_factory(cfg.p_gen, pm, cfg.model_seed, cfg.drop_rescale),
            {"p_gen": cfg.p_gen, "p_mem": pm}, on_epoch=etd_curves(data, cfg))
        label = f"example-tied p_gen={cfg.p_gen:g} p_mem={pm:g}"
        results[pm], drops[pm] = {}, {}
        for m in ("tied", "keep"):
            results[pm][m], preds[pm, m] = dropout.evaluate(etd, data, m, cfg.amp)
            etd_rows.append(row(label, results[pm][m], m, kinds))
        for s in dropout.DROP_SCALINGS:
            drops[pm][s], preds[pm, s] = evaluate_drop(etd, data, s, cfg.amp)
            etd_rows.append(row(label, drops[pm][s], drop_mode_label(s), kinds))
        results[pm]["drop"] = drops[pm][knob]
        if pm == cfg.p_mem:
            etd_model, main_run = etd, etd_run

    # Standard (unit-wise) dropout at the rate ETD drops in expectation: (1 - p_gen)(1 - p_mem).
    rate = dropout.matched_rate(cfg.p_gen, cfg.p_mem)
    name = f"standard_dropout_p{rate:.4g}_ep{variant_epochs(cfg)}"
    std, _, times[name] = train_variant(cfg, data, run, name, dropout.standard_dropout_factory(rate),
                                        {"dropout_rate": rate})
    rows.append(row(f"standard dropout p={rate:.3g}", dropout.evaluate(std, data, "keep", cfg.amp)[0], kinds=kinds))
    with autocast(data.device, cfg.amp):  # the re-estimate in the precision of every other forward
        recalibrated = dropout.recalibrate_batchnorm(std, data)
    rows.append(row(f"standard dropout p={rate:.3g}, BN re-estimated",   # without dropout's variance shift
                    dropout.evaluate(recalibrated, data, "keep", cfg.amp)[0], kinds=kinds))
    rows += etd_rows
    control = negative_control(cfg, data, plain)     # evaluation only: the plain model, random channels dropped
    rows += [row(f"{CONTROL} ({cfg.control_draws} draws)", c["accuracy"],
                 drop_mode_label(s), kinds) for s, c in control.items()]
    print_table(rows)

    # Per scaling: which training examples does the drop change? Forgotten clean ones, and noisy ones
    # still memorized. Per example, for paired statistics over test examples and seeds (common/claims.py):
    # the dropped ETD model's test predictions and the noisy examples' drop-mode predictions.
    tied, noisy_idx = preds[cfg.p_mem, "tied"], data.noisy_idx
    scalings, per_scaling = {}, {}
    for s, rescale in dropout.DROP_SCALINGS.items():
        drop = preds[cfg.p_mem, s]
        forgotten = torch.nonzero(~data.noisy & (tied == data.y_train) & (drop != data.y_train)).flatten()
        kept = torch.nonzero(data.noisy & (drop == data.y_train)).flatten()
        scalings[s] = {"drop_rescale": rescale, "factor": dropout.drop_factor(cfg.p_gen, cfg.p_mem, rescale),
                       "accuracy": drops[cfg.p_mem][s], "noisy_to_true_after_drop": drops[cfg.p_mem][s]["noisy_true"],
                       "clean_forgotten": forgotten.tolist(), "noisy_still_memorized": kept.tolist()}
        drop_test = evaluate_drop(etd_model, data, s, cfg.amp, split="test")
        per_scaling[s] = {"test_correct": (drop_test == data.y_test).int().tolist(),
                          "noisy_drop_correct": (drop[noisy_idx] == data.y_train[noisy_idx]).int().tolist()}
    etd = results[cfg.p_mem]
    # The keys of the earlier schema hold the scaling of `drop_rescale`; "drop_scalings" holds both.
    per_example = {"test_correct": {"plain": (predict(plain, data, "test", amp=cfg.amp) == data.y_test).int().tolist(),
                                    "drop": per_scaling[knob]["test_correct"]},
                   "noisy_index": noisy_idx.tolist(),
                   **({"noisy_kind": [KINDS[k] for k in data.kind[noisy_idx].tolist()]} if kinds else {}),
                   "noisy_drop_correct": per_scaling[knob]["noisy_drop_correct"],
                   "drop_scalings": per_scaling,
                   "negative_control": {s: {k: c[k] for k in ("noisy_correct", "test_correct")}
                                        for s, c in control.items()}}
    out = {"config": vars(cfg), "matched_dropout_rate": rate, "table": rows,
           "etd": {"p_gen": cfg.p_gen, "p_mem": cfg.p_mem, "modes": etd, "drop_rescale": cfg.drop_rescale,
                   "noisy_to_true_after_drop": etd["drop"]["noisy_true"],
                   "clean_forgotten": scalings[knob]["clean_forgotten"],
                   "noisy_still_memorized": scalings[knob]["noisy_still_memorized"],
                   "drop_scalings": scalings, "places": [m.layer for m in dropout.etd_modules(etd_model)]},
           "negative_control": {"draws": cfg.control_draws, "drop_scalings": {s: c["accuracy"] for s, c in control.items()}},
           "sweep": {f"{pm:g}": {**results[pm], "drop_scalings": drops[pm]} for pm in results},
           "plain_test": rows[0]["test"], "per_example": per_example,
           "train_seconds": times, "wall_seconds": round(time.time() - t_start, 1),
           "variant_dirs": {"etd": str(main_run.dir)}}
    write_json(run.path(results_file(cfg)), out)
    write_examples(run, data)  # examples.csv: this experiment's per-example results beside the scores
    print(f"wrote {run.path(results_file(cfg))}")
    for s, v in scalings.items():
        acc = v["accuracy"]
        print(f"after the drop, {s} (generalization channels x {v['factor']:.3g}): noisy accuracy "
              f"{100 * acc['noisy']:.1f}% (tied {100 * etd['tied']['noisy']:.1f}%), {100 * acc['noisy_true']:.1f}% of "
              f"noisy examples back to their true label; test {100 * acc['test']:.1f}% (plain "
              f"{100 * rows[0]['test']:.1f}%); {len(v['clean_forgotten'])} clean examples forgotten")
        if kinds:  # memorized=both: which kind does the drop take away?
            print("  by kind, still predicted with their training label after the drop (tied mode): "
                  + "; ".join(f"{k} {100 * acc[k]:.1f}% ({100 * etd['tied'][k]:.1f}%)" for k in kinds))
        if s in control:
            c = control[s]["accuracy"]
            print(f"  negative control, the plain model with as many random channels dropped: noisy "
                  f"{100 * c['noisy']:.1f}%, test {100 * c['test']:.1f}% (mean of {cfg.control_draws} draws)")
    print(f"wall time {out['wall_seconds']:.0f} s")
    claims.print_claims(claims.tied_dropout(out))

    # Figures.
    ecfg = SimpleNamespace(**{**vars(cfg), "epochs": variant_epochs(cfg)})
    plots.save(bar_chart(rows, cfg), run.path("example_tied_dropout_bars.png"))
    plots.save(curves(main_run.metrics(), rows[0]["test"], ecfg), run.path("example_tied_dropout_curves.png"))
    plots.save(plot_gallery(data, scalings, {s: preds[cfg.p_mem, s] for s in scalings}, cfg, cfg.gallery_size),
               run.path("example_tied_dropout_gallery.png"))
    if len(results) > 1:
        plots.save(plot_sweep(drops, {pm: r["tied"] for pm, r in results.items()}, rows[0]["test"], ecfg),
                   run.path("example_tied_dropout_sweep.png"))
    return out


if __name__ == "__main__":
    cli.run(main)
