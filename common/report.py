"""The reproduction report: seed-averaged tables and figures, and the paper's claims judged from the
JSON results of the experiments (reproduce.py collects them, one JSON per seed).

Every number in REPORT.md is computed here or in common/claims.py from those JSON files; nothing is
typed in. The verdicts are common.claims's: this module only lays them out.
"""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import claims, config
from . import plots
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


def _dots(ax, runs, color, label, offset=0.0, pct=True, marker="o"):
    """Per layer group the mean over seeds as a dot with a ± std bar (runs: seeds x groups; ddof=1; no bar
    for one seed). Dots, not lines: the groups are categories."""
    a = np.array(runs, dtype=float) * (100 if pct else 1)
    plots.dots(ax, None, _nanmean(a, 0), _sd(a) if len(a) > 1 else None, offset=offset, color=color, label=label,
               fmt=marker)


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
    fig, axes = figure("Gradient accounting: the noisy part vs a control of equal size (memorization phase)"
                       + plots.spread(cfg), cfg, ncols=2)
    noisy, control = "noisy (the mislabeled examples)", "control (random clean examples, as many)"
    ax = axes[0, 0]
    _dots(ax, nan(summary("noisy_rest_ratio")), COLORS["noisy"], noisy, -0.12, pct=False)
    _dots(ax, nan(summary("control_rest_ratio")), CONTROL_COLOR, control, 0.12, pct=False, marker="s")
    ax.axhline(1, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("norm(part) / norm(clean-rest)")
    ax = axes[0, 1]
    _dots(ax, nan(summary("mean_cosine_rest_noisy")), COLORS["noisy"], noisy, -0.12, pct=False)
    _dots(ax, nan(summary("mean_cosine_control_rest")), CONTROL_COLOR, control, 0.12, pct=False, marker="s")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("mean cosine(part, clean-rest) over the phase")
    for ax in axes.flat:
        _xgroups(ax, groups)
    plots.legend_beside(axes[0, 1])
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
    fig, axes = figure("Layer rewinding: accuracy (%) with one layer group alone rewound to an earlier epoch"
                       + plots.spread(cfg, "means"), cfg, ncols=3, nrows=len(modes),
                       panel=(0.55 * len(epochs) + 2.6, 0.32 * len(groups) + 1.6))
    for row, mode in enumerate(modes):
        for ax, subset in zip(axes[row], ("clean", "noisy", "test")):
            grid = _nanmean([[[100 * _rewind_acc(r, mode)[g][str(e)][subset] for e in epochs] for g in groups]
                             for r in res], 0)
            im = plots.heatmap(ax, grid, [str(e) for e in epochs], groups)
            ax.set_title(f"{LABELS[subset]}\n{claims.BN_MODES.get(mode, mode)}", fontsize=9)
            ax.set_xlabel("rewound to epoch (0 = init)")
            ax.set_ylabel("layer group (input at top)")
        fig.colorbar(im, ax=axes[row, -1], label="accuracy (%)")
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
    fig, axes = figure("Layer retraining: noisy accuracy per reset group" + plots.spread(cfg), cfg, ncols=len(panels),
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
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3, axis="y")
    plots.legend_beside(axes[0, -1], fontsize=7)
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
    if any(rec["kind"] == "atypical" for r in res for rec in r["records"]):  # memorized=both: claim 6 too
        judged.append(claims.atypical(res))
    groups = res[0]["groups"]
    fig, axes = figure("Neuron flipping: units zeroed to flip a prediction (seeds pooled)", cfg, ncols=2,
                       panel=(7.5, 4.2))  # room for the legends beside the panels (one entry per variant and kind)
    ax = axes[0, 0]
    styles = ["-", "--", ":", "-."]
    shown, medians = [], []
    for (label, seeds), c, ls in zip(runs, judged, styles * 4):
        for kind in ("noisy", "clean"):
            counts = np.sort(np.concatenate([claims.flip_counts(r, kind) for r in seeds]))
            if len(counts):
                ax.step(counts, 100 * np.arange(1, len(counts) + 1) / len(counts), where="post", color=COLORS[kind],
                        ls=ls, label=f"{kind} [{c.variant}] (median {np.median(counts):g})")
                shown.append(counts)
                medians.append(np.median(counts))
    cap = res[0]["settings"]["max_units"]
    ax.set_xscale("log")
    if shown:
        plots.integer_ticks(ax, np.concatenate(shown), keep=medians)
    ax.set_xlabel(f"units zeroed until the prediction flips\n(not flipped: {cap})")
    ax.set_ylabel("examples (cumulative %)")
    ax.grid(alpha=0.3)
    plots.legend_beside(ax, fontsize=7)
    ax = axes[0, 1]
    x, w = np.arange(len(groups)), 0.38
    for j, kind in enumerate(("noisy", "clean")):
        units = [u["group"] for r in res for rec in r["records"] if rec["kind"] == kind for u in rec["units"]]
        frac = [100 * units.count(g) / max(1, len(units)) for g in groups]
        ax.bar(x + (j - 0.5) * w, frac, w, color=COLORS[kind], label=f"{kind} examples [{judged[0].variant}]")
    ax.set_xticks(x, groups, rotation=60, fontsize=8)
    ax.set_xlabel("layer group of the zeroed unit")
    ax.set_ylabel("zeroed units (%)")
    plots.legend_beside(ax)
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
    scalings = " and ".join(claims.DROP_VARIANTS.get(s, s).removeprefix("drop: ") for s in claims.drop_scalings(res[0]))
    fig, axes = figure(f"Example-tied dropout vs baselines{plots.spread(cfg)}; drop mode: {scalings}", cfg,
                       panel=(11, 4.2))
    ax, x, w = axes[0, 0], np.arange(len(labels)), 0.2
    for j, k in enumerate(keys):
        a = vals[k]
        ax.bar(x + (j - 1.5) * w, _nanmean(a, 0), w, yerr=_sd(a) if len(a) > 1 else None, color=COLORS[k],
               label=LABELS[k], capsize=2)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3, axis="y")
    plots.legend_beside(ax, fontsize=7)
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


