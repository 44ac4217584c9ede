"""Scale study: the reproduction at several values of one knob, and how each claim's verdict moves.

    python sweep.py --key=width --values=[0.25,0.5,1.0] [configs/preset.py] [--key=value ...]
    python sweep.py --key=width --values=[0.25,0.5,1.0] --n_seeds=[3,3,1]   # 3 seeds, 3 seeds, 1 seed
    python sweep.py --key=retrain_epochs --values=[3,20] --seeds=[0]        # a knob of one experiment

For every value, reproduce.py runs the five experiments (and the variants the claims need) with
--<key>=<value>, into its own report, reports/<name>_<key><value>/ (REPORT.md, claims.json,
timings.json). A knob that identifies the trained run (width, epochs, lr, ...) gives every value its
own run directories side by side; any other knob (a retraining budget, a BatchNorm mode, a unit
definition) shares the trained run and re-runs only the experiments that read it. Finished work is
reused: an experiment whose JSON holds the same configuration (reproduce.py), and a whole value whose
report was made from the same configuration (sweep.json beside it; this also keeps a value of a
non-identity knob from being re-run after the next value replaced its results in the shared run).

The scale table, docs/results/SCALE.md (the `table` knob), puts each claim's statistic, 95% CI and
verdict, as common/claims.py judged them for the value's report, against the knob's value (a table
and one figure per claim, <table stem>_claim<n>.png beside it), with the CPU and wall time of each
value, and a row for the GPU preset: its verdicts where its report exists, "not run" otherwise.
"""
import importlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter

import reproduce
from common import claims, cli, config, plots
from common.cli import UserError
from common.runs import REPO, atomic_write, read_json, write_json

# ----------------------------------------------------------------------------- knobs
key = "width"              # the knob to sweep: any key an experiment takes (not where it runs: device, runs_dir)
values = [0.25, 0.5, 1.0]  # its values, in the order of the table and the figures' x axis
seeds = [0, 1, 2]          # seeds of every value (each sets the data/noise seed and the model seed)
n_seeds = []               # per value, only the first n of `seeds`, e.g. [3,3,1]; [] = all of them
name = ""                  # report names <name>_<key><value>; default: the preset's file name, or "default"
reports_dir = "reports"    # relative to the repository root
table = "docs/results/SCALE.md"  # the scale table (relative to the repository root); figures beside it
gpu_preset = "configs/fashion_mnist_resnet9_paper.py"  # its report gives the GPU row ("" = no GPU row)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
GPU_ROW = "GPU: Fashion-MNIST at paper scale"
NOT_RESULTS = reproduce.IGNORED  # keys that cannot change a number (where it ran, what it may download)

# The number that stands for each claim in the figures: (label, the rule's thresholds to draw, percent?).
# Every number is common/claims.py's (headline() reads it from the claim's values); nothing is judged here.
HEADLINE = {
    1: ("noisy / control gradient factor, weakest group", [(claims.FACTOR, "rule: CI low > this")], False),
    2: ("share of redundant layer groups", [(0.5, "rule: a majority")], True),
    3: ("share back / (back + not back), uninformative groups aside",
        [(0.5, "yes: above"), (claims.PARTIAL_SHARE, "partial: from")], True),
    4: ("ratio of mean units, clean / noisy (weaker of clean, margin-matched)",
        [(claims.MEAN_RATIO, "rule: CI >= this")], False),
    5: ("noisy accuracy after the drop", [(claims.DROPPED, "rule: CI high <= this")], True),
}
VERDICT_COLORS = {"yes": "tab:green", "partial": "tab:orange", "no": "tab:red", "inconclusive": "tab:gray"}


def _key(arg):
    return arg[2:].partition("=")[0]


def _tag(value):
    """'0.25' for 0.25, 'eval' for 'eval': the value's part of a report name."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text).strip(".-") or "-"


def seeds_per_value(cfg):
    """One list of seeds per value: `seeds`, or its first n_seeds[i] for value i."""
    if not cfg.n_seeds:
        return [list(cfg.seeds)] * len(cfg.values)
    if len(cfg.n_seeds) != len(cfg.values) or not all(isinstance(n, int) and 1 <= n <= len(cfg.seeds)
                                                        for n in cfg.n_seeds):
        raise UserError(f"n_seeds={cfg.n_seeds!r}: give one count per value ({len(cfg.values)}), each from 1 to "
                        f"len(seeds) = {len(cfg.seeds)}, e.g. --n_seeds={[len(cfg.seeds)] * (len(cfg.values) - 1) + [1]}")
    return [list(cfg.seeds[:n]) for n in cfg.n_seeds]


def _abs(path):
    return Path(path) if Path(path).is_absolute() else REPO / path


def fingerprint(modules, presets, rest, cfg_repro):
    """What a value's report was made from: every experiment's resolved configuration (seeds aside,
    and keys that cannot change a number), the reproduction's own knobs and what it adds to them."""
    skip = set(NOT_RESULTS) | {"seed", "model_seed", "config_file"}
    exps = {}
    for exp, m in modules.items():
        resolved = vars(config.parse(m.KNOBS, presets + [a for a in rest if _key(a) in m.KNOBS]))
        exps[exp] = {k: v for k, v in resolved.items() if k not in skip}
    extra = {k: repr(getattr(reproduce, k, None)) for k in ("DEFAULTS", "VARIANTS")}
    repro = {k: v for k, v in vars(cfg_repro).items() if k not in ("jobs", "threads")}  # how, not what
    return json.loads(json.dumps({"experiments": exps, "reproduce": repro, **extra}, default=repr))


