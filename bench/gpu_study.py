"""The scale study for one lent GPU (issue 27): the reproduction at the paper's scale and across widths,
in priority order, within a wall-clock budget, then one table of every claim per setting.

    python bench/gpu_study.py [--budget_s=540] [--jobs=8] [--stages=[1,2,3]] [--key=value ...]
    python bench/gpu_study.py --report_only=True   # only rewrite SCALE.md from what is stored
    python bench/gpu_study.py --smoke=True         # the same plan, tiny, on a CPU (about 40 s of CPU time)

The plan, in this order (each unit is one `reproduce.py` call for a chunk of seeds: `chunk_fashion` in
stage 1, `chunk` in stages 2 and 3; `jobs` processes sharing the card):
  stage 1  Fashion-MNIST at the paper's scale (configs/fashion_mnist_resnet9_paper.py: ResNet-9 width 1,
           60,000 images, 50 epochs), seeds `seeds_fashion`: all five experiments and every claim;
  stage 2  the embedded default (mnist_5k, ResNet-9) at each of `widths`, seeds `seeds_width`;
  stage 3  the embedded default itself (width 0.25), seeds `seeds_default` (toward 10).
A unit starts only while the study's wall time is under `budget_s` (the first always starts); a unit
that started runs to its end, so the budget cuts between units and every finished seed is whole. A
hard stop from outside (bench/gpu_run.sh's `timeout`) may kill a unit: its finished experiments are
stored, its seeds count only once complete, and the next invocation resumes them.

Where things go: every setting is a reproduction named after it, with reports_dir = results_dir = `out`:
<out>/<setting>/ holds its REPORT.md, claims.json (judged by common/claims.py through common/report.py),
figures and logs, and <out>/<setting>/seed<s>/ each finished experiment's result files (reproduce.py's
per-seed store: seeds add up over invocations and machines). <out>/study.json records each unit's
status; <out>/SCALE.md (figures SCALE_claim<n>.png beside it) puts each claim's statistic, 95% CI and
verdict per setting, read from the settings' claims.json: nothing is judged here. (sweep.py writes its
own table, docs/results/SCALE.md, for one knob; this one is the GPU study's.)

Other --key=value arguments go to every reproduction (e.g. --device=cuda, --variant_seeds=0).
"""
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import reproduce  # noqa: E402
import sweep  # noqa: E402
from common import claims, cli, config, data  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.report import model_name  # noqa: E402
from common.runs import atomic_write, read_json, write_json  # noqa: E402

# ----------------------------------------------------------------------------- knobs
budget_s = 540.0           # no new unit starts after this many seconds of the study's wall time (the first always starts)
jobs = 8                   # experiments at once, separate processes sharing the GPU (reproduce.py --jobs; a Fashion
                           # seed has 8 experiments and variants, 7 of them waiting on its training)
stages = [1, 2, 3]         # which stages of the plan run (1 Fashion-MNIST paper scale, 2 width sweep, 3 more default seeds)
seeds_fashion = [0, 1, 2]  # stage 1
widths = [0.5, 1.0]        # stage 2: widths of the embedded default
seeds_width = [0, 1, 2]    # stage 2, every width
seeds_default = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # stage 3
chunk = 3                  # seeds per unit (reproduce.py call) of stages 2 and 3; smaller cuts finer, larger shares the card more
chunk_fashion = 1          # seeds per unit of stage 1 (a Fashion seed alone may take minutes: one at a time)
out = "docs/results/gpu_study"  # reports, stored seeds, study.json and SCALE.md (relative to the repository root)
report_only = False        # rewrite SCALE.md from the stored reports; run nothing
smoke = False              # the same plan at tiny sizes on the CPU (SMOKE below), into `smoke_dir`
smoke_dir = ""             # where the smoke writes everything ("" = a new temporary directory)
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())

FASHION = "configs/fashion_mnist_resnet9_paper.py"
# The reproduction's own knobs the study sets (per unit); any other of its knobs may be passed.
SET_HERE = ("seeds", "name", "reports_dir", "results_dir", "jobs", "readme")
# --smoke: a seeded random subset of the embedded digits (mnist_5k is sorted by class) as every setting's
# data, a small CNN (width 0.25; stage 2 at widths 0.125 and 0.5), 2 epochs, 2 flipping targets of each kind,
# no variants; 1 seed per setting, one seed per unit. The settings and their order stay the plan's (at these
# sizes stage 1's preset keys equal stage 3's, so stage 3 reuses stage 1's runs).
SMOKE_SIZES = dict(n_train=512, n_test=256)
SMOKE = ["--model=cnn", "--width=0.25", "--epochs=2", "--batch_size=64", "--lr=0.05", "--device=cpu",
         "--rewind_epochs=[0,1]", "--retrain_epochs=1", "--n_examples=2", "--max_units=5", "--ref_batch=15", "--n_eot=1",
         "--collateral_n=50", "--etd_epochs=1", "--gallery_size=2", "--variant_seeds=0"]
