"""Reproduce the paper on one configuration: the five experiments for several seeds, then a report.

    python reproduce.py [configs/preset.py] [--seeds=[0,1,2]] [--jobs=2] [--key=value ...]
    make reproduce [CONFIG=configs/cifar10_resnet9.py] [ARGS='--jobs=2']

For every seed s the five scripts run with --seed=s --model_seed=s (gradient accounting first: it
trains the run the others reuse), then, for the first `variant_seeds` seeds, the variants the claims
need beyond the scripts' defaults (VARIANTS). With --jobs=N they run as N separate processes at a time
(each with its log in <report>/logs/; on a CPU the cores divided among them, on GPUs the processes take
them in turn; a seed's other experiments wait for its training). An experiment whose JSON already holds
the same configuration is reused, so a second invocation only rebuilds the report. Keys other than this
script's own are passed to every script (through a generated config file, so each script takes the
keys it knows).

Each finished experiment's JSON (with the run's metrics, never a checkpoint) is also kept per seed in
docs/results/<name>/seed<s>/ (`results_dir`), with the code version that made it: committed, seeds run
on other machines or days add up, since the report reads every seed there. A stored seed made with
another configuration or code is refused, in one line naming the difference, before anything runs.
The report, reports/<name>/REPORT.md, holds the paper-claims table (judged by common/claims.py, each
rule beside its verdict), the configuration, the machine, the wall times, and seed-averaged tables and
figures (mean +- std over seeds).
"""
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import cli, config, report
from common.provenance import code_difference, code_version
from common.cli import UserError
from common.runs import REPO, Run, atomic_write, read_json, run_dir, write_json

# ----------------------------------------------------------------------------- knobs
seeds = [0, 1, 2]          # each sets both seed (data, noise) and model_seed (init, batch order)
variant_seeds = 1          # the VARIANTS and FIRST_SEEDS below run for the first this many seeds (0: none)
jobs = 1                   # experiments at once, each its own process with its own log (<report>/logs/); 1: in this process
threads = 0                # torch CPU threads of each process when jobs > 1; 0: this machine's cores / jobs (at least 1)
reports_dir = "reports"    # relative to the repository root
results_dir = "docs/results"  # per-seed result files, <results_dir>/<name>/seed<s>/ (commit them: the report adds up
                              # every seed there, run on any machine); "": only the run directories of `seeds`
name = ""                  # report name; default: the preset's file name, or "default"
readme = ""                # a report's claims.json (e.g. docs/results/default/claims.json): regenerate README.md's claims table from it, run nothing else
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.register_check("seeds", lambda v, cfg: None if v and all(isinstance(s, int) and s >= 0 for s in v)
                      else f"seeds={v!r}: give a non-empty list of non-negative integers, e.g. --seeds=[0,1,2]")
config.range_check("variant_seeds", 0, None)
config.range_check("jobs", 1, None)
config.range_check("threads", 0, None)

EXPERIMENTS = ("gradient_accounting", "layer_rewinding", "layer_retraining", "neuron_flipping",
               "example_tied_dropout")

# What the reproduction sets beyond a script's defaults, for every seed (a preset or --key=value still
# wins): the authors' 50 noisy + 50 clean flipping targets per seed. FIRST_SEEDS: what only the first
# `variant_seeds` seeds set (none: the retraining's positive control runs for every seed, as claim 3's
# rule judges each group on the seeds that ran it).
# Claim 5's primary row is the authors' ETD model: ResNet-18 (dropout after layer2 and layer3), at the
# width that fits the CPU budget (docs/experiments/example_tied_dropout.md); its plain run is trained there.
# The retraining's accuracy curve between the reset and the end is a cost knob (a third of its time on the
# CPU; no claim, early stop or number of the report reads it): off here.
DEFAULTS = {"layer_retraining": ["--curve_every=0"],
            "neuron_flipping": ["--n_examples=50"],
            "example_tied_dropout": ["--model=resnet18", "--width=0.125"]}
FIRST_SEEDS = {}

