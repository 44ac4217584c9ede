"""Reproduce the paper on one configuration: the five experiments for several seeds, then a report.

    python reproduce.py [configs/preset.py] [--seeds=[0,1,2]] [--key=value ...]
    make reproduce [CONFIG=configs/cifar10_resnet9.py]

For every seed s the five scripts run in order with --seed=s --model_seed=s (gradient accounting
first: it trains the run the others reuse), then, for the first `variant_seeds` seeds, the variants
the claims need beyond the scripts' defaults (VARIANTS). An experiment whose JSON already holds the
same configuration is reused, so a second invocation only rebuilds the report. Keys other than this
script's own are passed to every script (through a generated config file, so each script takes the
keys it knows). The report, reports/<config name>/REPORT.md, holds the paper-claims table (judged by
common/claims.py, each rule beside its verdict), the configuration, the machine, the wall times, and
seed-averaged tables and figures (mean +- std over seeds).
"""
import importlib
import platform
import sys
import time
from pathlib import Path

import torch

from common import cli, config, report
from common.cli import UserError
from common.runs import REPO, Run, atomic_write, read_json, write_json

# ----------------------------------------------------------------------------- knobs
seeds = [0, 1, 2]          # each sets both seed (data, noise) and model_seed (init, batch order)
variant_seeds = 1          # the VARIANTS and FIRST_SEEDS below run for the first this many seeds (0: none)
reports_dir = "reports"    # relative to the repository root
name = ""                  # report name; default: the preset's file name, or "default"
readme = ""                # a report's claims.json (e.g. docs/results/claims.json): regenerate README.md's claims table from it, run nothing else
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.register_check("seeds", lambda v, cfg: None if v and all(isinstance(s, int) and s >= 0 for s in v)
                      else f"seeds={v!r}: give a non-empty list of non-negative integers, e.g. --seeds=[0,1,2]")
config.range_check("variant_seeds", 0, None)

EXPERIMENTS = ("gradient_accounting", "layer_rewinding", "layer_retraining", "neuron_flipping",
               "example_tied_dropout")

# What the reproduction sets beyond a script's defaults, for every seed (a preset or --key=value still
# wins): the authors' 50 noisy + 50 clean flipping targets per seed; the retraining's positive control
# off, except for the first `variant_seeds` seeds (FIRST_SEEDS). The control asks whether a reset group
# can re-memorize when shown the noisy examples, a property of the architecture and the budget rather
# than of the seed, and it costs more than the clean retraining itself.
# Claim 5's primary row is the authors' ETD model: ResNet-18 (dropout after layer2 and layer3), at the
# width that fits the CPU budget (docs/experiments/example_tied_dropout.md); its plain run is trained there.
DEFAULTS = {"neuron_flipping": ["--n_examples=50"], "layer_retraining": ["--control=False"],
            "example_tied_dropout": ["--model=resnet18", "--width=0.125"]}
FIRST_SEEDS = {"layer_retraining": ["--control=True"]}

# The variants the claims need, for the first `variant_seeds` seeds: (experiment, label in the report,
# arguments). A variant with its own results file (module.results_file) sits beside the default one;
# one without adds its part to the same JSON (the retraining ablation), so it replaces that seed's run.
VARIANTS = [("neuron_flipping", "unit: channel_out", ["--unit=channel_out"]),
            ("neuron_flipping", "unit: channel, BatchNorm re-estimated (train pass)", ["--bn_train=True"]),
            ("layer_retraining", "frozen BatchNorm ablation", ["--bn_ablation=True"]),
            ("example_tied_dropout", "resnet9 x0.25, after every conv block", ["--model=resnet9", "--width=0.25"])]

# Keys that cannot change an experiment's numbers: the shared block's non-identity keys, except the
# layer groups (they do not identify the trained run, but every experiment's numbers are per group).
IGNORED = tuple(k for k in config.NOT_IDENTITY if k != "groups")


def _key(arg):
    """'lr' for '--lr=0.1'."""
    return arg[2:].partition("=")[0]


def split_argv(argv):
    """(this script's own arguments, preset files, --key=value overrides for the experiments)."""
    own, presets, rest = [], [], []
    for arg in argv:
        key = _key(arg) if arg.startswith("--") else None
        (own if key in KNOBS else rest if key else presets if arg.endswith(".py") else own).append(arg)
    return own, presets, rest


def overrides_file(path, overrides):
    """Write --key=value overrides as a config file (each script takes the keys it knows)."""
    lines = []
    for arg in overrides:
        key, _, text = arg[2:].partition("=")
        value = config._parse_value(key, text, "")
        lines.append(f"{key} = {value!r}")
    atomic_write(path, "# generated by reproduce.py from its command line\n" + "\n".join(lines) + "\n")
    return str(path)


def results_path(module, cfg):
    """Where the experiment writes its JSON for this configuration."""
    name = module.results_file(cfg) if hasattr(module, "results_file") else f"{module.__name__}.json"
    return Run(cfg).path(name)