SMOKE_PLAN = dict(seeds_fashion=[0], widths=[0.125, 0.5], seeds_width=[0], seeds_default=[0], chunk=1, jobs=1)


def check(cfg):
    """Refuse a bad knob value in one line (checked here, not with config.register_check, whose checks would
    also judge other scripts' keys of the same name)."""
    seeds_ok = lambda v: v and all(isinstance(s, int) and s >= 0 for s in v)  # noqa: E731
    problem = next((text for bad, text in [
        (cfg.budget_s < 0, f"budget_s={cfg.budget_s!r}: give seconds >= 0, e.g. --budget_s=540"),
        (cfg.jobs < 1, f"jobs={cfg.jobs!r}: give at least 1, e.g. --jobs=4"),
        *[(getattr(cfg, k) < 1, f"{k}={getattr(cfg, k)!r}: give at least 1 seed per unit, e.g. --{k}=3")
          for k in ("chunk", "chunk_fashion")],
        (not cfg.stages or not set(cfg.stages) <= {1, 2, 3},
         f"stages={cfg.stages!r}: give a non-empty list of 1, 2, 3, e.g. --stages=[2,3]"),
        (not cfg.widths or not all(isinstance(w, (int, float)) and w > 0 for w in cfg.widths),
         f"widths={cfg.widths!r}: give positive widths, e.g. --widths=[0.5,1.0]"),
        *[(not seeds_ok(getattr(cfg, k)), f"{k}={getattr(cfg, k)!r}: give a non-empty list of non-negative "
                                          f"integers, e.g. --{k}=[0,1,2]")
          for k in ("seeds_fashion", "seeds_width", "seeds_default")]] if bad), None)
    if problem:
        raise UserError(problem)


def settings(cfg):
    """[(stage, name, presets, arguments, seeds, what)] in priority order."""
    plan = []
    if 1 in cfg.stages:
        plan.append((1, "fashion_paper", [os.path.relpath(REPO / FASHION)], [], cfg.seeds_fashion,
                     f"Fashion-MNIST at the paper's scale (`{FASHION}`)"))
    if 2 in cfg.stages:
        plan += [(2, f"default_w{w:g}", [], [f"--width={w!r}"], cfg.seeds_width, f"the embedded default at width {w:g}")
                 for w in cfg.widths]
    if 3 in cfg.stages:
        plan.append((3, "default", [], [], cfg.seeds_default, "the embedded default (width 0.25), more seeds"))
    return plan


def units(cfg):
    """[(stage, name, presets, arguments, seeds of this unit)]: each setting's seeds in chunks, in order."""
    size = lambda stage: cfg.chunk_fashion if stage == 1 else cfg.chunk  # noqa: E731
    return [(stage, name, presets, args, seeds[i:i + size(stage)])
            for stage, name, presets, args, seeds, _ in settings(cfg) for i in range(0, len(seeds), size(stage))]


def smoke_data(root):
    """A tiny npz dataset: a seeded random subset of mnist_5k (class-sorted, so not its first rows)."""
    import numpy as np
    import torch
    x, y, xt, yt = data.load_arrays("mnist_5k", seed=0)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(x), generator=g)[:SMOKE_SIZES["n_train"]]
    te = torch.randperm(len(xt), generator=g)[:SMOKE_SIZES["n_test"]]
    path = Path(root) / "smoke.npz"
    np.savez(path, x_train=x[tr, 0].numpy(), y_train=y[tr].numpy(), x_test=xt[te, 0].numpy(), y_test=yt[te].numpy())
    return path


def _abs(path):
    return Path(path) if Path(path).is_absolute() else REPO / path


# ----------------------------------------------------------------------------- SCALE.md

def incomplete_rows(name, d, complete):
    """Rows for the stored seeds the report left out (some experiment missing, e.g. cut off): each stored
    experiment of such a seed judged alone by common/claims.py, so a cut-off seed still shows what it has."""
    rows = []
    for seed in reproduce.stored_seeds(d) if d.is_dir() else []:
        if seed in complete:
            continue
        prov = reproduce.provenance(d / f"seed{seed}")
        have = sorted({e["experiment"] for e in prov.values()}, key=reproduce.EXPERIMENTS.index)
        for file, e in sorted(prov.items(), key=lambda fe: reproduce.EXPERIMENTS.index(fe[1]["experiment"])):
            # the default results, or a variant that replaced them (one without its own results file)
            if e["variant"] and hasattr(importlib.import_module(e["experiment"]), "results_file"):
                continue
            for c in claims.judge(e["experiment"], [read_json(d / f"seed{seed}" / file)]):
                rows.append([name, seed, ", ".join(have), c.number, c.variant or "-", c.statistic, c.ci, c.verdict])
    return rows


