"""Example-tied dropout: can memorization be directed into chosen neurons, and then dropped? (docs/protocol.md)

After every conv block (resnet9, cnn; resnet50: every stage; vit: every MLP's hidden units) the
channels are split into generalization channels (the first floor(p_gen * C), always on) and
memorization channels; each training example trains with only its own fixed subset of the
memorization channels (each kept with probability p_mem, a function of the example's index). Then
the memorization channels are dropped. On the same data and label noise as the plain run, this
trains the example-tied dropout (ETD) model and a standard-dropout model at the matched
rate, and compares them with the plain run: clean / noisy (noisy label = memorized) / noisy (true
label) / test accuracy and the generalization gap, the ETD model in its three evaluation modes
(tied: each training example with its own channels, keep: all channels at their expected value,
drop: memorization channels zeroed). The paper: noisy accuracy 100% -> ~3% after the drop, test
accuracy kept (judged by common/claims.py from the per-example results written here).

    python example_tied_dropout.py [configs/preset.py] [--key=value ...]
"""
import time
from types import SimpleNamespace

import torch

from common import claims, cli, config, dropout, plots
from common.evaluation import predict
from common.models import model_for
from common.precision import autocast
from common.runs import Run, write_json
from common.training import train_run, trained_run

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
p_gen = 0.5             # fraction of channels that are generalization channels (always on); why 0.5:
                        # docs/experiments/example_tied_dropout.md
p_mem = 0.2             # probability that an example keeps a memorization channel (fixed per example and layer)
drop_rescale = False    # drop mode: multiply generalization channels by (p_gen + p_mem) / p_gen as the authors'
                        # code did (False: no rescaling, as in the method's description)
etd_epochs = 0          # epochs of the dropout variants; 0 = `epochs`, the plain run's budget (the no-dropout
                        # baseline, same schedule, lr and initial weights); an earlier default was 30
p_mem_sweep = []        # optional extra p_mem values: one more ETD model each, e.g. [0.1, 0.3]
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
config.register_check("dropout_after", lambda v, cfg: dropout.check_after(v))
config.register_check("p_mem_sweep", lambda v, cfg: None if all(
    type(p) in (int, float) and 0 < p < 1 for p in v) else f"p_mem_sweep={v!r} must list values in (0, 1); "
                                                         f"e.g. --p_mem_sweep=[0.1,0.3]")

COLUMNS = ("clean", "noisy", "noisy_true", "test", "gap")


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


def etd_curves(data, cfg):
    """on_epoch hook: the ETD model's accuracies in tied and drop mode (the metrics row itself is keep mode)."""
    return lambda model: lambda epoch: {m: dropout.evaluate(model, data, m, cfg.amp)[0] for m in ("tied", "drop")}


def row(label, acc, mode="-"):
    return {"model": label, "mode": mode, **{k: acc[k] for k in COLUMNS}}


def print_table(rows):
    print(f"\n{'model':<44} {'mode':<5} " + " ".join(f"{c:>10}" for c in COLUMNS))
    for r in rows:
        cells = " ".join(f"{'-':>10}" if r[c] is None else f"{100 * r[c]:>9.1f}%" for c in COLUMNS)
        print(f"{r['model']:<44} {r['mode']:<5} {cells}")


# ----------------------------------------------------------------------------- figures

def bar_chart(rows, cfg):
    """Grouped bars: one group per subset, one bar per (model, mode) row of the table."""
    fig, axes = plots.figure(f"Example-tied dropout vs baselines (dropout variants: {variant_epochs(cfg)} epochs)", cfg,
                             panel=(11, 4.2))
    ax, subsets = axes[0, 0], ("clean", "noisy", "noisy_true", "test")
    shown = [r for r in rows if r["mode"] == "-" or f"p_mem={cfg.p_mem:g}" in r["model"]]
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
    ax.set_ylim(0, 135)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    return fig