# ----------------------------------------------------------------------------- the numbers of a claim

def _first_interval(text):
    """(low, high) of the first '[a, b]' or '[a%, b%]' in a CI text; (nan, nan) if none."""
    m = re.search(r"\[([-+\d.eE]+)(%?), ([-+\d.eE]+)%?\]", text or "")
    if not m:
        return float("nan"), float("nan")
    k = 100 if m.group(2) else 1
    return float(m.group(1)) / k, float(m.group(3)) / k


def headline(claim):
    """(value, low, high) of the number that stands for a judged claim (a claims.json entry)."""
    v, n = claim.get("values") or {}, claim["number"]
    nan = float("nan")
    if n == 1:
        groups = v.get("groups") or {}
        if not groups:
            return nan, nan, nan
        worst = min(groups, key=lambda g: _low(groups[g]["ci"][0]))
        return groups[worst]["factor"], *groups[worst]["ci"]
    if n == 4:  # the rule's ratio of means, against the clean and the margin-matched targets: the weaker
        sides = [e for e in (v.get("clean"), v.get("matched")) if e and e.get("mean_ratio_ci")]
        if not sides:
            return nan, nan, nan
        weaker = min(sides, key=lambda e: (_low(e["mean_ratio_ci"][0]), _num(e["mean_ratio"])))
        return _num(weaker["mean_ratio"]), *map(_num, weaker["mean_ratio_ci"])
    value = {2: "redundant_share", 3: "share", 5: "noisy_after_drop"}[n]
    ci = {3: "share_ci", 5: "noisy_ci"}.get(n)
    lo, hi = v[ci] if ci and v.get(ci) else _first_interval(claim.get("ci"))
    return _num(v.get(value)), _num(lo), _num(hi)


def _low(x):
    """A CI's lower bound for ranking: an undefined one ranks lowest."""
    x = _num(x)
    return x if np.isfinite(x) else -math.inf


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(x, pct):
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f}%" if pct else f"{x:.2f}"


# ----------------------------------------------------------------------------- the table and figures

def _table(header, rows):
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def columns(per_value):
    """The (claim number, variant) pairs judged for any value, in claim order."""
    seen = []
    for judged in per_value:
        for c in judged:
            if (c["number"], c["variant"]) not in seen:
                seen.append((c["number"], c["variant"]))
    return sorted(seen, key=lambda nv: nv[0])


def _find(judged, number, variant):
    return next((c for c in judged if c["number"] == number and c["variant"] == variant), None)


def claim_figure(number, cols, per_value, cfg, base, seed_lists, path):
    """One claim's headline number (point, 95% CI bar) against the knob's value, one series per
    variant, the rule's thresholds dashed and each point's verdict written beside it."""
    label, thresholds, pct = HEADLINE[number]
    k = 100 if pct else 1
    fig, axes = plots.figure(f"Claim {number} against {cfg.key}: {label}", None, panel=(7.5, 4.4))
    ax = axes[0, 0]
    variants = [v for n, v in cols if n == number]
    x, shown = np.arange(len(cfg.values)), []
    for j, variant in enumerate(variants):
        dx = (j - (len(variants) - 1) / 2) * 0.08
        pts = [headline(c) if c else (np.nan,) * 3 for c in (_find(jv, number, variant) for jv in per_value)]
        y, lo, hi = (k * np.array([p[i] for p in pts], dtype=float) for i in range(3))
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
        shown += [*y[np.isfinite(y)], *lo[ok], *hi[ok]]
        err = np.where(ok, [np.maximum(y - lo, 0), np.maximum(hi - y, 0)], 0)
        ax.errorbar(x + dx, y, yerr=err, marker="o", capsize=4, label=variant or f"claim {number}")
        for xi, yi, c in zip(x + dx, y, (_find(jv, number, variant) for jv in per_value)):
            if c and np.isfinite(yi):
                ax.annotate(c["verdict"], (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8,
                            color=VERDICT_COLORS.get(c["verdict"], "black"))
    for t, text in thresholds:
        ax.axhline(k * t, color="gray", ls="--", lw=1, label=text)
    if not pct and shown and min(shown) > 0:  # ratios: a log axis shows x2 the same everywhere
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain), ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(x, [f"{_tag(v)}\n({len(s)} seed{'s' * (len(s) > 1)})" for v, s in zip(cfg.values, seed_lists)])
    ax.set_xlim(-0.5, len(x) - 0.5)
    ax.set_xlabel(cfg.key)
    ax.set_ylabel(label + (" (%)" if pct else "") + "\npoint and 95% CI")
    ax.grid(alpha=0.3)
    plots.legend_beside(ax, fontsize=7)
    ax.set_title(f"base: {base}; verdicts by common/claims.py", fontsize=8)
    return plots.save(fig, path)


