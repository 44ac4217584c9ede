"""The reproduction report: seed-averaged tables and figures, and the paper's claims judged from the
JSON results of the experiments (reproduce.py collects them, one JSON per seed).

Every number in REPORT.md is computed here or in common/claims.py from those JSON files; nothing is
typed in. The verdicts are common.claims's: this module only lays them out.
"""
import json
import time
from types import SimpleNamespace

import numpy as np

from . import claims
from .plots import COLORS, LABELS, figure, save
from .runs import atomic_write

CONTROL_COLOR = "tab:gray"


def _finite(values):
    return np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)


def _sd(a, axis=0):
    """Standard deviation over seeds (axis 0) with ddof=1, ignoring NaN (0 where fewer than 2 values)."""
    a = np.asarray(a, dtype=float)
    ok = np.isfinite(a)
    n = ok.sum(axis)
    m = np.where(ok, a, 0).sum(axis) / np.maximum(n, 1)
    dev = np.where(ok, a - np.expand_dims(m, axis), 0)
    return np.where(n > 1, np.sqrt((dev ** 2).sum(axis) / np.maximum(n - 1, 1)), 0.0)


def _nanmean(a, axis=0):
    """Mean over seeds ignoring NaN (NaN where there is no value), without numpy's empty-slice warning."""
    a = np.asarray(a, dtype=float)
    ok = np.isfinite(a)
    n = ok.sum(axis)
    return np.where(n > 0, np.where(ok, a, 0).sum(axis) / np.maximum(n, 1), np.nan)


def _ms(values, pct=True, digits=1):
    """'mean ± std' over seeds of the finite values (percent by default; std with ddof=1)."""
    v = _finite(values)
    if not len(v):
        return "n/a"
    k = 100 if pct else 1
    return f"{k * v.mean():.{digits}f} ± {k * _sd(v):.{digits}f}" if len(v) > 1 else f"{k * v.mean():.{digits}f}"


def _band(ax, xs, runs, color, label, pct=True, **kwargs):
    """Mean line with a ± std band over seeds (runs: seeds x points; std with ddof=1)."""
    a = np.array(runs, dtype=float) * (100 if pct else 1)
    m = _nanmean(a, 0)
    ax.plot(xs, m, marker="o", color=color, label=label, **kwargs)
    if len(a) > 1:
        s = _sd(a)
        ax.fill_between(xs, m - s, m + s, color=color, alpha=0.2)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def _xgroups(ax, groups, xlabel="layer group (input -> output)"):
    ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _ci(ci, fmt="{:.2f}"):
    lo, hi = ci
    return "n/a" if not (np.isfinite(lo) and np.isfinite(hi)) else f"[{fmt.format(lo)}, {fmt.format(hi)}]"


# ----------------------------------------------------------------------------- per experiment
# Each section: fn(results per seed, figure config, output directory, variants {label: results per seed})
# -> (figure path or None, markdown text, [claims.Claim]). A section may judge no claim.