def curves(metrics, plain_test, cfg):
    """ETD accuracy per epoch in each evaluation mode (tied has no test accuracy)."""
    fig, axes = plots.figure(f"Example-tied dropout during training (p_gen {cfg.p_gen:g}, p_mem {cfg.p_mem:g})", cfg,
                             ncols=3)
    panels = [("tied: own channels (training indices)", [{"epoch": r["epoch"], **r["tied"]} for r in metrics if "tied" in r],
               ("clean", "noisy")),
              ("keep: all channels, memorization x p_mem", metrics, ("clean", "noisy", "test")),
              ("drop: memorization channels zeroed", [{"epoch": r["epoch"], **r["drop"]} for r in metrics if "drop" in r],
               ("clean", "noisy", "noisy_true", "test"))]
    for ax, (title, rows, keys) in zip(axes[0], panels):
        if "test" in keys:
            ax.axhline(100 * plain_test, color="gray", ls="--", lw=1, label="test, no dropout (final)")
        plots.accuracy_curves(ax, rows, keys)
        ax.set_title(title, fontsize=9)
    return fig


def gallery(data, clean_forgotten, noisy_kept, drop_pred, cfg, n=8):
    """Clean examples forgotten by the drop (top) and noisy examples still memorized after it (bottom)."""
    n = max(1, n)

    def spread(idx):  # n examples from all over the list (it is sorted by index, and the classes are not mixed)
        return idx[torch.linspace(0, len(idx) - 1, min(n, len(idx))).round().long().to(idx.device)] if len(idx) else idx

    fig, axes = plots.figure("Example-tied dropout: training examples the drop changes (label = the label trained on, "
                             "true = original label, drop = prediction after the drop)", cfg, ncols=n, nrows=2,
                             panel=(1.7, 1.9))
    for r, (idx, what) in enumerate(((spread(clean_forgotten), f"clean, forgotten\nafter drop ({len(clean_forgotten)})"),
                                     (spread(noisy_kept), f"noisy, still\nmemorized after\ndrop ({len(noisy_kept)})"))):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(idx):
                ax.axis("off")
                continue
            i = int(idx[c])
            img = data.x_train[i].cpu().numpy()
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray")
            lab, true, p = int(data.y_train[i]), int(data.y_true[i]), int(drop_pred[i])
            ax.set_title(f"#{i} label {lab}\ndrop: {p}" if r == 0 else f"#{i} label {lab}\ntrue {true}, drop: {p}",
                         fontsize=7)
        axes[r][0].set_ylabel(what, fontsize=7)
        if not len(idx):
            axes[r][0].axis("on"), axes[r][0].text(0.5, 0.5, "none", ha="center", va="center")
    return fig