RUN_MODEL = "the run's model, at the zoo's dropout places"  # the ETD variant's label until variants_for() names it
# The variants the claims need, for the first `variant_seeds` seeds: (experiment, label in the report,
# arguments). A variant with its own results file (module.results_file) sits beside the default one;
# one without adds its part to the same JSON (the retraining ablation), so it replaces that seed's run.
VARIANTS = [("neuron_flipping", "unit: channel_out", ["--unit=channel_out"]),
            ("neuron_flipping", "unit: channel, BatchNorm re-estimated (train pass)", ["--bn_train=True"]),
            ("layer_retraining", "frozen BatchNorm ablation", ["--bn_ablation=True"]),
            ("example_tied_dropout", RUN_MODEL, [])]  # the run's own model: variants_for() fills in which


def variants_for(presets, rest, modules):
    """VARIANTS for this invocation. The ETD variant trains the model every other experiment trains (the
    preset's model and width, else the shared default ResNet-9 x0.25), not a fixed ResNet-9 x0.25 on the
    preset's data; none where the primary ETD row already is that model (a preset that sets `model`)."""
    shared = [a for a in rest if _key(a) in config.RUN_DEFAULTS]
    out = []
    for exp, label, args in VARIANTS:
        if exp not in modules:
            continue
        if label == RUN_MODEL:
            run = config.parse(modules["gradient_accounting"].KNOBS, presets + shared)
            etd = config.parse(modules[exp].KNOBS, DEFAULTS.get(exp, []) + presets + shared)
            if (etd.model, etd.width) == (run.model, run.width):
                continue
            args = [f"--model={run.model}", f"--width={run.width!r}"]
            label = (f"{report.model_name({'model': run.model, 'width': run.width})}, "
                     + ("after every conv block" if run.model == "resnet9" else "at the zoo's dropout places"))
        out.append((exp, label, args))
    return out


def overridden(module, args, presets, rest):
    """', here `--n_examples=20` (preset or command line)' for the reproduction defaults `args` of an
    experiment that this invocation's presets or overrides change; '' where none does."""
    keys = [_key(a) for a in args]
    base = config.parse(module.KNOBS, args)
    now = config.parse(module.KNOBS, args + presets + [a for a in rest if _key(a) in module.KNOBS])
    changed = [f"--{k}={getattr(now, k)}" for k in keys if getattr(now, k) != getattr(base, k)]
    return f", here `{' '.join(changed)}` (preset or command line)" if changed else ""


def known_invocations(inv_path, store):
    """The invocations that ran this reproduction's experiments: this machine's record and the committed
    report's (seeds run on other machines or in other clones), each once, in the order they started."""
    seen = read_json(inv_path) if inv_path.is_file() else []
    if store and (store / "report.json").is_file():
        seen += read_json(store / "report.json").get("invocations", [])
    return sorted({json.dumps(i, sort_keys=True): i for i in seen}.values(), key=lambda i: i["started"])


# Keys that cannot change an experiment's numbers: the shared block's non-identity keys, except the
# layer groups (they do not identify the trained run, but every experiment's numbers are per group).
# The config file's name neither: a preset's keys are recorded one by one.
# `amp` is compared through the precision it gave (part of the run's name): on a CPU both values train in fp32.
IGNORED = tuple(k for k in config.NOT_IDENTITY if k != "groups") + ("config_file", "amp")
# Keys a stored seed may differ in: what the reproduction sets only for its first seeds (a control that
# adds numbers, changes none), and the seeds themselves.
PER_SEED = {"seed", "model_seed", *(_k[2:].partition("=")[0] for a in FIRST_SEEDS.values() for _k in a)}


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


def difference(saved, cfg, skip=()):
    """The first key in which a saved results configuration differs from `cfg` (keys that cannot change a
    number and `skip` aside), as 'key: X there, Y now', or None."""
    mine = {**vars(cfg), **config.train_config(cfg)}  # a run's config records derived keys too (precision)
    for k, v in saved.items():
        if k not in IGNORED and k not in skip and mine.get(k) != v:
            return f"{k}: {v!r} there, {mine.get(k)!r} now"
    return None if saved else "no configuration recorded"


def run_difference(saved_run, cfg):
    """The run a stored result was computed on against this configuration's (its name carries the identity's
    hash, precision included: a bf16 GPU seed never joins fp32 ones), as one line, or None."""
    now = run_dir(cfg).name
    if saved_run and saved_run != now:
        return f"run: {saved_run!r} there, {now!r} now (precision here: {config.train_config(cfg).get('precision')})"
    return None