def write_scale(cfg, outdir, state, command):
    """<out>/SCALE.md and one figure per claim, from each setting's claims.json and report.json."""
    plan = settings(cfg)
    names = [name for _, name, *_ in plan]
    per, seed_lists, about = [], [], []
    for _, name, _, _, seeds, what in plan:
        d = outdir / name
        done = (d / "claims.json").is_file() and (d / "report.json").is_file()
        per.append(read_json(d / "claims.json") if done else [])
        rep = read_json(d / "report.json") if done else {}
        seed_lists.append(rep.get("seeds", []))
        stored = reproduce.stored_seeds(d) if d.is_dir() else []
        c = rep.get("config", {})
        about.append((what, f"{c['dataset']}, {model_name(c)}, {c['epochs']} epochs" if c else "-",
                      rep.get("machine", {}).get("device", "-"), stored))
    cols = sweep.columns(per)
    out_md = outdir / "SCALE.md"
    fig_cfg = SimpleNamespace(key="setting", values=names)
    figs = {n: sweep.claim_figure(n, cols, per, fig_cfg, "the study's settings", seed_lists, outdir / f"SCALE_claim{n}.png")
            for n in sorted({n for n, _ in cols})}
    head = ["setting", "seeds in the report"] + [f"claim {n}" + (f" [{v}]" if v else "") for n, v in cols]
    verdicts = [[name, len(s) if judged else "not run"] + [(sweep._find(judged, n, v) or {}).get("verdict", "-")
                                                           if judged else "not run" for n, v in cols]
                for name, s, judged in zip(names, seed_lists, per)]
    stats = []
    for name, s, judged in zip(names, seed_lists, per):
        for c in judged:
            pct = sweep.HEADLINE[c["number"]][2]
            y, lo, hi = sweep.headline(c)
            stats.append([name, len(s), c["number"], c["variant"] or "-",
                          f"{sweep._fmt(y, pct)} [{sweep._fmt(lo, pct)}, {sweep._fmt(hi, pct)}]", c["statistic"],
                          c["ci"], c["verdict"], c["reason"]])
    setting_rows = [[name, what, run, dev, ", ".join(map(str, s)) or "-",
                     ", ".join(str(x) for x in stored if x not in s) or "-",
                     f"[REPORT.md]({name}/REPORT.md)" if judged else "not run"]
                    for name, s, judged, (what, run, dev, stored) in zip(names, seed_lists, per, about)]
    partial = [r for name, s in zip(names, seed_lists) for r in incomplete_rows(name, outdir / name, s)]
    unit_rows = [[u["stage"], u["setting"], u["seeds"], u["status"], "-" if u.get("wall_s") is None else
                  f"{u['wall_s']:.0f}"] for u in state.get("units", [])]
    lines = ["# Scale study (GPU): the paper's claims per setting", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by `{command}` (bench/gpu_study.py) from each setting's "
             f"reproduction report (`<setting>/claims.json`, made by reproduce.py from the seeds stored in "
             f"`<setting>/seed<s>/`). Every statistic, 95% confidence interval and verdict is common/claims.py's, "
             f"with the rules of docs/protocol.md (\"How each claim is judged\"); nothing is judged here. "
             f"A setting is \"not run\" until one of its seeds is complete.", "",
             "## Verdicts", "", sweep._table(head, verdicts), "",
             "## Statistics", "",
             "`headline` is the number each figure plots for the claim (point [95% CI]); `statistic` and "
             "`95% CI` are the claim's own.", "",
             sweep._table(["setting", "seeds", "claim", "variant", "headline", "statistic", "95% CI", "verdict", "why"],
                          stats), "",
             "## Incomplete seeds", "",
             "Stored seeds the reports leave out (an experiment missing: the unit was cut off or failed). Each "
             "stored experiment of such a seed judged alone by common/claims.py (one seed, no variants); not in the "
             "tables and figures above. A later run of the study completes them.", "",
             sweep._table(["setting", "seed", "experiments stored", "claim", "variant", "statistic", "95% CI",
                           "verdict"], partial) if partial else "None.", "",
             "## Figures", "", *[f"![claim {n}]({p.name})\n" for n, p in figs.items()],
             "## Settings", "",
             sweep._table(["setting", "what", "run", "device", "seeds in the report", "seeds stored, incomplete",
                           "report"], setting_rows), "",
             "## Plan", "",
             f"Units in priority order (one reproduce.py call each, jobs={state.get('jobs', '-')}); budget "
             f"{state.get('budget_s', '-')} s of wall time, after which no unit starts; study wall time "
             f"{state.get('wall_s', 0):.0f} s. \"cut off\": the unit was running when the study was stopped "
             f"from outside (its finished experiments are stored; re-running the study resumes it).", "",
             sweep._table(["stage", "setting", "seeds", "status", "wall time (s)"], unit_rows), ""]
    atomic_write(out_md, "\n".join(lines))
    return out_md