def sweep_plot(results, plain_test, cfg):
    """Drop-mode accuracies against p_mem."""
    fig, axes = plots.figure(f"Example-tied dropout: p_mem sweep (p_gen {cfg.p_gen:g}, drop mode)", cfg)
    ax, pms = axes[0, 0], sorted(results)
    for k in ("clean", "noisy", "noisy_true", "test"):
        ax.plot(pms, [100 * results[p]["drop"][k] for p in pms], marker="o", color=plots.COLORS[k], label=plots.LABELS[k])
    ax.plot(pms, [100 * results[p]["tied"]["noisy"] for p in pms], marker="x", ls=":", color=plots.COLORS["noisy"],
            label="noisy train, tied mode")
    ax.axhline(100 * plain_test, color="gray", ls="--", lw=1, label="test, no dropout")
    ax.set_xlabel("p_mem")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return fig


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    t_start = time.time()
    plain, data, run = trained_run(cfg)                   # the no-dropout baseline (trained first if missing)
    rows = [row(f"no dropout ({cfg.epochs} epochs)", dropout.evaluate(plain, data, "keep", cfg.amp)[0])]

    # Example-tied dropout, for p_mem and every value of the optional sweep.
    results, times, preds, etd_rows = {}, {}, {}, []
    for pm in [cfg.p_mem] + [p for p in cfg.p_mem_sweep if p != cfg.p_mem]:
        name = f"etd_pgen{cfg.p_gen:g}_pmem{pm:g}_ep{variant_epochs(cfg)}"
        etd, etd_run, times[name] = train_variant(
            cfg, data, run, name, dropout.etd_factory(cfg.p_gen, pm, cfg.model_seed, cfg.drop_rescale),
            {"p_gen": cfg.p_gen, "p_mem": pm}, on_epoch=etd_curves(data, cfg))
        results[pm] = {}
        for m in dropout.MODES:
            acc, preds[pm, m] = dropout.evaluate(etd, data, m, cfg.amp)
            results[pm][m] = acc
            etd_rows.append(row(f"example-tied p_gen={cfg.p_gen:g} p_mem={pm:g}", acc, m))
        if pm == cfg.p_mem:
            etd_model, main_run = etd, etd_run

    # Standard (unit-wise) dropout at the rate ETD drops in expectation: (1 - p_gen)(1 - p_mem).
    rate = dropout.matched_rate(cfg.p_gen, cfg.p_mem)
    name = f"standard_dropout_p{rate:.4g}_ep{variant_epochs(cfg)}"
    std, _, times[name] = train_variant(cfg, data, run, name, dropout.standard_dropout_factory(rate),
                                        {"dropout_rate": rate})
    rows.append(row(f"standard dropout p={rate:.3g}", dropout.evaluate(std, data, "keep", cfg.amp)[0]))
    with autocast(data.device, cfg.amp):  # the re-estimate in the precision of every other forward
        recalibrated = dropout.recalibrate_batchnorm(std, data)
    rows.append(row(f"standard dropout p={rate:.3g}, BN re-estimated",   # without dropout's variance shift
                    dropout.evaluate(recalibrated, data, "keep", cfg.amp)[0]))
    rows += etd_rows
    print_table(rows)

    # Which training examples does the drop change? Forgotten clean ones, and noisy ones still memorized.
    tied, drop = preds[cfg.p_mem, "tied"], preds[cfg.p_mem, "drop"]
    clean_forgotten = torch.nonzero(~data.noisy & (tied == data.y_train) & (drop != data.y_train)).flatten()
    noisy_kept = torch.nonzero(data.noisy & (drop == data.y_train)).flatten()
    etd = results[cfg.p_mem]
    # Per example, for paired statistics over test examples and seeds (common/claims.py): the plain run's
    # and the dropped ETD model's test predictions, and the noisy examples' drop-mode predictions.
    with dropout.mode(etd_model, "drop"):
        drop_test = predict(etd_model, data, "test", amp=cfg.amp)
    per_example = {"test_correct": {"plain": (predict(plain, data, "test", amp=cfg.amp) == data.y_test).int().tolist(),
                                    "drop": (drop_test == data.y_test).int().tolist()},
                   "noisy_index": data.noisy_idx.tolist(),
                   "noisy_drop_correct": (drop[data.noisy_idx] == data.y_train[data.noisy_idx]).int().tolist()}
    out = {"config": vars(cfg), "matched_dropout_rate": rate, "table": rows,
           "etd": {"p_gen": cfg.p_gen, "p_mem": cfg.p_mem, "modes": etd,
                   "noisy_to_true_after_drop": etd["drop"]["noisy_true"],
                   "clean_forgotten": clean_forgotten.tolist(), "noisy_still_memorized": noisy_kept.tolist()},
           "sweep": {f"{pm:g}": results[pm] for pm in results},
           "plain_test": rows[0]["test"], "per_example": per_example,
           "train_seconds": times, "wall_seconds": round(time.time() - t_start, 1),
           "variant_dirs": {"etd": str(main_run.dir)}}
    write_json(run.path("example_tied_dropout.json"), out)
    print(f"\nafter the drop: noisy accuracy {100 * etd['drop']['noisy']:.1f}% (tied {100 * etd['tied']['noisy']:.1f}%), "
          f"{100 * etd['drop']['noisy_true']:.1f}% of noisy examples back to their true label; test "
          f"{100 * etd['drop']['test']:.1f}% (plain {100 * rows[0]['test']:.1f}%); {len(clean_forgotten)} clean "
          f"examples forgotten; {out['wall_seconds']:.0f} s")
    print(claims.tied_dropout(out).line())

    # Figures.
    ecfg = SimpleNamespace(**{**vars(cfg), "epochs": variant_epochs(cfg)})
    plots.save(bar_chart(rows, cfg), run.path("example_tied_dropout_bars.png"))
    plots.save(curves(main_run.metrics(), rows[0]["test"], ecfg), run.path("example_tied_dropout_curves.png"))
    plots.save(gallery(data, clean_forgotten, noisy_kept, drop, cfg, cfg.gallery_size), run.path("example_tied_dropout_gallery.png"))
    if len(results) > 1:
        plots.save(sweep_plot(results, rows[0]["test"], ecfg), run.path("example_tied_dropout_sweep.png"))
    return out


if __name__ == "__main__":
    cli.run(main)