def is_done(module, argv):
    """(True when the experiment's JSON exists and holds exactly this configuration, its path)."""
    cfg = config.parse(module.KNOBS, argv)
    path = results_path(module, cfg)
    if not path.is_file():
        return False, path
    saved = read_json(path).get("config", {})
    return bool(saved) and difference(saved, cfg) is None, path


def runs_for(cfg, modules, variants_=VARIANTS):
    """[(experiment, variant label or None, seed, extra arguments)] in the order they run."""
    todo = []
    for i, seed in enumerate(cfg.seeds):
        replaced = {exp for exp, _, _ in variants_
                    if i < cfg.variant_seeds and not hasattr(modules[exp], "results_file")}
        todo += [(exp, None, seed, []) for exp in modules if exp not in replaced]
        if i < cfg.variant_seeds:
            todo += [(exp, label, seed, args) for exp, label, args in variants_]
    return todo


def machine():
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        dev = "mps"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- seeds that add up
# <results_dir>/<name>/seed<s>/: each experiment's JSON (store_name), its run's per-epoch metrics and any
# per-example *.csv beside it (<experiment>.metrics.jsonl, ...; never a checkpoint), and provenance.json:
# per JSON, the experiment, the variant, the code version (code_version) and where and how long it ran.

def store_name(exp, variant, path):
    """A finished experiment's name in its seed's directory: its results file's, or, for a variant whose
    results file has the default's name (it sits in another run's directory), that name with the
    variant's label in it."""
    if variant and path.name == f"{exp}.json":
        return f"{exp}.{re.sub(r'[^A-Za-z0-9.+-]+', '-', variant).strip('-')}.json"
    return path.name


def store_files(name, path):
    """(file to copy, its name in the seed's directory) for one finished experiment: its JSON, then its
    run's per-epoch metrics and small per-example tables, named after it (runs differ between experiments)."""
    extra = [path.parent / "metrics.jsonl"] + sorted(p for p in path.parent.glob("*.csv") if p.stat().st_size < 2_000_000)
    return [(path, name)] + [(p, f"{Path(name).stem}.{p.name}") for p in extra if p.is_file()]


def provenance(seed_dir):
    path = seed_dir / "provenance.json"
    return read_json(path) if path.is_file() else {}


def stored_seeds(store):
    return sorted(int(p.name[4:]) for p in store.glob("seed*") if p.name[4:].isdigit() and (p / "provenance.json").is_file())


def check_stored(store, seed, entry, file, module, argv, skip=()):
    """None when a stored seed's file was made with this configuration (`skip` aside) and code, else why
    not (one line)."""
    path = store / f"seed{seed}" / file
    if not path.is_file():
        return f"{path} is missing"
    result = read_json(path)
    saved, cfg = result.get("config", {}), config.parse(module.KNOBS, argv)
    why = (f"seed: {saved.get('seed')!r} there" if saved.get("seed") != seed else None) \
        or difference(saved, cfg, skip) or run_difference(result.get("run"), cfg) \
        or code_difference(entry.get("code", {}), code_version(module.__name__))
    return f"{path} was made with another {'code version' if why.startswith('code') else 'configuration'} ({why})" \
        if why else None


def store_result(store, seed, task, path, seconds, cfg):
    """Copy a finished experiment's files into its seed's directory and record their provenance."""
    exp, variant, _, _ = task
    seed_dir = store / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    name = store_name(exp, variant, path)
    for f, stored in store_files(name, path):
        if not (seed_dir / stored).is_file() or (seed_dir / stored).read_bytes() != f.read_bytes():
            shutil.copyfile(f, seed_dir / f".{stored}.tmp")
            os.replace(seed_dir / f".{stored}.tmp", seed_dir / stored)
    prov = provenance(seed_dir)
    prov[name] = {"experiment": exp, "variant": variant, "code": code_version(exp), "wall_s": seconds,
                  "machine": f"{machine()['device']}, {cores()} cores", "jobs": cfg.jobs,
                  "time": time.strftime("%Y-%m-%d %H:%M")}
    write_json(seed_dir / "provenance.json", dict(sorted(prov.items())))


# ----------------------------------------------------------------------------- experiments in parallel

