"""Figures a reader understands without the code: title, axis labels, legend, configuration subtitle."""
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"clean": "tab:blue", "noisy": "tab:red", "noisy_true": "tab:orange", "test": "tab:green",
          "total": "black", "train": "tab:purple", "atypical": "tab:brown", "mislabeled": "tab:red",
          "typical": "tab:blue"}
LABELS = {"clean": "clean train", "noisy": "noisy train (noisy label = memorized)",
          "noisy_true": "noisy train (true label)", "test": "test", "total": "total", "train": "train",
          "atypical": "atypical clean train (low hold-out score)", "mislabeled": "mislabeled train",
          "typical": "typical clean train"}


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


def _wrap(text, renderer, limit):
    """Re-wrap a title's lines so that none is wider than `limit` pixels."""
    width = text.get_window_extent(renderer).width
    if width <= limit:
        return
    lines = text.get_text().split("\n")
    chars = max(20, int(max(map(len, lines)) * limit / width * 0.95))
    text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


def fit_text(fig):
    """Wrap the figure's and the panels' titles to their width, then lay the figure out."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    if fig._suptitle is not None:
        _wrap(fig._suptitle, renderer, 0.98 * fig.bbox.width)
    for ax in fig.axes:
        _wrap(ax.title, renderer, max(ax.bbox.width, 0.3 * fig.bbox.width))
    with warnings.catch_warnings():  # "not compatible with tight_layout" panels: the growth below fits them
        warnings.simplefilter("ignore")
        for _ in range(4):  # where the text still does not fit (crowded small panels), enlarge the canvas
            fig.tight_layout()
            box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
            w, h = fig.get_size_inches()
            grow_w = max(0.0, -box.x0) + max(0.0, box.x1 - w)
            grow_h = max(0.0, -box.y0) + max(0.0, box.y1 - h)
            if grow_w < 0.01 and grow_h < 0.01:
                break
            fig.set_size_inches(w + grow_w + 0.1, h + grow_h + 0.1)


def overflowing_text(fig):
    """What reaches outside the canvas: panels whose drawn text (title, labels, tick labels, legend)
    does, and the figure's own texts and legends."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox

    def outside(bb):
        return bb is not None and (bb.x0 < box.x0 - 1 or bb.x1 > box.x1 + 1 or bb.y0 < box.y0 - 1 or bb.y1 > box.y1 + 1)
    out = [f"panel {i} ({ax.get_title()[:40]!r})" for i, ax in enumerate(fig.axes)
           if ax.get_visible() and outside(ax.get_tightbbox(renderer))]
    own = [t for t in [fig._suptitle, *fig.texts] if t is not None and t.get_text().strip()] + list(fig.legends)
    return out + [getattr(a, "get_text", lambda: "legend")()[:40] for a in own if outside(a.get_window_extent(renderer))]


STRICT = False  # tests: raise instead of saving a figure whose text overflows the canvas


def save(fig, path):
    """Fit the text, save as PNG atomically and close the figure; returns the path."""
    from . import distributed, runs
    path = Path(path)
    if not distributed.is_main():  # under torchrun rank 0 draws the one copy
        plt.close(fig)
        return path
    fit_text(fig)
    if STRICT and (outside := overflowing_text(fig)):
        plt.close(fig)
        raise AssertionError(f"{path.name}: text outside the canvas: {outside[:3]}")
    runs.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
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