# ----------------------------------------------------------------------------- the claims, as a reader scans them
# The renderers below take claims as dicts (Claim.as_dict(), or claims.json read back), so the report and
# the README block (readme_block) lay out the same fields the same way; the content is common/claims.py's.

def _variant(d):
    return d.get("variant") or "the experiment's defaults"


def _verdict(d):
    """The verdict in bold, with the previous rule's verdict beside it where this release changed the rule."""
    prev = d.get("previous")
    return f"**{d['verdict']}**" + (f" (previous rule: {prev})" if prev else "")


def verdict_line(rows):
    """One line: every claim's verdict(s), variants named where a claim has several rows."""
    by = {}
    for d in rows:
        by.setdefault(d["number"], []).append(d)
    parts = []
    for n, ds in by.items():
        parts.append(f"claim {n}: " + ", ".join(d["verdict"] + (f" (previous rule: {d['previous']})" if d.get("previous")
                                                                 else "") + (f" [{_variant(d)}]" if len(ds) > 1 else "")
                                                for d in ds))
    return "; ".join(parts) + "."


def _models(rows):
    """The rows' models when they differ (a column then says which row is which model), else None."""
    models = [d.get("model", "") for d in rows]
    return models if len(set(models)) > 1 else None


def model_name(c):
    """'resnet9 x0.25' from a recorded config (the width where it applies: the zoo)."""
    width = c.get("width", 1)
    return c.get("model", "?") + (f" x{width:g}" if c.get("model") in plots.MODELS and width != 1 else "")