def is_done(module, argv):
    """(True when the experiment's JSON exists and holds exactly this configuration, its path)."""
    cfg = config.parse(module.KNOBS, argv)
    path = results_path(module, cfg)
    if not path.is_file():
        return False, path
    saved = read_json(path).get("config", {})
    mine = {**vars(cfg), **config.train_config(cfg)}  # a run's config records derived keys too (precision)
    same = all(mine.get(k) == v for k, v in saved.items() if k not in IGNORED)
    return bool(saved) and same, path


def runs_for(cfg, modules):
    """[(experiment, variant label or None, seed, extra arguments)] in the order they run."""
    todo = []
    for i, seed in enumerate(cfg.seeds):
        replaced = {exp for exp, _, _ in VARIANTS
                    if i < cfg.variant_seeds and not hasattr(modules[exp], "results_file")}
        todo += [(exp, None, seed, []) for exp in modules if exp not in replaced]
        if i < cfg.variant_seeds:
            todo += [(exp, label, seed, args) for exp, label, args in VARIANTS]
    return todo


def machine():
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = "mps"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def main(argv=()):
    own, presets, rest = split_argv(list(argv))
    cfg = config.parse(KNOBS, own)
    if cfg.readme:
        path = report.update_readme(REPO / "README.md", cfg.readme, REPO)
        print(f"wrote {path} (its claims table, from {cfg.readme})")
        return path
    for p in presets:
        if not Path(p).is_file():
            raise UserError(f"config file {p} not found; give the path to a file in configs/")
    label = cfg.name or (Path(presets[-1]).stem if presets else "default")
    out = (Path(cfg.reports_dir) if Path(cfg.reports_dir).is_absolute() else REPO / cfg.reports_dir) / label
    modules = {e: importlib.import_module(e) for e in EXPERIMENTS}
    known = set().union(*(m.KNOBS for m in modules.values()))
    for arg in rest:  # a config file ignores keys it does not know, so a typo would pass silently
        if _key(arg) not in known:
            guess = config.closest(_key(arg), known | set(KNOBS))
            raise UserError(f"unknown key --{_key(arg)}: no experiment uses it; " +
                            (f"did you mean --{guess}?" if guess else f"valid keys: {', '.join(sorted(known | set(KNOBS)))}"))
    for exp, m in modules.items():  # validate every override before writing anything or hours of work
        config.parse(m.KNOBS, DEFAULTS.get(exp, []) + FIRST_SEEDS.get(exp, []) + presets
                     + [a for a in rest if _key(a) in m.KNOBS])
    overrides = [overrides_file(out / "overrides.py", rest)] if rest else []
    first = set(cfg.seeds[:cfg.variant_seeds])

    def argv_for(exp, seed, extra=()):
        ours = DEFAULTS.get(exp, []) + (FIRST_SEEDS.get(exp, []) if seed in first else [])
        return ours + presets + overrides + [f"--seed={seed}", f"--model_seed={seed}", *extra]

    timings_path = out / "timings.json"
    timings = read_json(timings_path) if timings_path.is_file() else {}
    t_all = time.time()
    todo, jobs = runs_for(cfg, modules), []
    for exp, variant, seed, extra in todo:
        module, argv_s = modules[exp], argv_for(exp, seed, extra)
        done, path = is_done(module, argv_s)
        what = exp + (f" [{variant}]" if variant else "")
        jobs.append({"job": what, "seed": seed, "reused": done})
        if done:
            print(f"[seed {seed}] {what}: reusing {path}")
            continue
        print(f"[seed {seed}] {what} ...", flush=True)
        t = time.time()
        module.main(argv_s)
        timings[f"{what}/seed{seed}"] = round(time.time() - t, 1)
        write_json(timings_path, timings)
    print(f"all experiments done in {time.time() - t_all:.0f}s; writing the report")
    results, variants = {}, {}
    for exp, variant, seed, extra in todo:
        data = read_json(is_done(modules[exp], argv_for(exp, seed, extra))[1])
        if variant and hasattr(modules[exp], "results_file"):
            variants.setdefault(exp, {}).setdefault(variant, []).append(data)
        else:
            results.setdefault(exp, []).append(data)
    notes = []
    if cfg.variant_seeds and VARIANTS:
        ran = cfg.seeds[:cfg.variant_seeds]
        notes.append(f"Variants beyond the defaults ran for seed(s) {ran} only (`variant_seeds`; each costs about "
                     f"one more run of its experiment): " + "; ".join(f"{e}: {lab} (`{' '.join(a)}`)"
                                                                       for e, lab, a in VARIANTS) + ".")
    notes += [f"{exp}: `{' '.join(args)}`" + (f", `{' '.join(FIRST_SEEDS[exp])}` for seed(s) "
                                               f"{cfg.seeds[:cfg.variant_seeds]}" if exp in FIRST_SEEDS else "")
              + " (reproduction defaults; a preset or --key=value overrides them)" for exp, args in DEFAULTS.items()]
    base_cfg = config.parse(modules["gradient_accounting"].KNOBS, presets + overrides)
    path = report.write_report(out, label, base_cfg, cfg.seeds, results, timings, machine(),
                               " ".join(["python reproduce.py"] + list(argv)), variants=variants, notes=notes,
                               jobs=jobs)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    cli.run(main)