def next_task(pending, running, trains):
    """The task to start next, or None: every seed's training (its gradient accounting, `trains[seed]`)
    before any other experiment, so the last seed's training does not run alone at the end; another
    experiment once its seed's training has finished."""
    blocked = {t[1] for t in list(pending) + list(running) if t is trains.get(t[1])}
    return next((t for t in pending if t is trains.get(t[1])), None) or \
        next((t for t in pending if t[1] not in blocked), None)


def run_processes(tasks, cfg, log_dir, on_done):
    """Run tasks [(key, seed, what, experiment, argv)] as separate processes, at most cfg.jobs at once,
    each with its log in log_dir; an experiment of a seed starts after that seed's gradient accounting
    (it trains the run the others reuse). CPU threads: cfg.threads or the cores divided among the jobs;
    on GPUs the processes take them in turn. on_done(task, seconds) runs here as each one succeeds."""
    n_threads = cfg.threads or max(1, cores() // cfg.jobs)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(tasks), {}, []
    trains = {t[1]: t for t in tasks if t[3] == "gradient_accounting"}
    t_start = last = time.time()
    while running or (pending and not failed):
        while not failed and pending and len(running) < cfg.jobs:
            task = next_task(pending, [r[0] for r in running.values()], trains)
            if task is None:
                break
            pending.remove(task)
            key, seed, what, exp, argv = task
            slot = min(set(range(cfg.jobs)) - {r[3] for r in running.values()})
            env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "MKL_NUM_THREADS": str(n_threads),
                   "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus else {})}
            log = log_dir / (key.replace("/", "_").replace(" ", "_").replace("[", "").replace("]", "")
                             .replace(":", "").replace(",", "") + ".log")
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, str(REPO / f"{exp}.py"), *argv], stdout=f,
                                        stderr=subprocess.STDOUT, env=env)
            running[proc] = (task, time.time(), log, slot)
            print(f"[seed {seed}] {what}: started (process {proc.pid}, {n_threads} thread(s)"
                  + (f", GPU {slot % gpus}" if gpus else "") + f"; log {log})", flush=True)
        time.sleep(0.2)
        for proc, (task, t0, log, slot) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[proc]
            seconds = round(time.time() - t0, 1)
            if proc.returncode == 0:
                print(f"[seed {task[1]}] {task[2]}: done in {seconds:.0f}s", flush=True)
                on_done(task, seconds)
            else:
                lines = log.read_text().strip().splitlines() or ["(no output)"]
                failed.append(f"{task[2]} for seed {task[1]} failed (exit {proc.returncode}: {lines[-1][:200]}); "
                              f"its log: {log}")
                print(f"[seed {task[1]}] {failed[-1]}", flush=True)
        if running and time.time() - last > 60:
            last = time.time()
            print(f"[{(last - t_start) / 60:.0f} min] {len(tasks) - len(pending) - len(running)}/{len(tasks)} done; "
                  f"running: {', '.join(f'{r[0][2]} (seed {r[0][1]})' for r in running.values())}", flush=True)
    if failed:
        raise UserError(failed[0] + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
                        + "; fix it and re-run the same command: finished experiments are reused")


