"""Figures a reader understands without the code: title, axis labels, legend, configuration subtitle."""
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from .models import MODELS  # noqa: E402

COLORS = {"clean": "tab:blue", "noisy": "tab:red", "noisy_true": "tab:orange", "test": "tab:green",
          "total": "black", "train": "tab:purple", "atypical": "tab:brown", "mislabeled": "tab:red",
          "typical": "tab:blue"}
LABELS = {"clean": "clean train", "noisy": "noisy train (noisy label = memorized)",
          "noisy_true": "noisy train (true label)", "test": "test", "total": "total", "train": "train",
          "atypical": "atypical clean train (low hold-out score)", "mislabeled": "mislabeled train",
          "typical": "typical clean train"}


def pct(x, width=0):
    """A fraction as a percentage with one decimal, "97.3%" ("-" for None): how every script prints an
    accuracy or a share."""
    return f"{'-':>{width}}" if x is None else f"{f'{100 * x:.1f}%':>{width}}"


def points(x):
    """A difference of two accuracies (fractions) in percentage points, signed: "-6.8 points"."""
    return f"{100 * x:+.1f} points"


def spread(cfg, shown="mean ± std"):
    """A title's tail " (mean ± std over 3 seeds)" where the figure averages several seeds; "" for one seed
    (a figure of one run has no spread to show). `shown` says what the figure draws ("means")."""
    seeds = getattr(cfg, "seeds", None) or ()
    return f" ({shown} over {len(seeds)} seeds)" if len(seeds) > 1 else ""


def subtitle(cfg):
    """One line describing the run: dataset, model (its width where the width applies: the zoo), noise,
    the seeds it shows, epochs."""
    width = f" x{cfg.width:g}" if cfg.model in MODELS and getattr(cfg, "width", 1) != 1 else ""
    seeds = getattr(cfg, "seeds", None)  # a figure averaged over runs (the reproduction report)
    if seeds is not None:
        seed = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (data = model seed)"
    else:
        seed = f"seed {cfg.seed}, model seed {cfg.model_seed}"
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


STRICT = False  # tests: raise instead of saving a figure whose text overflows the canvas or whose legend covers data


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
    if STRICT and (covered := legends_over_data(fig)):
        plt.close(fig)
        raise AssertionError(f"{path.name}: legend over the data: {covered[:3]}")
    runs.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    print(f"wrote {path}")
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
    legend_beside(ax)  # the curves cross the whole panel: no corner is free of them


def integer_ticks(ax, values, axis="x", most=10, keep=()):
    """Ticks at the integer values the data take, labelled as plain integers (a count axis on a log scale
    otherwise shows one "10^1"). More than `most` distinct values: a 1-2-5 series within their range,
    plus their minimum, maximum and `keep` (e.g. the medians a reader compares)."""
    v = sorted({int(round(x)) for x in values if x is not None and np.isfinite(x)})
    if len(v) > most:
        series = [m * 10 ** e for e in range(7) for m in (1, 2, 5)]
        v = sorted({t for t in series if v[0] <= t <= v[-1]} | {v[0], v[-1]}
                   | {int(round(k)) for k in keep if k is not None and np.isfinite(k)})
    if not v:
        return v
    axis_ = getattr(ax, f"{axis}axis")
    getattr(ax, f"set_{axis}ticks")(v, [str(t) for t in v])
    axis_.set_minor_locator(NullLocator())
    return v


def dots(ax, x, mean, err=None, offset=0.0, **kwargs):
    """Categories (layer groups) as dots with ± bars, no line joining them: a line between categories
    draws a trend that is not there. `err` None (one seed): dots alone."""
    x = np.arange(len(mean)) if x is None else np.asarray(x, dtype=float)
    kwargs.setdefault("fmt", "o")
    return ax.errorbar(x + offset, mean, yerr=err, ls="none", capsize=2, ms=4, **kwargs)


def heatmap(ax, grid, xlabels, ylabels, vmin=0, vmax=100, fmt="{:.0f}", cmap="viridis"):
    """A category x category grid with each cell's value written in it; returns the image (for a colorbar)."""
    grid = np.asarray(grid, dtype=float)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    mid = (vmin + vmax) / 2
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if v < mid else "black")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    return im


def legend_beside(ax, handles=None, fontsize=8):
    """The panel's legend to its right, off the data (tight_layout makes room for it)."""
    args = () if handles is None else handles
    return ax.legend(*args, fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def _data_points(ax):
    """Display coordinates of what a panel plots: line vertices, bar tops, marker positions."""
    pts = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines()]
    pts += [ax.transData.transform([[p.get_x() + p.get_width() / 2, p.get_y() + p.get_height()]])
            for p in ax.patches if hasattr(p, "get_width") and p.get_height() == p.get_height()]
    pts += [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections if len(c.get_offsets())]
    pts = [np.asarray(p, dtype=float).reshape(-1, 2) for p in pts]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def legends_over_data(fig):
    """Panels whose legend box covers one of the points they plot, and figure legends that cover a point
    of any panel (a legend over the data)."""
    fig.canvas.draw()
    renderer, found = fig.canvas.get_renderer(), []

    def covers(leg, axes):
        box = leg.get_window_extent(renderer)
        for ax in axes:
            pts = _data_points(ax)
            pts = pts[np.isfinite(pts).all(1)]
            if ((pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0) & (pts[:, 1] <= box.y1)).any():
                return ax
    for i, ax in enumerate(fig.axes):
        leg = ax.get_legend()
        if leg is not None and leg.get_visible() and covers(leg, [ax]):
            found.append(f"panel {i} ({ax.get_title()[:40]!r})")
    for leg in fig.legends:
        if leg.get_visible() and (ax := covers(leg, [a for a in fig.axes if a.get_visible() and a.axison])):
            found.append(f"the figure's legend, over panel {fig.axes.index(ax)} ({ax.get_title()[:40]!r})")
    return found