def summary_table(rows):
    """The verdicts first: claim, variant, verdict, statistic, CI, the one-line reason (rules below it);
    the model of each row where they differ."""
    models = _models(rows)
    return _table(["#", "variant"] + (["model"] if models else []) + ["verdict", "statistic", "95% CI", "why"],
                  [(d["number"], _variant(d)) + ((m,) if models else ()) + (_verdict(d), d["statistic"], d["ci"],
                                                                          d["reason"])
                   for d, m in zip(rows, models or [None] * len(rows))])


def rules_text(rows):
    """Each claim's statement and rule written once (and the previous rule where it changed)."""
    out, seen = [], set()
    for d in rows:
        if d["number"] in seen:
            continue
        seen.add(d["number"])
        out.append(f"- **Claim {d['number']}.** {d['statement'].rstrip('.')}. *Rule:* {d['rule'].rstrip('.')}.")
        prev = (d.get("values") or {}).get("previous_rule")
        if prev:
            out.append(f"  *Previous rule* (its verdict is shown beside the current one): {prev}.")
    return "\n".join(out)


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


def _render(v):
    return f"`{v!r}`"


def _per_seed(values, seeds):
    """One value, or each distinct value with the seeds that had it."""
    by = {}
    for seed, v in zip(seeds, values):
        by.setdefault(_render(v), []).append(str(seed))
    if len(by) == 1:
        return next(iter(by))
    return "; ".join(f"{v} (seed{'s' if len(ss) > 1 else ''} {', '.join(ss)})" for v, ss in by.items())


def configuration(cfg, results, variants):
    """The configuration of every experiment that ran: the run's keys once, then per experiment (and
    variant) each key of its recorded config that the run's table does not hold or that differs from it."""
    SEEDS = ("seed", "model_seed")  # in the header and the wall-time table
    WHERE = ("runs_dir", "config_file")  # where the files were, not what ran
    run_keys = config.RUN_DEFAULTS or vars(cfg)  # the shared block: the trained run and where it runs
    base = {k: v for k, v in vars(cfg).items() if k in run_keys and k not in SEEDS + WHERE}
    ran = [(exp, res) for exp, res in results.items()]
    ran += [(f"{exp} [{lab}]", rs) for exp, v in variants.items() for lab, rs in v.items()]
    rows = []
    for name, res in ran:
        confs = [r.get("config", {}) for r in res]
        seeds = [c.get("seed", "?") for c in confs]
        keys = [k for k in dict.fromkeys(k for c in confs for k in c) if k not in SEEDS + WHERE]
        own = [f"{k} {_per_seed([c.get(k) for c in confs], seeds)}" for k in keys
               if k not in base or any(c.get(k) != base[k] for c in confs)]
        rows.append((name, ", ".join(map(str, seeds)), ", ".join(own) or "the run's keys only"))
    return ("The run (every experiment): " + ", ".join(f"`{k}={v!r}`" for k, v in base.items()) + ".\n\n"
            + _table(["experiment", "seeds", "its own settings (as recorded in its JSON)"], rows))


def wall_times(timings, jobs=None):
    """Wall time per job and seed; a job whose results were reused from an earlier invocation says so."""
    if jobs is None:  # every timing recorded, nothing known about reuse
        jobs = [{"job": k.rsplit("/seed", 1)[0], "seed": k.rsplit("/seed", 1)[1], "reused": False} for k in timings]
    if not jobs:
        return "No wall times recorded."
    per, total = {}, 0.0
    for j in jobs:
        sec = timings.get(f"{j['job']}/seed{j['seed']}")
        total += sec or 0
        cell = f"{sec:.0f}" if sec is not None else ""
        if j["reused"]:
            cell = "reused" + (f" (took {cell} s in an earlier invocation)" if cell else " (not timed)")
        per.setdefault(j["job"], []).append(f"seed {j['seed']}: {cell}")
    n_reused = sum(j["reused"] for j in jobs)
    note = (f"{n_reused} of {len(jobs)} jobs reused results of an earlier invocation (same configuration); the "
            f"total counts the times recorded for them." if n_reused else f"All {len(jobs)} jobs ran in this invocation.")
    return (_table(["job", "wall time (s) per seed"], [(k, "; ".join(v)) for k, v in per.items()]
                   + [("all", f"{total:.0f}")]) + "\n\n" + note)