# ----------------------------------------------------------------------------- the study

def main(argv=()):
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(config.help_text(KNOBS, __file__) + "\n\nEvery other --key=value is passed to each reproduction.")
        return None
    own = [a for a in argv if a.startswith("--") and reproduce._key(a) in KNOBS]
    rest = [a for a in argv if a not in own]
    smoking = any(a in ("--smoke=True", "--smoke=1") for a in own)
    cfg = config.parse(KNOBS, ([f"--{k}={v!r}" for k, v in SMOKE_PLAN.items()] if smoking else []) + own)
    check(cfg)
    known = set().union(*(importlib.import_module(e).KNOBS for e in reproduce.EXPERIMENTS)) | set(reproduce.KNOBS)
    for a in rest:
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}; usage: python bench/gpu_study.py [--key=value ...]")
        if reproduce._key(a) in SET_HERE:
            raise UserError(f"--{reproduce._key(a)} is set by the study per unit; use --out, --chunk or the "
                            f"seeds_* knobs instead")
        if reproduce._key(a) not in known:
            raise config.unknown_key(reproduce._key(a), known | set(KNOBS))
    outdir = _abs(cfg.out)
    if cfg.smoke:
        root = Path(cfg.smoke_dir or tempfile.mkdtemp(prefix="gpu_study_smoke_"))
        root.mkdir(parents=True, exist_ok=True)
        outdir = root / "results"
        rest = SMOKE + [f"--dataset=npz:{smoke_data(root)}", f"--runs_dir={root / 'runs'}"] + rest
    command = " ".join(["python bench/gpu_study.py"] + argv)
    state_path = outdir / "study.json"
    if cfg.report_only:
        state = read_json(state_path) if state_path.is_file() else {}
        stopped = any(u["status"] == "running" for u in state.get("units", []))
        for u in state.get("units", []):  # a unit still "running" was stopped from outside, and the study with it
            u["status"] = {"running": "cut off", "pending": "not started: stopped" if stopped else "pending"}.get(
                u["status"], u["status"])
        path = write_scale(cfg, outdir, state, command)
        print(f"scale table: {path}")
        return path
    if 1 in cfg.stages and not cfg.smoke:  # the paper-scale stage needs the Fashion-MNIST files here
        try:
            data.load_arrays("fashion_mnist", download=False)
        except UserError as e:
            raise UserError(f"stage 1 needs Fashion-MNIST ({e}); on a device machine carry data/fashion-mnist "
                            f"(docs/benchmarks.md, GPU scale study), or leave stage 1 out: --stages=[2,3]")

    todo = units(cfg)
    state = {"command": command, "budget_s": cfg.budget_s, "jobs": cfg.jobs, "wall_s": 0.0,
             "units": [{"stage": s, "setting": n, "seeds": seeds, "status": "pending", "wall_s": None}
                       for s, n, _, _, seeds in todo]}
    t0, failed = time.time(), []
    for (stage, name, presets, args, seeds), u in zip(todo, state["units"]):
        if u is not state["units"][0] and time.time() - t0 >= cfg.budget_s:
            u["status"] = "not started: budget"
            continue
        u["status"] = "running"
        write_json(state_path, {**state, "wall_s": round(time.time() - t0, 1)})
        print(f"[study {time.time() - t0:.0f}s] stage {stage}: {name} seeds {seeds}", flush=True)
        t = time.time()
        try:
            reproduce.main(presets + rest + args + [f"--seeds={seeds}", f"--name={name}", f"--jobs={cfg.jobs}",
                                                     f"--reports_dir={outdir}", f"--results_dir={outdir}"])
            u["status"] = "done"
        except UserError as e:  # one unit's failure (e.g. out of memory) does not stop the others
            u["status"] = f"failed: {str(e)[:300]}"
            failed.append(f"{name} seeds {seeds}: {e}")
            print(f"[study] {name} seeds {seeds} failed: {e}", flush=True)
        u["wall_s"] = round(time.time() - t, 1)
        write_json(state_path, {**state, "wall_s": round(time.time() - t0, 1)})
    state["wall_s"] = round(time.time() - t0, 1)
    write_json(state_path, state)
    path = write_scale(cfg, outdir, state, command)
    print(f"scale table: {path}")
    if failed:
        raise UserError(f"{len(failed)} unit(s) failed, first: {failed[0]}; the others' results are in {path}")
    return path


if __name__ == "__main__":
    cli.run(main)