def accounting(res, cfg, out, variants):
    claim = claims.accounting(res)
    groups = res[0]["groups"]
    summary = lambda key: [[r["summary"].get(g, {}).get(key) for g in groups] for r in res]  # noqa: E731
    nan = lambda rows: [[np.nan if v is None else v for v in row] for row in rows]  # noqa: E731
    fig, axes = figure("Gradient accounting: the noisy part vs a control of equal size (memorization phase)",
                       cfg, ncols=2)
    x = range(len(groups))
    ax = axes[0, 0]
    _band(ax, x, nan(summary("noisy_rest_ratio")), COLORS["noisy"], "norm(noisy) / norm(clean-rest)", pct=False)
    _band(ax, x, nan(summary("control_rest_ratio")), CONTROL_COLOR, "norm(control) / norm(clean-rest)", pct=False,
          ls="--")
    ax.axhline(1, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("norm ratio (mean ± std over seeds)")
    ax = axes[0, 1]
    _band(ax, x, nan(summary("mean_cosine_rest_noisy")), COLORS["noisy"], "cosine(clean-rest, noisy)", pct=False)
    _band(ax, x, nan(summary("mean_cosine_control_rest")), CONTROL_COLOR, "cosine(control, clean-rest)",
          pct=False, ls="--")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("mean cosine over the phase")
    for ax in axes.flat:
        _xgroups(ax, groups)
        ax.legend(fontsize=8)
    fig_path = save(fig, out / "gradient_accounting.png")
    per = claim.values.get("groups", {})
    rows = []
    for i, g in enumerate(groups):
        p = per.get(g)
        rows.append((g, _ms([r[i] for r in summary("noisy_rest_ratio")], pct=False, digits=2),
                     _ms([r[i] for r in summary("control_rest_ratio")], pct=False, digits=2),
                     f"{p['factor']:.2f} {_ci(p['ci'])}" if p else "n/a",
                     f"{p['negative_share']:.0%}" if p else "n/a",
                     f"{p['control_cosine']:+.2f}" if p else "n/a",
                     _ms([r[i] for r in summary("noisy_clean_ratio")], pct=False, digits=2)))
    n_control = [len(r.get("control", [])) for r in res]
    text = (f"Control group: a seeded random subset of the clean examples as large as the noisy set "
            f"({', '.join(map(str, n_control))} examples per seed), accounted as its own part: clean-rest + control "
            f"+ noisy = total. Factor = [norm(noisy)/norm(clean-rest)] / [norm(control)/norm(clean-rest)], the "
            f"geometric mean over the memorization-phase epochs of all seeds; 95% CI: bootstrap over seeds, then "
            f"epochs. Ratios and cosines are means over the phase (mean ± std over seeds).\n\n"
            + _table(["layer group", "noisy / clean-rest", "control / clean-rest", "factor [95% CI]",
                      "epochs with cos(clean-rest, noisy) < 0", "mean cos(control, clean-rest)",
                      "noisy / all clean (the paper's ratio)"], rows))
    return fig_path, text, [claim]


def _rewind_acc(r, mode):
    return claims._rewind_modes(r)[mode]


def rewinding(res, cfg, out, variants):
    judged = claims.rewinding(res)
    groups, epochs = res[0]["groups"], res[0]["rewind_epochs"]
    modes = [c.values["mode"] for c in judged]
    fig, axes = figure("Layer rewinding: one group rewound to an earlier epoch (mean ± std over seeds)", cfg,
                       ncols=3, nrows=len(modes), panel=(4.6, 3.6))
    cmap = __import__("matplotlib").colormaps["viridis"]
    for row, mode in enumerate(modes):
        for ax, subset in zip(axes[row], ("clean", "noisy", "test")):
            for j, e in enumerate(epochs):
                _band(ax, range(len(groups)), [[_rewind_acc(r, mode)[g][str(e)][subset] for g in groups] for r in res],
                      cmap(j / max(1, len(epochs) - 1)), f"rewound to epoch {e}")
            if subset == "noisy":
                ax.axhline(100 * claims.CRITICAL_NOISY, color="tab:red", ls=":", lw=1.2, label="critical threshold")
            ax.set_title(f"{LABELS[subset]}\n{claims.BN_MODES.get(mode, mode)}", fontsize=9)
            _xgroups(ax, groups, "rewound layer group")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-3, 103)
        axes[row, 1].legend(fontsize=7)
    fig_path = save(fig, out / "layer_rewinding.png")
    header, cols = ["layer group"], []
    for c in judged:
        name = claims.BN_MODES.get(c.values["mode"], c.values["mode"]).replace("BatchNorm: ", "")
        header += [f"noisy (%) [{name}]", f"clean (%) [{name}]", f"class [{name}]"]
        e = str(c.values["epoch"])
        cols.append((c, e))
    rows = []
    for g in groups:
        row = [g]
        for c, e in cols:
            acc = [_rewind_acc(r, c.values["mode"])[g][e] for r in res]
            row += [_ms([a["noisy"] for a in acc]), _ms([a["clean"] for a in acc]), c.values["classes"][g]]
        rows.append(row)
    final = {k: _ms([r["final"][k] for r in res]) for k in ("clean", "noisy", "test")}
    text = (f"Each group alone rewound to epoch {cols[0][1]} (final model: clean {final['clean']}%, noisy "
            f"{final['noisy']}%, test {final['test']}%). "
            f"Class (from the means over seeds): redundant = noisy accuracy >= {claims.CRITICAL_NOISY:.0%}; "
            f"memorization = below it while clean accuracy keeps >= {claims.CLEAN_KEPT:.0%} of the final model's; "
            f"everything = clean accuracy falls too. The last third of the groups: "
            f"{', '.join(claims.last_groups(groups))}.\n\n" + _table(header, rows))
    return fig_path, text, judged