def invocations_text(invocations):
    """The invocations that ran experiments (reproduce.py's invocations.json), as a table."""
    if not invocations:
        return "No invocation that ran experiments was recorded."
    return ("Invocations that ran experiments (wall time from start to the last experiment's end):\n\n"
            + _table(["started", "command", "experiments run", "reused", "--jobs", "machine", "wall time"],
                     [(i["started"], f"`{i['command']}`", i["ran"], i["reused"], i["jobs"], i["machine"],
                       f"{i['wall_s'] / 60:.1f} min" + (" (stopped: up to its last finished experiment)"
                                                        if i.get("stopped") else "")) for i in invocations]))


def write_report(out, label, cfg, seeds, results, timings, machine, command, variants=None, notes=(), jobs=None,
                 invocations=None):
    """Write out/REPORT.md (+ figures, claims.json) from the experiments' JSON results; returns its path.

    `results`: {experiment: [JSON per seed]}; `variants`: {experiment: {label: [JSON per seed it ran
    for]}}; `notes`: sentences for the "Runs" section (e.g. which variants ran for which seeds, and why);
    `jobs`: [{"job": name in timings, "seed": s, "reused": bool}] in the order they ran (None: the timings'
    keys, reuse unknown); `invocations`: reproduce.py's record of the invocations that ran experiments."""
    variants = variants or {}
    judged, body = [], []  # judged: the claims as dicts, each with the model it was measured on
    fig_cfg = SimpleNamespace(**{**vars(cfg), "seeds": list(seeds)})  # subtitles name every seed averaged
    for exp, title, fn in SECTIONS:
        if exp not in results:
            continue
        fig_path, text, section_claims = fn(results[exp], fig_cfg, out, variants.get(exp, {}))
        for c in section_claims:  # the model each row was measured on: a variant's own, else the experiment's
            ran = next((v for lab, v in variants.get(exp, {}).items() if lab in c.variant), results[exp])
            judged.append({**c.as_dict(), "model": model_name(ran[0].get("config", vars(cfg)))})
        body += [f"## {title}", ""] + ([f"![{title}]({fig_path.name})", ""] if fig_path else []) + [text, ""]
    rows = _plain(judged)
    spread = "mean ± std over seeds (std with ddof=1)" if len(seeds) > 1 else "the one seed's values"
    lines = [f"# Reproduction report: {label}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command}` from the JSON results of "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}; seed = data/noise "
             f"seed = model seed). Tables: {spread}.", "",
             "## Verdicts", "", verdict_line(rows), "", summary_table(rows), "",
             f"Confidence intervals: percentile bootstrap, {claims.RESAMPLES} resamples, {claims.LEVEL:.0%}; each "
             f"rule below says what it resamples. Verdicts: yes / partial / no, or inconclusive (a failed control, "
             f"or the deciding quantity's CI straddles its threshold).", "",
             "## Rules", "",
             "Each verdict is computed by common/claims.py from the JSON results with the rule below, fixed in "
             "docs/protocol.md (\"How each claim is judged\") before these numbers were produced; a changed rule "
             "is recorded there under \"Rule history\".", "", rules_text(rows), "",
             "## Runs", "",
             *[f"- {n}" for n in notes], "" if notes else "All experiments ran for every seed at their defaults.", "",
             "## Configuration", "", configuration(cfg, results, variants), "",
             "## Machine and wall time", "",
             _table(["", ""], [(k, v) for k, v in machine.items()]), "", wall_times(timings, jobs), "",
             invocations_text(invocations), "",
             *body]
    table = json.dumps(rows, indent=1, allow_nan=False)
    atomic_write(out / "claims.json", table + "\n")
    about = {"label": label, "command": command, "seeds": list(seeds), "config": vars(cfg), "machine": machine,
             "invocations": list(invocations or [])}
    atomic_write(out / "report.json", json.dumps(_plain(about), indent=1, allow_nan=False) + "\n")
    path = out / "REPORT.md"
    atomic_write(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------- the README's claims block
# README.md shows one claims.json (one run: one model, one machine) between these markers; the block is
# written by `python reproduce.py --readme=PATH` and a test fails when it differs from the file.
README_BEGIN = "<!-- claims table generated from {path} by `python reproduce.py --readme={path}`: edit that file, not this table -->"
README_END = "<!-- end of the generated claims table -->"


def _about(about):
    """'ResNet-9 x0.25 ...' in words: what run the claims come from (report.json beside claims.json)."""
    if not about:
        return ""
    c, seeds = about["config"], about["seeds"]
    return (f"{model_name(c)} on {c['dataset']}, {c['noise']:.0%} label noise, {c['epochs']} epochs, "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, on {about['machine']['device']}"
            f" (`{about['command']}`)"
            + _wall_words(about.get("invocations", [])))


def _wall_words(invocations):
    """'; its experiments ran in 95 min of wall time (18 runs, 2 invocations, --jobs=2, cpu, 2 cores)'."""
    if not invocations:
        return ""
    n = len(invocations)
    how = ", ".join(sorted({f"--jobs={i['jobs']}, {i['machine']}" for i in invocations}))
    return (f"; its experiments ran in {sum(i['wall_s'] for i in invocations) / 60:.0f} min of wall time "
            f"({sum(i['ran'] for i in invocations)} runs, {n} invocation{'s' if n > 1 else ''}, {how})")


def readme_block(path, repo):
    """The README's claims block for the claims.json at `path` (relative to the repository `repo`)."""
    from .cli import UserError
    rel = Path(path).as_posix()
    src = Path(repo) / rel
    if not src.is_file():
        raise UserError(f"{rel}: no such claims file; give the claims.json of a report, e.g. docs/results/default/claims.json")
    rows = json.loads(src.read_text())
    about_path = src.with_name("report.json")
    about = json.loads(about_path.read_text()) if about_path.is_file() else {}
    report = src.with_name("REPORT.md").relative_to(repo).as_posix()
    seen, table, models = set(), [], _models(rows)
    for d, m in zip(rows, models or [None] * len(rows)):
        first = d["number"] not in seen
        seen.add(d["number"])
        table.append((d["number"] if first else "", d["statement"] if first else "", _variant(d))
                     + ((m,) if models else ()) + (_verdict(d), d["statistic"], d["ci"]))
    return "\n".join([README_BEGIN.format(path=rel), "",
                      f"From [{report}]({report}): {_about(about)}." if about else f"From [{report}]({report}).", "",
                      _table(["#", "paper claim", "variant"] + (["model"] if models else []) + ["verdict", "measured", "95% CI"], table), "",
                      README_END])


def readme_source(text):
    """The claims.json path a README's block was generated from (None without a block)."""
    head = README_BEGIN.split("{path}")[0]
    start = text.find(head)
    return None if start < 0 else text[start + len(head):].split(" ", 1)[0]


def update_readme(readme, path, repo):
    """Replace README's claims block by the one generated from `path`; returns the README's path."""
    from .cli import UserError
    text = Path(readme).read_text()
    head = README_BEGIN.split("{path}")[0]
    start, end = text.find(head), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"{readme} has no claims block (the lines {head}... and {README_END}); put them back "
                        f"where the table goes")
    atomic_write(Path(readme), text[:start] + readme_block(path, repo) + text[end + len(README_END):])
    return Path(readme)