def gpu_row(cfg):
    """(label, {(number, variant): verdict} or None, report path or None) for the GPU preset."""
    if not cfg.gpu_preset:
        return None
    report_dir = _abs(cfg.reports_dir) / Path(cfg.gpu_preset).stem
    path = report_dir / "claims.json"
    label = f"{GPU_ROW} (`{cfg.gpu_preset}`)"
    return label, (read_json(path) if path.is_file() else None), report_dir


def write_table(cfg, base, command, seed_lists, per_value, costs, labels, machine):
    out = _abs(cfg.table)
    cols = columns(per_value)
    figs = {n: claim_figure(n, cols, per_value, cfg, base, seed_lists, out.with_name(f"{out.stem}_claim{n}.png"))
            for n in sorted({n for n, _ in cols})}
    rel = lambda p: os.path.relpath(p, out.parent)  # noqa: E731
    head = ["configuration", "seeds"] + [f"claim {n}" + (f" [{v}]" if v else "") for n, v in cols]
    rows = []
    for value, s, judged in zip(cfg.values, seed_lists, per_value):
        rows.append([f"{cfg.key} = {value!r}", len(s)]
                    + [(_find(judged, n, v) or {}).get("verdict", "-") for n, v in cols])
    gpu = gpu_row(cfg)
    if gpu:
        label, judged, report_dir = gpu
        rows.append([label, "-"] + (["not run"] * len(cols) if judged is None else
                                    [(_find(judged, n, v) or {}).get("verdict", "-") for n, v in cols]))
    stat_rows = []
    for value, s, judged in zip(cfg.values, seed_lists, per_value):
        for c in judged:
            _, _, pct = HEADLINE[c["number"]]
            y, lo, hi = headline(c)
            stat_rows.append([f"{value!r}", len(s), c["number"], c["variant"] or "-",
                              f"{_fmt(y, pct)} [{_fmt(lo, pct)}, {_fmt(hi, pct)}]", c["statistic"], c["ci"],
                              c["verdict"], c["reason"]])
    cost_rows = []
    for value, s, cost, label in zip(cfg.values, seed_lists, costs, labels):
        timings = cost.get("timings", {})
        walls = [t for k, t in timings.items() if t is not None and any(k.endswith(f"/seed{x}") for x in s)]
        cost_rows.append([f"{value!r}", len(s), f"{sum(walls):.0f}", f"{cost.get('cpu_s', 0):.0f}",
                          f"{cost.get('wall_s', 0):.0f}", f"[{label}]({rel(_abs(cfg.reports_dir) / label / 'REPORT.md')})"])
    if gpu:
        label, judged, report_dir = gpu
        done = judged is not None and (report_dir / "REPORT.md").is_file()
        cost_rows.append([GPU_ROW, "-", "-", "-", "-", f"[report]({rel(report_dir / 'REPORT.md')})" if done else
                          f"not run: `python reproduce.py {cfg.gpu_preset}` on a GPU"])
    lines = [f"# Scale study: the paper's claims against `{cfg.key}`", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{command}`. Base configuration: `{base}`; "
             f"`{cfg.key}` takes the values {', '.join(repr(v) for v in cfg.values)}. Each value is a full "
             f"reproduction (`reproduce.py`), its own report linked below. Every statistic, confidence interval "
             f"(95%, percentile bootstrap) and verdict is common/claims.py's, for that value's report, with the "
             f"rules of docs/protocol.md (\"How each claim is judged\"); nothing is judged here.", "",
             "## Verdicts", "", _table(head, rows), "",
             "## Statistics", "",
             "`headline` is the number each figure plots for the claim (point [95% CI]); `statistic` and "
             "`95% CI` are the claim's own.", "",
             _table([cfg.key, "seeds", "claim", "variant", "headline", "statistic", "95% CI", "verdict", "why"],
                    stat_rows), "",
             "## Figures", "",
             *[f"![claim {n}]({rel(p)})\n" for n, p in figs.items()],
             "## Cost", "",
             f"Machine: {machine}. Experiments' wall time: the sum of the value's timings.json (an experiment "
             f"reused from another value or an earlier invocation counts 0). Sweep CPU and wall time: this "
             f"process while reproduce.py ran the value in the invocation that completed it (process CPU time, "
             f"all threads; an interrupted invocation's time is not counted).",
             "", _table([cfg.key, "seeds", "experiments' wall time (s)", "sweep CPU time (s)", "sweep wall time (s)",
                         "report"], cost_rows), ""]
    atomic_write(out, "\n".join(lines))
    return out


# ----------------------------------------------------------------------------- the sweep

def main(argv=()):
    argv = list(argv)
    own = [a for a in argv if a.startswith("--") and _key(a) in KNOBS]
    passed = [a for a in argv if a not in own]  # presets, reproduce.py's other knobs, experiment keys
    cfg = config.parse(KNOBS, own)
    _, presets, rest = reproduce.split_argv(passed)
    modules = {e: importlib.import_module(e) for e in reproduce.EXPERIMENTS}
    known = set().union(*(m.KNOBS for m in modules.values()))
    if cfg.key in NOT_RESULTS or cfg.key in ("seed", "model_seed") or cfg.key not in known:
        valid = sorted(known - set(NOT_RESULTS) - {"seed", "model_seed"})
        raise UserError(f"--key={cfg.key}: not a knob whose value can change the results; valid: {', '.join(valid)}")
    if any(_key(a) == cfg.key for a in rest):
        raise UserError(f"--{cfg.key} given beside --key={cfg.key}; the sweep sets it: pass its values as --values")
    if not cfg.values or len({repr(v) for v in cfg.values}) != len(cfg.values):
        raise UserError(f"values={cfg.values!r}: give distinct values, e.g. --values=[0.25,0.5,1.0]")
    seed_lists = seeds_per_value(cfg)
    base = cfg.name or (Path(presets[-1]).stem if presets else "default")
    labels = [f"{base}_{cfg.key}{_tag(v)}" for v in cfg.values]
    if len(set(labels)) != len(labels):
        raise UserError(f"values {cfg.values!r} give the same report name twice ({labels}); give distinct values")
    repro_own = [a for a in passed if a.startswith("--") and _key(a) in reproduce.KNOBS]
    plans = []
    for value, s, label in zip(cfg.values, seed_lists, labels):  # validate every value before hours of work
        setting = f"--{cfg.key}={value!r}"
        cfg_repro = config.parse(reproduce.KNOBS, repro_own + [f"--seeds={s}", f"--name={label}",
                                                               f"--reports_dir={cfg.reports_dir}"])
        plans.append((setting, cfg_repro, fingerprint(modules, presets, rest + [setting], cfg_repro)))
    cfg_base = config.parse(modules["gradient_accounting"].KNOBS, presets + [a for a in rest if _key(a) in
                                                                             modules["gradient_accounting"].KNOBS])
    base_text = (" ".join(presets) or "the scripts' defaults") + (f" with {' '.join(rest)}" if rest else "") + \
        f" ({cfg_base.dataset}, {cfg_base.model} x{cfg_base.width:g}, {cfg_base.epochs} epochs)"

    per_value, costs = [], []
    for (setting, cfg_repro, fp), value, label in zip(plans, cfg.values, labels):
        report_dir = _abs(cfg.reports_dir) / label
        state_path, claims_path = report_dir / "sweep.json", report_dir / "claims.json"
        state = read_json(state_path) if state_path.is_file() else {}
        if state.get("fingerprint") == fp and claims_path.is_file():
            print(f"[{cfg.key}={value!r}] reusing {report_dir} (same configuration)")
        else:
            print(f"[{cfg.key}={value!r}] reproduce.py -> {report_dir}", flush=True)
            t, c = time.time(), time.process_time()
            reproduce.main(passed + [setting, f"--seeds={cfg_repro.seeds}", f"--name={label}",
                                     f"--reports_dir={cfg.reports_dir}"])
            cost = {"cpu_s": round(time.process_time() - c, 1), "wall_s": round(time.time() - t, 1)}
            if not claims_path.is_file():
                raise UserError(f"reproduce.py wrote no {claims_path}; update reproduce.py and common/report.py")
            state = {"fingerprint": fp, "seeds": cfg_repro.seeds, **cost}
            write_json(state_path, state)
        timings_path = report_dir / "timings.json"
        costs.append({**state, "timings": read_json(timings_path) if timings_path.is_file() else {}})
        per_value.append(read_json(claims_path))

    m = reproduce.machine()
    machine = f"{m['device']}, {m['cpu_threads']} CPU threads, torch {m['torch']}"
    command = " ".join(["python sweep.py"] + argv)
    path = write_table(cfg, base_text, command, seed_lists, per_value, costs, labels, machine)
    print(f"scale table: {path}")
    return path


if __name__ == "__main__":
    cli.run(main)