def expected_cost(pending, timings, jobs):
    """The line announcing what the pending experiments will cost, from earlier wall times here."""
    known = {}
    for key, sec in timings.items():
        if sec is not None:
            known.setdefault(key.rsplit("/seed", 1)[0], []).append(sec)
    est = [sorted(known[w])[len(known[w]) // 2] for w in pending if w in known]
    if not pending:
        return None
    if not est:
        return (f"{len(pending)} experiments to run; no earlier wall time of them here to estimate the cost "
                f"(docs/benchmarks.md has measured ones)")
    missing = len(pending) - len(est)
    return (f"expected: about {sum(est) / jobs / 60:.0f} min for {len(pending)} experiments with jobs={jobs} "
            f"(the median earlier wall time of each, from timings.json of the report and provenance.json of the "
            f"stored seeds, summed / jobs)"
            + (f"; {missing} of them never timed here" if missing else ""))


def main(argv=()):
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(config.help_text(KNOBS, __file__) + "\n\nEvery other --key=value is passed to each experiment "
              "that takes it: python <experiment>.py --help lists them.")
        return None
    own, presets, rest = split_argv(argv)
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
    store = ((Path(cfg.results_dir) if Path(cfg.results_dir).is_absolute() else REPO / cfg.results_dir) / label
             if cfg.results_dir else None)
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
    first = set(cfg.seeds[:cfg.variant_seeds])
    variants_ = variants_for(presets, rest, modules)
    extra_of = {(e, lab): a for e, lab, a in variants_}

    def argv_for(exp, seed, extra=(), overrides=()):
        ours = DEFAULTS.get(exp, []) + (FIRST_SEEDS.get(exp, []) if seed in first else [])
        return ours + [os.path.abspath(p) for p in presets] + list(overrides) + [f"--seed={seed}",
                                                                                f"--model_seed={seed}", *extra]

    # Seeds stored by earlier invocations (any machine) and not run now must match this configuration
    # and code, or nothing runs: a report never mixes two protocols.
    earlier = [s for s in (stored_seeds(store) if store else []) if s not in cfg.seeds]
    for seed in earlier:
        for file, entry in provenance(store / f"seed{seed}").items():
            exp, variant = entry["experiment"], entry["variant"]
            extra = extra_of.get((exp, variant), [])
            why = check_stored(store, seed, entry, file, modules[exp],
                               argv_for(exp, seed, extra) + [a for a in rest if _key(a) in modules[exp].KNOBS], PER_SEED)
            if why:
                raise UserError(f"seed {seed}: {why}; delete {store / f'seed{seed}'} or re-run it here with "
                                f"--seeds=[{seed}] (or use another --name)")
    overrides = [overrides_file(out / "overrides.py", rest)] if rest else []

    timings_path = out / "timings.json"
    timings = read_json(timings_path) if timings_path.is_file() else {}
    t_all = time.time()
    todo, jobs, pending = runs_for(cfg, modules, variants_), [], []
    for task in todo:
        exp, variant, seed, extra = task
        module, argv_s = modules[exp], argv_for(exp, seed, extra, overrides)
        what = exp + (f" [{variant}]" if variant else "")
        done, path = is_done(module, argv_s)
        name = store_name(exp, variant, path)
        stored = store / f"seed{seed}" / name if store else None
        entry = provenance(stored.parent).get(name) if stored else None
        if entry and entry.get("variant") == variant and not check_stored(store, seed, entry, name, module, argv_s):
            print(f"[seed {seed}] {what}: reusing {stored}")
            jobs.append({"job": what, "seed": seed, "reused": True})
            continue
        if done and entry and stored.is_file() and stored.read_bytes() == path.read_bytes():
            done = False  # the run directory holds the stored result, refused above: made with other code; run it again
        if done:
            print(f"[seed {seed}] {what}: reusing {path}")
            if store:
                store_result(store, seed, task, path, timings.get(f"{what}/seed{seed}"), cfg)
            jobs.append({"job": what, "seed": seed, "reused": True})
            continue
        jobs.append({"job": what, "seed": seed, "reused": False})
        pending.append((f"{what}/seed{seed}", seed, what, exp, argv_s, task, path))
    history = dict(timings)  # and the wall times recorded with the stored seeds (maybe another machine's)
    for seed in (stored_seeds(store) if store else []):
        for file, entry in provenance(store / f"seed{seed}").items():
            what = entry["experiment"] + (f" [{entry['variant']}]" if entry["variant"] else "")
            history.setdefault(f"{what}/seed{seed}", entry.get("wall_s"))
    cost = expected_cost([p[2] for p in pending], history, min(cfg.jobs, max(1, len(pending))))
    if cost:
        print(cost, flush=True)

    inv_path = out / "invocations.json"  # every invocation that ran experiments: the wall time a reader can expect
    command, ran = " ".join(["python reproduce.py"] + list(argv)), []
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(t_all))

    def record_invocation(stopped):
        """This invocation in invocations.json, rewritten as each experiment ends and marked `stopped` until
        the last one has: a killed invocation keeps its wall time up to its last finished experiment."""
        others = [i for i in known_invocations(inv_path, store) if i.get("t0") != round(t_all, 3)]
        invocations = sorted(others + [{
            "command": command, "started": started, "t0": round(t_all, 3), "wall_s": round(time.time() - t_all),
            "ran": len(ran), "reused": len(jobs) - len(pending), "jobs": cfg.jobs,
            "machine": f"{machine()['device']}, {cores()} cores", **({"stopped": True} if stopped else {})}],
            key=lambda i: i["started"])
        write_json(inv_path, invocations)
        return invocations

    def finished(p, seconds):
        key, seed, what, exp, argv_s, task, path = p
        timings[key] = seconds
        write_json(timings_path, timings)
        if store:
            store_result(store, seed, task, path, seconds, cfg)
        ran.append(key)
        if len(ran) < len(pending):
            record_invocation(stopped=True)

    if cfg.jobs > 1 and len(pending) > 1:
        by_key = {p[0]: p for p in pending}
        run_processes([p[:5] for p in pending], cfg, out / "logs", lambda t, sec: finished(by_key[t[0]], sec))
    else:
        for p in pending:
            print(f"[seed {p[1]}] {p[2]} ...", flush=True)
            t = time.time()
            modules[p[3]].main(p[4])
            finished(p, round(time.time() - t, 1))
    print(f"all experiments done in {time.time() - t_all:.0f}s; writing the report")
    invocations = record_invocation(stopped=False) if pending else known_invocations(inv_path, store)

    # The report: every seed of the store (complete ones), else the run directories of `seeds`.
    results, variants, seeds_in = {}, {}, []
    for seed in sorted(set(cfg.seeds) | set(earlier)):
        if store:
            prov = provenance(store / f"seed{seed}")
            entries = [(e["experiment"], e["variant"], store / f"seed{seed}" / f) for f, e in prov.items()]
        else:
            entries = [(exp, variant, is_done(modules[exp], argv_for(exp, seed, extra, overrides))[1])
                       for exp, variant, s, extra in todo if s == seed]
        have = {e for e, v, _ in entries if not v or not hasattr(modules[e], "results_file")}
        if have != set(EXPERIMENTS):
            print(f"seed {seed} left out of the report: no {', '.join(sorted(set(EXPERIMENTS) - have))} results")
            continue
        seeds_in.append(seed)
        for exp, variant, path in sorted(entries, key=lambda x: (EXPERIMENTS.index(x[0]), x[1] or "")):
            data = read_json(path)
            if variant and hasattr(modules[exp], "results_file"):
                variants.setdefault(exp, {}).setdefault(variant, []).append(data)
            else:
                results.setdefault(exp, []).append(data)
    variant_seeds_ran = [s for s in seeds_in if s in first or (store and any(
        e["variant"] for e in provenance(store / f"seed{s}").values()))]
    notes = []
    if cfg.variant_seeds and variants_:
        notes.append(f"Variants beyond the defaults ran for seed(s) {variant_seeds_ran} only (`variant_seeds`; each "
                     f"costs about one more run of its experiment): " + "; ".join(f"{e}: {lab} (`{' '.join(a)}`)"
                                                                                for e, lab, a in variants_) + ".")
    notes += [f"{exp}: `{' '.join(args)}`" + (f", `{' '.join(FIRST_SEEDS[exp])}` for seed(s) "
                                               f"{variant_seeds_ran}" if exp in FIRST_SEEDS else "")
              + " (reproduction defaults)" + overridden(modules[exp], args, presets, rest)
              for exp, args in DEFAULTS.items() if exp in modules]
    if store:
        where = store.relative_to(REPO) if store.is_relative_to(REPO) else store
        notes.append(f"Seeds {seeds_in}: every complete seed in {where}/ (per-seed result "
                     f"files, each checked against this configuration and code version)"
                     + (f"; {len(earlier)} of them made by earlier invocations" if earlier else "") + ".")
    base_cfg = config.parse(modules["gradient_accounting"].KNOBS, presets + overrides)
    path = report.write_report(out, label, base_cfg, seeds_in, results, {**history, **timings}, machine(),
                               " ".join(["python reproduce.py"] + list(argv)), variants=variants, notes=notes,
                               jobs=jobs, invocations=invocations)
    print(f"report: {path}")
    if store:  # the report beside the seeds it was made from, to commit with them
        for f in [path, out / "claims.json", out / "report.json", *sorted(out.glob("*.png"))]:
            shutil.copyfile(f, store / f".{f.name}.tmp")
            os.replace(store / f".{f.name}.tmp", store / f.name)
        print(f"report and its figures also in {store} (commit them with the seeds)")
    return path


if __name__ == "__main__":
    cli.run(main)
