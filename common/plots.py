"""Figures a reader understands without the code: title, axis labels, legend, configuration subtitle."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"clean": "tab:blue", "noisy": "tab:red", "noisy_true": "tab:orange", "test": "tab:green",
          "total": "black", "train": "tab:purple"}
LABELS = {"clean": "clean train", "noisy": "noisy train (noisy label = memorized)",
          "noisy_true": "noisy train (true label)", "test": "test", "total": "total", "train": "train"}


def subtitle(cfg):
    """One line describing the run: dataset, model, noise, seeds, epochs."""
    width = f" x{cfg.width:g}" if getattr(cfg, "width", 1) != 1 else ""
    seeds = getattr(cfg, "seeds", None)  # a figure averaged over runs (the reproduction report)
    seed = (f"seeds {', '.join(map(str, seeds))} (data = model seed)" if seeds is not None
            else f"seed {cfg.seed}, model seed {cfg.model_seed}")
    return (f"{cfg.dataset} | {cfg.model}{width} | {cfg.noise:.0%} label noise | {seed} | "
            f"{cfg.epochs} epochs, lr {cfg.lr:g} {cfg.schedule}")


def figure(title, cfg, ncols=1, nrows=1, panel=(5.0, 3.8), **kwargs):
    """A figure with a title and the configuration as subtitle; returns (fig, axes)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows + 0.8),
                             squeeze=False, **kwargs)
    fig.suptitle(f"{title}\n{subtitle(cfg)}" if cfg is not None else title, fontsize=11)
    return fig, axes


def save(fig, path):
    """Save as PNG atomically and close the figure; returns the path."""
    path = Path(path)
    from . import distributed
    if not distributed.is_main():  # under torchrun rank 0 draws the one copy
        plt.close(fig)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def accuracy_curves(ax, rows, keys=("clean", "noisy", "test"), x="epoch", xlabel="epoch"):
    """Accuracy (%) per epoch from metrics rows, one line per subset."""
    xs = [r[x] for r in rows]
    for k in keys:
        ax.plot(xs, [100 * r[k] for r in rows], marker=".", color=COLORS.get(k), label=LABELS.get(k, k))
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not fractions of one
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