def _retrain_noisy(groups_res, g, key, index):
    return claims._noisy(groups_res[g], key, index)


def retraining(res, cfg, out, variants):
    judged = claims.retraining(res)
    groups = list(res[0]["groups"])
    panels = [("main", judged[0].variant, [r["groups"] for r in res])]
    if len(judged) > 1:
        panels.append(("ablation", judged[1].variant, [r["ablation"]["groups"] for r in res if r.get("ablation")]))
    fig, axes = figure("Layer retraining: noisy accuracy per reset group", cfg, ncols=len(panels),
                       panel=(max(5.0, 0.8 * len(groups) + 1.5), 4.2))
    x, w = np.arange(len(groups)), 0.27
    for ax, (_, variant, seeds) in zip(axes[0], panels):
        bars = (("right after the reset", "tab:gray", lambda s, g: _retrain_noisy(s, g, "reset", 0)),
                ("after retraining on clean data", "tab:red", lambda s, g: _retrain_noisy(s, g, "final", -1)),
                ("control: retrained on all data", "tab:purple",
                 lambda s, g: s[g]["control"]["final"]["noisy"] if s[g].get("control") else np.nan))
        for k, (label, color, get) in enumerate(bars):
            a = 100 * np.array([[get(s, g) for g in groups] for s in seeds], dtype=float)
            ax.bar(x + (k - 1) * w, _nanmean(a, 0), w, yerr=_sd(a) if len(a) > 1 else None, color=color,
                   label=label, capsize=2)
        ax.axhline(100 * claims.RETAINED, color="black", ls=":", lw=1, label="threshold (memorized)")
        ax.set_title(variant if "seeds" in variant else f"{variant} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                     fontsize=9)
        ax.set_xticks(x, groups, rotation=60, fontsize=8)
        ax.set_xlabel("reset and retrained layer group")
        ax.set_ylabel("noisy train acc., noisy label (%)")
        ax.set_ylim(0, 125)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig_path = save(fig, out / "layer_retraining.png")
    header = ["layer group"]
    for c in judged:
        tag = c.variant.replace("BatchNorm: ", "BN ")
        header += [f"after reset (%) [{tag}]", f"retrained, clean data (%) [{tag}]", f"control, all data (%) [{tag}]",
                   f"class [{tag}]"]
    rows = []
    for g in groups:
        row = [g]
        for (_, _, seeds), c in zip(panels, judged):
            ctrl = [s[g]["control"]["final"]["noisy"] for s in seeds if s[g].get("control")]
            row += [_ms([_retrain_noisy(s, g, "reset", 0) for s in seeds]),
                    _ms([_retrain_noisy(s, g, "final", -1) for s in seeds]), _ms(ctrl), c.values["classes"][g]]
        rows.append(row)
    test = [[r["groups"][g].get("final", r["groups"][g]["curve"][-1])["test"] for g in groups] for r in res]
    text = (f"Noisy accuracy (w.r.t. the noisy label) of the final model with one group reset to its initial "
            f"weights, then retrained alone on the clean examples; the positive control retrains the same reset "
            f"group on all examples. Classes from the means over seeds (threshold {claims.RETAINED:.0%}; control "
            f"{claims.MEMORIZED:.0%}). Test accuracy after clean retraining: "
            f"{_ms([np.mean(t) for t in test])}% (mean over groups).\n\n" + _table(header, rows))
    return fig_path, text, judged


def _flip_rows(label, seeds):
    rows = []
    for kind in ("noisy", "clean"):
        counts = [claims.flip_counts(r, kind) for r in seeds]
        recs = [[x for x in r["records"] if x["kind"] == kind] for r in seeds]
        rows.append((label, kind, len(seeds), sum(map(len, counts)), _ms([np.median(c) for c in counts], pct=False),
                     _ms([np.mean(c) for c in counts], pct=False),
                     _ms([np.mean([x["flipped"] for x in rs]) for rs in recs]),
                     _ms([np.mean([len({u["group"] for u in x["units"]}) for x in rs]) for rs in recs], pct=False),
                     _ms([np.mean([x["accuracy_drop"]["test"] for x in rs]) for rs in recs], digits=2)))
    return rows


def flipping(res, cfg, out, variants):
    runs = [(None, res)] + list(variants.items())
    judged = [claims.flipping(seeds, variant=label) for label, seeds in runs]
    groups = res[0]["groups"]
    fig, axes = figure("Neuron flipping: units zeroed to flip a prediction (seeds pooled)", cfg, ncols=2)
    ax = axes[0, 0]
    styles = ["-", "--", ":", "-."]
    for (label, seeds), c, ls in zip(runs, judged, styles * 4):
        for kind in ("noisy", "clean"):
            counts = np.sort(np.concatenate([claims.flip_counts(r, kind) for r in seeds]))
            if len(counts):
                ax.step(counts, 100 * np.arange(1, len(counts) + 1) / len(counts), where="post", color=COLORS[kind],
                        ls=ls, label=f"{kind} [{c.variant}]")
    cap = res[0]["settings"]["max_units"]
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel(f"units zeroed until the prediction flips (not flipped: {cap})")
    ax.set_ylabel("examples (cumulative %)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    x, w = np.arange(len(groups)), 0.38
    for j, kind in enumerate(("noisy", "clean")):
        units = [u["group"] for r in res for rec in r["records"] if rec["kind"] == kind for u in rec["units"]]
        frac = [100 * units.count(g) / max(1, len(units)) for g in groups]
        ax.bar(x + (j - 0.5) * w, frac, w, color=COLORS[kind], label=f"{kind} examples [{judged[0].variant}]")
    ax.set_xticks(x, groups, rotation=60, fontsize=8)
    ax.set_xlabel("layer group of the zeroed unit")
    ax.set_ylabel("zeroed units (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig_path = save(fig, out / "neuron_flipping.png")
    rows = [row for (label, seeds), c in zip(runs, judged) for row in _flip_rows(c.variant, seeds)]
    s = res[0]["settings"]
    text = (f"Settings: {', '.join(f'{k} {v}' for k, v in s.items())}. Not-flipped examples count as {cap} units "
            f"(a lower bound). Per-seed statistics, mean ± std over seeds; the claims table pools the seeds.\n\n"
            + _table(["variant", "examples", "seeds", "n", "median units", "mean units", "flipped (%)",
                      "layer groups per example", "test acc. drop (points)"], rows))
    return fig_path, text, judged


def _etd_table(run):
    """{row label: row} of a seed's example_tied_dropout.json table. An earlier file's one "drop" row is
    named by the scaling it holds, as the script names its rows now ("drop rescaled", "drop unscaled")."""
    def mode(r):
        return f"drop {next(iter(claims.drop_scalings(run)))}" if r["mode"] == "drop" else r["mode"]
    return {r["model"] + (f" [{mode(r)}]" if r["mode"] != "-" else ""): r for r in run["table"]}


def tied_dropout(res, cfg, out, variants):
    judged = claims.tied_dropout(res) + [c for label, seeds in variants.items()   # e.g. the 8-place ResNet-9
                                         for c in claims.tied_dropout(seeds, variant=label)]
    keys = ("clean", "noisy", "noisy_true", "test")
    tables = [_etd_table(r) for r in res]
    labels = list(dict.fromkeys(lab for t in tables for lab in t))  # rows matched by label across seeds
    vals = {k: 100 * np.array([[np.nan if lab not in t or t[lab][k] is None else t[lab][k] for lab in labels]
                               for t in tables], dtype=float) for k in keys}
    fig, axes = figure("Example-tied dropout vs baselines (mean ± std over seeds)", cfg, panel=(11, 4.2))
    ax, x, w = axes[0, 0], np.arange(len(labels)), 0.2
    for j, k in enumerate(keys):
        a = vals[k]
        ax.bar(x + (j - 1.5) * w, _nanmean(a, 0), w, yerr=_sd(a) if len(a) > 1 else None, color=COLORS[k],
               label=LABELS[k], capsize=2)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig_path = save(fig, out / "example_tied_dropout.png")
    rows = [(lab,) + tuple(_ms(vals[k][:, i] / 100) for k in keys) for i, lab in enumerate(labels)]
    text = (_table(["model [evaluation mode]", "clean train (%)", "noisy, noisy label (%)", "noisy, true label (%)",
                    "test (%)"], rows) + "\n\n" + judged[0].values.get("standard_dropout", ""))
    return fig_path, text, judged


SECTIONS = [("gradient_accounting", "1. Gradient accounting", accounting),
            ("layer_rewinding", "2. Layer rewinding", rewinding),
            ("layer_retraining", "3. Layer retraining", retraining),
            ("neuron_flipping", "4. Neuron flipping", flipping),
            ("example_tied_dropout", "5. Example-tied dropout", tied_dropout)]


def claims_table(judged):
    rows = [(c.number, c.statement, c.variant or "-", c.statistic, c.ci, c.rule, c.reason, c.verdict) for c in judged]
    return _table(["#", "claim", "variant", "statistic", "95% CI", "rule", "why", "verdict"], rows)


def _plain(x):
    """JSON-ready: numpy scalars as Python numbers, tuples as lists, NaN and infinities as None (JSON has none)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def write_report(out, label, cfg, seeds, results, timings, machine, command, variants=None, notes=()):
    """Write out/REPORT.md (+ figures, claims.json) from the experiments' JSON results; returns its path.

    `results`: {experiment: [JSON per seed]}; `variants`: {experiment: {label: [JSON per seed it ran
    for]}}; `notes`: sentences for the "Runs" section (e.g. which variants ran for which seeds, and why)."""
    variants = variants or {}
    judged, body = [], []
    fig_cfg = SimpleNamespace(**{**vars(cfg), "seeds": list(seeds)})  # subtitles name every seed averaged
    for exp, title, fn in SECTIONS:
        if exp not in results:
            continue
        fig_path, text, section_claims = fn(results[exp], fig_cfg, out, variants.get(exp, {}))
        judged += section_claims
        body += [f"## {title}", ""] + ([f"![{title}]({fig_path.name})", ""] if fig_path else []) + [text, ""]
    walls = {}
    for key, sec in timings.items():
        walls.setdefault(key.rsplit("/", 1)[0], []).append(sec)
    total = sum(s for v in walls.values() for s in v if s is not None)
    cfg_rows = [(k, f"`{v!r}`") for k, v in vars(cfg).items()]
    lines = [f"# Reproduction report: {label}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command}` from the JSON results of "
             f"{len(seeds)} seed(s) {seeds} (seed = data/noise seed = model seed). Tables: mean ± std over seeds "
             f"(std with ddof=1).", "", "## Paper claims", "",
             f"Each verdict is computed by common/claims.py from the JSON results with the rule beside it, fixed "
             f"in docs/protocol.md (\"How each claim is judged\") before these numbers were produced: yes / partial "
             f"/ no, or inconclusive when a control fails. Confidence intervals: percentile bootstrap, "
             f"{claims.RESAMPLES} resamples, {claims.LEVEL:.0%}; each rule says what it resamples.", "",
             claims_table(judged), "", "## Runs", "",
             *[f"- {n}" for n in notes], "" if notes else "All experiments ran for every seed at their defaults.", "",
             "## Machine and wall time", "",
             _table(["", ""], [(k, v) for k, v in machine.items()]), "",
             _table(["experiment", "wall time per seed (s)", "total (s)"],
                    [(e, ", ".join("reused" if s is None else f"{s:.0f}" for s in v),
                      f"{sum(s for s in v if s is not None):.0f}") for e, v in walls.items()]
                    + [("all", "", f"{total:.0f}")]), "",
             *body, "## Configuration", "", _table(["key", "value"], cfg_rows), ""]
    table = json.dumps(_plain([c.as_dict() for c in judged]), indent=1, allow_nan=False)
    atomic_write(out / "claims.json", table + "\n")
    path = out / "REPORT.md"
    atomic_write(path, "\n".join(lines))
    return path
