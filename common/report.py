"""The reproduction report: seed-averaged tables and figures, and the paper's claims checked against
the JSON results of the five experiments (reproduce.py collects them, one JSON per seed).

Every number in REPORT.md is computed here from those JSON files; nothing is typed in.
"""
import shutil
import time
from types import SimpleNamespace

import numpy as np

from .plots import COLORS, LABELS, figure, save

# What "holds" means for each claim (PROTOCOLS "Claims a reproduction should show").
COMPARABLE = 1 / 3     # claim 1: noisy-sum norm >= this x clean-sum norm (10% of the data alone would give ~1/9)
REDUNDANT = 0.5        # claim 2: a layer is redundant if rewinding it alone keeps >= 50% noisy accuracy
RECOVERED = 0.5        # claim 3: memorization "comes back" if final noisy accuracy >= 50%
FEW_UNITS = 10         # claim 4: "a handful" of units for noisy examples (median)
SMALL_DAMAGE = 0.05    # claim 4: collateral test-accuracy drop below 5 points
DROPPED = 0.05         # claim 5: noisy accuracy after dropping below 5%
TEST_SLACK = 0.005     # claim 5: ETD test accuracy >= plain training's minus half a point


def _ms(values, pct=True, digits=1):
    """'mean +- std' of finite values (percent by default)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    k = 100 if pct else 1
    return f"{k * v.mean():.{digits}f} ± {k * v.std():.{digits}f}" if len(v) > 1 else f"{k * v.mean():.{digits}f}"


def _mean(values):
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _band(ax, xs, runs, color, label, pct=True):
    """Mean line with a +-std band over seeds (runs: seeds x points)."""
    a = np.array(runs, dtype=float) * (100 if pct else 1)
    m, s = np.nanmean(a, 0), np.nanstd(a, 0)
    ax.plot(xs, m, marker="o", color=color, label=label)
    if len(a) > 1:
        ax.fill_between(xs, m - s, m + s, color=color, alpha=0.2)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ----------------------------------------------------------------------------- per experiment

def accounting(res, cfg, out):
    groups = res[0]["groups"]
    ratio = [[r["summary"][g]["noisy_clean_ratio"] for g in groups] for r in res]
    per_ex = [[r["summary"][g]["noisy_clean_ratio_per_example"] for g in groups] for r in res]
    cos = [[r["summary"][g]["mean_cosine"] for g in groups] for r in res]
    fig, axes = figure("Gradient accounting: noisy vs clean gradient per layer (memorization phase)", cfg, ncols=2)
    x = range(len(groups))
    _band(axes[0, 0], x, ratio, "tab:red", "norm(noisy sum) / norm(clean sum)", pct=False)
    _band(axes[0, 0], x, per_ex, "tab:purple", "same, per example", pct=False)
    axes[0, 0].axhline(1, color="gray", lw=0.8)
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("ratio (mean ± std over seeds)")
    _band(axes[0, 1], x, cos, "tab:blue", "cosine(clean sum, noisy sum)", pct=False)
    axes[0, 1].axhline(0, color="gray", lw=0.8)
    axes[0, 1].set_ylabel("mean cosine over the memorization phase")
    for ax in axes.flat:
        ax.set_xticks(list(x), groups, rotation=60, fontsize=7)
        ax.set_xlabel("layer group (input -> output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig_path = save(fig, out / "gradient_accounting.png")
    rows = [(g, _ms([r[i] for r in ratio], pct=False, digits=2), _ms([r[i] for r in per_ex], pct=False, digits=2),
             _ms([r[i] for r in cos], pct=False, digits=2)) for i, g in enumerate(groups)]
    text = _table(["layer group", "noisy/clean norm", "noisy/clean per example", "mean cosine"], rows)
    min_ratio = min(_mean([r[i] for r in ratio]) for i in range(len(groups)))
    mean_cos = [_mean([r[i] for r in cos]) for i in range(len(groups))]
    negative = sum(c < 0 for c in mean_cos)
    claim = ("Noisy examples' gradient norm is comparable to the clean examples' in every layer; negative "
             "clean/noisy cosine during memorization",
             f"min over layers of norm(noisy)/norm(clean) = {min_ratio:.2f}; cosine < 0 in {negative}/{len(groups)} "
             f"layers (mean {_mean(mean_cos):+.2f})",
             min_ratio >= COMPARABLE and negative > len(groups) / 2)
    return fig_path, text, claim


def rewinding(res, cfg, out):
    groups, epochs = res[0]["groups"], res[0]["rewind_epochs"]
    fig, axes = figure("Layer rewinding: accuracy after rewinding one layer group (mean ± std over seeds)", cfg,
                       ncols=3, panel=(4.6, 3.6))
    cmap = __import__("matplotlib").colormaps["viridis"]
    for ax, subset in zip(axes.flat, ("clean", "noisy", "test")):
        for j, e in enumerate(epochs):
            _band(ax, range(len(groups)), [[r["accuracy"][g][str(e)][subset] for g in groups] for r in res],
                  cmap(j / max(1, len(epochs) - 1)), f"rewound to epoch {e}")
        ax.set_title(LABELS[subset], fontsize=9)
        ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=7)
        ax.set_xlabel("rewound layer group")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    fig_path = save(fig, out / "layer_rewinding.png")
    e0 = str(epochs[0])
    noisy0 = [[r["accuracy"][g][e0]["noisy"] for r in res] for g in groups]
    rows = [(g, _ms(n), _ms([r["accuracy"][g][e0]["clean"] for r in res]),
             _ms([r["accuracy"][g][e0]["test"] for r in res])) for g, n in zip(groups, noisy0)]
    text = (f"Each group alone rewound to epoch {e0}:\n\n"
            + _table(["layer group", "noisy acc. (%)", "clean acc. (%)", "test acc. (%)"], rows))
    redundant = [g for g, n in zip(groups, noisy0) if _mean(n) >= REDUNDANT]
    critical = [g for g in groups if g not in redundant]
    claim = ("Rewinding single layers leaves memorization mostly intact; the critical layers are not the last",
             f"{len(redundant)}/{len(groups)} groups keep >= {REDUNDANT:.0%} noisy accuracy when rewound to epoch {e0}; "
             f"critical: {', '.join(critical) or 'none'}",
             len(redundant) > len(groups) / 2 and groups[-1] not in critical)
    return fig_path, text, claim


def retraining(res, cfg, out):
    groups = list(res[0]["groups"])
    reset = [[r["groups"][g]["curve"][0]["noisy"] for g in groups] for r in res]
    final = [[r["groups"][g]["curve"][-1]["noisy"] for g in groups] for r in res]
    test = [[r["groups"][g]["curve"][-1]["test"] for g in groups] for r in res]
    fig, axes = figure("Layer retraining on clean examples only: noisy-example accuracy (mean ± std over seeds)", cfg)
    ax, x, w = axes[0, 0], np.arange(len(groups)), 0.38
    for k, (vals, label, color) in enumerate(((reset, "after reset to init", "tab:gray"),
                                              (final, "after retraining (clean data only)", "tab:red"))):
        a = 100 * np.array(vals, dtype=float)
        ax.bar(x + (k - 0.5) * w, a.mean(0), w, yerr=a.std(0) if len(a) > 1 else None, color=color, label=label,
               capsize=3)
    ax.set_xticks(x, groups, rotation=60, fontsize=8)
    ax.set_xlabel("retrained layer group")
    ax.set_ylabel("noisy train accuracy w.r.t. noisy label (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig_path = save(fig, out / "layer_retraining.png")
    rows = [(g, _ms([r[i] for r in reset]), _ms([r[i] for r in final]), _ms([r[i] for r in test]))
            for i, g in enumerate(groups)]
    text = _table(["layer group", "noisy after reset (%)", "noisy after retraining (%)", "test after (%)"], rows)
    back = [g for i, g in enumerate(groups) if _mean([r[i] for r in final]) >= RECOVERED]
    claim = ("Retraining a single layer on clean data only brings the memorized labels back for most layers",
             f"noisy accuracy back to >= {RECOVERED:.0%} for {len(back)}/{len(groups)} groups "
             f"({', '.join(back) or 'none'})", len(back) > len(groups) / 2)
    return fig_path, text, claim


def flipping(res, cfg, out):
    groups = res[0]["groups"]
    counts = {k: [rec["n_units"] for r in res for rec in r["records"] if rec["kind"] == k and rec["flipped"]]
              for k in ("noisy", "clean")}
    fig, axes = figure("Neuron flipping: units zeroed to flip a prediction (all seeds pooled)", cfg, ncols=2)
    ax = axes[0, 0]
    for k in ("noisy", "clean"):
        c = np.sort(counts[k])
        if len(c):
            ax.step(c, np.arange(1, len(c) + 1) / len(c), where="post", color=COLORS[k], label=f"{k} examples")
    ax.set_xlabel("units zeroed until the prediction flips")
    ax.set_ylabel("fraction of flipped examples (CDF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    x, w = np.arange(len(groups)), 0.38
    for j, k in enumerate(("noisy", "clean")):
        units = [u["group"] for r in res for rec in r["records"] if rec["kind"] == k for u in rec["units"]]
        frac = [units.count(g) / max(1, len(units)) for g in groups]
        ax.bar(x + (j - 0.5) * w, frac, w, color=COLORS[k], label=f"{k} examples")
    ax.set_xticks(x, groups, rotation=60, fontsize=8)
    ax.set_xlabel("layer group of the zeroed unit")
    ax.set_ylabel("fraction of zeroed units")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig_path = save(fig, out / "neuron_flipping.png")
    s = {k: [r["summary"][k] for r in res] for k in ("noisy", "clean")}
    rows = [(k, _ms([x["units_median"] for x in s[k]], pct=False), _ms([x["units_mean"] for x in s[k]], pct=False),
             _ms([x["flipped"] for x in s[k]]), _ms([x["groups_per_example"] for x in s[k]], pct=False),
             _ms([x["accuracy_drop"]["test"] for x in s[k]]))
            for k in ("noisy", "clean")]
    text = _table(["examples", "median units", "mean units", "flipped (%)", "layer groups per example",
                   "test acc. drop (points)"], rows)
    med = {k: _mean([x["units_median"] for x in s[k]]) for k in s}
    used = {u["group"] for r in res for rec in r["records"] if rec["kind"] == "noisy" for u in rec["units"]}
    drop = _mean([x["accuracy_drop"]["test"] for x in s["noisy"]])
    claim = ("Noisy examples flip after a handful of units; clean examples need many more; units spread over "
             "layers; little collateral damage",
             f"median units noisy {med['noisy']:.1f} vs clean {med['clean']:.1f}; noisy units in {len(used)} layer "
             f"groups; test accuracy drop after a noisy edit {100 * drop:.1f} points",
             med["noisy"] <= FEW_UNITS and med["noisy"] < med["clean"] and len(used) >= 2 and drop < SMALL_DAMAGE)
    return fig_path, text, claim


def tied_dropout(res, cfg, out):
    keys = ("clean", "noisy", "noisy_true", "test")
    labels = [f"{r['model']}" + (f" [{r['mode']}]" if r["mode"] != "-" else "") for r in res[0]["table"]]
    vals = {k: 100 * np.array([[row[k] for row in r["table"]] for r in res], dtype=float) for k in keys}
    fig, axes = figure("Example-tied dropout vs baselines (mean ± std over seeds)", cfg, panel=(11, 4.2))
    ax, x, w = axes[0, 0], np.arange(len(labels)), 0.2
    for j, k in enumerate(keys):
        a = vals[k]
        ax.bar(x + (j - 1.5) * w, a.mean(0), w, yerr=a.std(0) if len(a) > 1 else None, color=COLORS[k],
               label=LABELS[k], capsize=2)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig_path = save(fig, out / "example_tied_dropout.png")
    rows = [(lab,) + tuple(_ms(vals[k][:, i] / 100) for k in keys) for i, lab in enumerate(labels)]
    text = _table(["model [evaluation mode]", "clean train (%)", "noisy, noisy label (%)", "noisy, true label (%)",
                   "test (%)"], rows)
    drop_noisy = _mean([r["etd"]["modes"]["drop"]["noisy"] for r in res])
    tied_noisy = _mean([r["etd"]["modes"]["tied"]["noisy"] for r in res])
    drop_test = _mean([r["etd"]["modes"]["drop"]["test"] for r in res])
    plain_test = _mean([r["plain_test"] for r in res])
    claim = ("Example-tied dropout: noisy accuracy ~100% -> near 0 after dropping, test accuracy kept",
             f"noisy accuracy {100 * tied_noisy:.1f}% (tied) -> {100 * drop_noisy:.1f}% (drop); test after drop "
             f"{100 * drop_test:.1f}% vs plain training {100 * plain_test:.1f}%",
             drop_noisy < DROPPED and drop_test >= plain_test - TEST_SLACK)
    return fig_path, text, claim


SECTIONS = [("gradient_accounting", "1. Gradient accounting", accounting),
            ("layer_rewinding", "2. Layer rewinding", rewinding),
            ("layer_retraining", "3. Layer retraining", retraining),
            ("neuron_flipping", "4. Neuron flipping", flipping),
            ("example_tied_dropout", "5. Example-tied dropout", tied_dropout)]


def write_report(out, label, cfg, seeds, results, timings, machine, command):
    """Write out/REPORT.md (+ figures) from the experiments' JSON results; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    claims, body = [], []
    fig_cfg = SimpleNamespace(**{**vars(cfg), "seeds": list(seeds)})  # subtitles name every seed averaged
    for exp, title, fn in SECTIONS:
        if exp not in results:
            continue
        fig_path, text, claim = fn(results[exp], fig_cfg, out)
        claims.append(claim)
        body += [f"## {title}", "", f"![{title}]({fig_path.name})", "", text, ""]
    walls = {}
    for key, sec in timings.items():
        exp = key.split("/")[0]
        walls.setdefault(exp, []).append(sec)
    total = sum(s for v in walls.values() for s in v if s is not None)
    cfg_rows = [(k, f"`{v!r}`") for k, v in vars(cfg).items()]
    lines = [f"# Reproduction report: {label}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command}` from the JSON results of "
             f"{len(seeds)} seed(s) {seeds} (seed = data/noise seed = model seed). Numbers are mean ± std over seeds.",
             "", "## Paper claims", "",
             _table(["claim", "measured here", "holds?"], [(c, m, "yes" if ok else "**no**") for c, m, ok in claims]),
             "", "## Machine and wall time", "",
             _table(["", ""], [(k, v) for k, v in machine.items()]), "",
             _table(["experiment", "wall time per seed (s)", "total (s)"],
                    [(e, ", ".join("reused" if s is None else f"{s:.0f}" for s in v),
                      f"{sum(s for s in v if s is not None):.0f}") for e, v in walls.items()]
                    + [("all", "", f"{total:.0f}")]), "",
             *body, "## Configuration", "", _table(["key", "value"], cfg_rows), ""]
    path = out / "REPORT.md"
    tmp = out / ".REPORT.md.tmp"
    tmp.write_text("\n".join(lines))
    shutil.move(str(tmp), str(path))
    return path
