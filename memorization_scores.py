"""Per-example memorization scores: which training examples must be memorized to be fitted?

Hold-out score (the C-score of Jiang et al. 2021): K models, each trained on a seeded random subset
of `subset_fraction` of the dataset's images with their true labels; an example's score is the
accuracy on it of the models that left it out, with its standard error. Atypical examples (score
below 0.5) are the ones `memorized=atypical` / `both` makes the other experiments study. The scores
are written to data/<dataset>_holdout_scores.npz (one per image of the pool the training split is
drawn from, so every seed uses the same file); each model's held-out predictions are saved as it
finishes, so a killed or budget-limited run resumes with the next model.

Then the cheap proxies, from the configured run's per-epoch checkpoints (trained first if needed):
learning speed, forgetting events and the epoch an example is first learned for good, and how well
each ranks like the hold-out score (Spearman, 95% bootstrap CI over the clean examples). With
`published`, Jiang et al.'s published C-scores (CIFAR-10/100, original order) are checked against
the dataset's labels, compared with the estimate, and become the dataset's scores.

    python memorization_scores.py [configs/preset.py] [--key=value ...]
"""
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common import claims, cli, config
from common.cli import UserError
from common.data import ATYPICAL_BELOW, load_scores, pool_positions, score_pool, scores_path
from common.evaluation import predict
from common.memorization import (PROXIES, collect_holdout, holdout_scores, learning_proxies, load_published,
                                 proxy_agreement, run_holdout, write_examples, write_scores)
from common.models import model_for
from common.precision import precision
from common.runs import read_json, runs_root, write_json
from common.training import pick_device, trained_run

# ----------------------------------------------------------------------------- the run (shared keys)
# Defined once, with each key's meaning, in common/config.py (RUN_DEFAULTS); shown here to be edited
# for this script (a config file or --key=value changes them for every script).
dataset = "mnist_5k"    # mnist_5k (embedded) | mnist | fashion_mnist | cifar10 | cifar100 | svhn | npz:PATH
model = "resnet9"       # resnet9 | resnet18 | resnet50 | vit | cnn | torchvision:<name> |
                        # path/file.py:factory (docs/own_model.md)
width = 0.25            # channel-width multiplier
noise = 0.1             # fraction of training labels replaced by a wrong class: the examples to memorize
seed = 0                # data split and label noise
model_seed = 0          # initialization, batch order, augmentation, dropout
epochs = 20
batch_size = 128
lr = 0.05               # peak learning rate (SGD)
schedule = "triangle"   # triangle (one-cycle) | cosine (linear warm-up, then cosine) | constant
warmup = 0.25           # fraction of training spent warming up
momentum = 0.9
weight_decay = 5e-4
augment = False         # random crop + flip (off in the paper's main runs)
amp = True              # bf16 autocast on CUDA (ignored elsewhere)
device = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
runs_dir = "runs"       # relative to the repository root
download = True         # let torchvision download a missing dataset
overwrite = False       # move aside a run directory trained with another configuration
deterministic = False   # PyTorch deterministic algorithms: bit-reproducible on a GPU, slower (docs/reliability.md)
groups = None           # layer groups as module-name prefixes, e.g. ["stem", "layer1"]; None: from the module tree
init_from = ""          # the user's own per-epoch state dicts (a directory or glob) instead of training here
RUN_KNOBS = config.run_knobs(globals())  # the block above, checked against common/config.py
# ----------------------------------------------------------------------------- this experiment
k_models = 64           # hold-out models; each example is left out by about k_models * (1 - subset_fraction)
subset_fraction = 0.7   # share of the images each hold-out model trains on (Feldman & Zhang's 0.7)
holdout_model = ""      # the hold-out models' architecture ("": the run's `model`)
holdout_width = 0.0     # their width multiplier (0: the run's `width`)
holdout_epochs = 0      # their epochs (0: the run's `epochs`); the other training keys are the run's
budget_s = 0.0          # stop starting new hold-out models after this many seconds (0: no limit); re-run to go on
published = ""          # published C-scores to use instead (.npz with `scores` and `labels`, original order)
proxies = True          # proxies from the configured run (its per-epoch checkpoints; trained first if missing)
judge = []              # instead of all the above: claim 6 over these neuron_flipping.json of memorized=both runs
                        # (one per seed; resampled seeds, then examples), printed and written to judge_out
judge_out = ""          # ... the judged claims (4 and 6) as JSON, e.g. docs/results/atypical/claims.json ("": print only)
kinds = ""              # instead of all the above: print the per-kind table (mislabeled / atypical / typical) of a
                        # reproduction's seed directory, e.g. docs/results/atypical_both/seed0
# -----------------------------------------------------------------------------
KNOBS = config.knobs(globals())
config.range_check("k_models", 0, None)
config.range_check("subset_fraction", 0, 1, lo_open=True, hi_open=True)
config.range_check("holdout_epochs", 0, None)
config.range_check("holdout_width", 0, None)
config.range_check("budget_s", 0, None)

RECIPE_KEYS = ("dataset", "model", "width", "epochs", "batch_size", "lr", "schedule", "warmup", "momentum",
               "weight_decay", "augment", "seed")


def recipe_of(cfg):
    """The hold-out models' training recipe (the run's keys, with the holdout_* overrides)."""
    r = {k: getattr(cfg, k) for k in RECIPE_KEYS}
    r.update(model=cfg.holdout_model or cfg.model, width=cfg.holdout_width or cfg.width,
             epochs=cfg.holdout_epochs or cfg.epochs,
             subset_fraction=cfg.subset_fraction, precision=precision(cfg))
    return r


def holdout_dir(cfg, recipe):
    """One directory per recipe: models 0..K-1 are the same for every K, so K can grow later."""
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return runs_root(cfg) / "holdout" / f"{scores_path(cfg.dataset).stem.replace('_holdout_scores', '')}_{digest}"


def scores_command(cfg):
    """The command that makes these scores: the recipe's and the scores' keys that differ from the defaults."""
    keys = [k for k in RECIPE_KEYS if k != "seed"] + ["seed", "k_models", "subset_fraction", "holdout_model",
                                                      "holdout_width", "holdout_epochs", "published"]
    return " ".join(["python memorization_scores.py"] + [f"--{k}={getattr(cfg, k)}" for k in keys
                                                         if getattr(cfg, k) != KNOBS[k]])


def judge_flipping(paths, out_path):
    """Claims 4 and 6 over the flipping results of memorized=both runs, one per seed (their JSON files)."""
    runs = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"--judge: {p} not found; give neuron_flipping.json files of memorized=both runs")
        run = read_json(p)  # invalid JSON: its own one-line error
        if not isinstance(run, dict) or not any(r.get("kind") == "atypical" for r in run.get("records", [])):
            raise UserError(f"--judge: {p} has no atypical targets; run neuron_flipping.py --memorized=both")
        runs.append(run)
    seeds = [r.get("config", {}).get("seed") for r in runs]
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--judge: seeds {seeds} repeat; give one run per seed")
    judged = claims.judge("neuron_flipping", runs)
    claims.print_claims(judged)
    if out_path:
        write_json(Path(out_path), [{**c.as_dict(), "seeds": seeds, "files": [str(p) for p in paths]} for c in judged])
        print(f"wrote {out_path}")
    return judged


KINDS = (("mislabeled", "mislabeled"), ("atypical clean", "atypical"), ("typical clean", "typical"))  # (column, kind)


def kinds_table(seed_dir):
    """The five experiments' per-kind numbers in one seed directory of a memorized=atypical/both
    reproduction, as a markdown table (a kind the run lacks: n/a)."""
    d = Path(seed_dir)
    names = ("gradient_accounting", "layer_rewinding", "layer_retraining", "neuron_flipping", "example_tied_dropout")
    missing = [n for n in names if not (d / f"{n}.json").is_file()]
    if missing:
        raise UserError(f"--kinds: {d} has no {missing[0]}.json; give a seed directory of a memorized=atypical or "
                        f"both reproduction, e.g. docs/results/atypical_both/seed0")
    ga, rw, rt, fl, etd = (read_json(d / f"{n}.json") for n in names)
    only_atypical = fl["config"].get("memorized") == "atypical"  # there the memorized set ("noisy") is the atypical one

    def get(acc, kind, template="{}"):
        """A kind's value: typical clean is "clean" (the clean examples apart from the atypical ones)."""
        keys = {"typical": ["typical", "clean"], "atypical": ["atypical"] + (["noisy"] if only_atypical else []),
                "mislabeled": ["mislabeled"]}[kind]
        v = next((acc[template.format(k)] for k in keys if template.format(k) in acc), None)
        return None if v is None or v != v else v  # NaN: no such example in this run

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def cell(v, fmt="{:.0%}"):
        return "n/a" if v is None else fmt.format(v)

    grads = ga["summary"].values()
    rewound = rw["bn_modes"]["final"]["accuracy"].values()
    units = {kind: [r["n_units"] for r in fl["records"] if r.get("example_kind") == kind] for _, kind in KINDS}
    rows = [("gradient accounting", "gradient norm per example / clean's, mean over layer groups",
             [cell(mean([get(g, k, "{}_clean_ratio_per_example") for g in grads]), "{:.2f}") if k != "typical"
              else "1 (reference)" for _, k in KINDS]),
            ("layer rewinding", "accuracy, one group rewound to epoch 0 (final BatchNorm), mean over groups",
             [cell(mean([get(g["0"], k) for g in rewound])) for _, k in KINDS])]
    for when, label in (("reset", "right after one group's reset"), ("final", "after clean-only retraining")):
        rows.append(("layer retraining", f"accuracy {label}, mean over groups",
                     [cell(mean([get(g[when], k) for g in rt["groups"].values()])) for _, k in KINDS]))
    rows.append(("neuron flipping", "median units to flip (targets)",
                 [f"{statistics.median(units[k]):g} ({len(units[k])})" if units[k] else "n/a" for _, k in KINDS]))
    rows.append(("example-tied dropout", "accuracy after the drop (authors' rescaling)",
                 [cell(get(etd["etd"]["modes"]["drop"], k)) for _, k in KINDS]))
    head = "| experiment | statistic | " + " | ".join(c for c, _ in KINDS) + " |"
    return "\n".join([head, "|" + " --- |" * (2 + len(KINDS))] +
                      [f"| {e} | {s} | " + " | ".join(v) + " |" for e, s, v in rows])


def main(argv=()):
    cfg = config.parse(KNOBS, argv)
    if cfg.judge:
        return judge_flipping(cfg.judge, cfg.judge_out)
    if cfg.kinds:
        table = kinds_table(cfg.kinds)
        print(table)
        return table
    if cfg.k_models == 0 and not cfg.published:
        raise UserError("k_models=0 estimates nothing; pass --k_models=<models, e.g. 24> or --published=<file.npz>")
    if cfg.published and cfg.k_models and cfg.dataset not in ("cifar10", "cifar100"):
        print(f"note: published C-scores exist for cifar10 and cifar100; checking {cfg.published} against "
              f"{cfg.dataset}'s labels")
    dev = pick_device(cfg.device)
    x, y = score_pool(cfg.dataset, cfg.download)
    num_classes = int(y.max()) + 1
    recipe = recipe_of(cfg)
    out = {"dataset": cfg.dataset, "pool": len(y), "recipe": recipe, "k_models": cfg.k_models}

    estimate = None
    if cfg.k_models:
        directory = holdout_dir(cfg, recipe)
        (directory / "recipe.json").parent.mkdir(parents=True, exist_ok=True)
        write_json(directory / "recipe.json", recipe)
        rcfg = SimpleNamespace(**{**vars(cfg), **recipe})
        t0 = time.time()
        done = run_holdout(rcfg, x, y, num_classes, cfg.k_models, cfg.subset_fraction, directory, dev, cfg.budget_s)
        if done < cfg.k_models:
            print(f"{done} of {cfg.k_models} hold-out models saved in {directory} ({time.time() - t0:.0f} s this "
                  f"call); re-run the same command to train the rest")
            return None
        correct, held, seconds = collect_holdout(directory, cfg.k_models, y)
        score, se, n_held = holdout_scores(correct, held)
        estimate = score
        meta = {"source": "estimate", "command": scores_command(cfg),
                "recipe": recipe, "k_models": cfg.k_models, "train_seconds": round(seconds, 1),
                "device": str(dev), "torch": torch.__version__}
        out["holdout"] = {"dir": str(directory), "train_seconds": seconds,
                          "mean_score": float(np.nanmean(score)), "atypical": int((score < 0.5).sum()),
                          "mean_se": float(np.nanmean(se)), "min_held": int(n_held.min())}
    if cfg.published:
        pub = load_published(cfg.published, y.numpy())
        if estimate is not None:
            from common.memorization import spearman_ci
            ok = np.isfinite(estimate)
            rho, lo, hi = spearman_ci(estimate[ok], pub[ok], "published")
            out["published"] = {"file": cfg.published, "spearman": rho, "lo": lo, "hi": hi,
                                "mean_abs_diff": float(np.abs(estimate[ok] - pub[ok]).mean())}
            print(f"estimate vs published C-scores: Spearman {rho:.3f} [{lo:.3f}, {hi:.3f}], mean |diff| "
                  f"{out['published']['mean_abs_diff']:.3f} ({int(ok.sum())} examples)")
        score, se, n_held = pub, np.full(len(pub), np.nan), np.zeros(len(pub), dtype=int)
        meta = {"source": f"published ({cfg.published})", "command": scores_command(cfg)}
    old = load_scores(cfg.dataset)
    if old is None or old["meta"] != meta:  # the same scores again: the file stays as it is
        write_scores(scores_path(cfg.dataset), score, se, n_held, y.numpy(), meta)
    print(f"hold-out scores of {len(y)} images written to {scores_path(cfg.dataset)}: mean {np.nanmean(score):.3f}, "
          f"{int((score < 0.5).sum())} below 0.5" + (f", mean standard error {np.nanmean(se):.3f}" if cfg.k_models
                                                      and not cfg.published else ""))
    if cfg.proxies:
        out.update(run_proxies(cfg, score, se, n_held))
    return out


def run_proxies(cfg, score, se, n_held):
    """Proxies from the configured run's checkpoints, their agreement with the hold-out score, and
    the run's examples.csv."""
    net, data, run = trained_run(cfg)
    epochs = [e for e in run.saved_epochs() if e >= 1]
    if epochs != list(range(1, cfg.epochs + 1)):
        print(f"proxies skipped: {run.dir.name} keeps checkpoints of epochs {epochs} only; they need every epoch "
              f"(train it with gradient_accounting.py --keep_checkpoints=all)")
        return {}
    correct = []
    for e in epochs:
        run.load_model(net, e)
        correct.append((predict(net, data, "train", amp=cfg.amp) == data.y_train).cpu().numpy())
    prox = learning_proxies(np.stack(correct))
    pos = pool_positions(cfg.dataset, cfg.seed, torch.from_numpy(load_scores(cfg.dataset)["labels"].astype(np.int64)))
    per = {"holdout_score": score[pos], "holdout_se": se[pos], "holdout_n": n_held[pos], **prox}
    clean = ~data.mislabeled.cpu().numpy()
    agreement = proxy_agreement(per["holdout_score"], prox, clean)
    results = {"run": run.dir.name, "config": {**run.config, **{k: getattr(cfg, k) for k in
                                                                ("k_models", "subset_fraction", "holdout_model",
                                                                 "holdout_width", "holdout_epochs", "published")}},
               "scores_file": str(scores_path(cfg.dataset).name),
               "definitions": {
                   "holdout_score": "accuracy on the example of the hold-out models that left it out (true label)",
                   "holdout_se": "its standard error (std of the 0/1 outcomes, ddof=1, over sqrt(models))",
                   "holdout_n": "hold-out models that left the example out",
                   "learning_speed": "epochs (1..E) after which the run predicts the example's training label",
                   "forgetting": "epochs after which it is wrong although right after the previous one",
                   "first_learned": "first epoch from which it stays right to the end (E + 1: wrong at the end)",
                   "agreement": "Spearman of each proxy with holdout_score over the clean training examples, "
                                "95% percentile bootstrap CI over examples"},
               "agreement": agreement,
               "per_example": {k: [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=float)]
                               for k, a in per.items()}}
    write_json(run.path("memorization_scores.json"), results)
    print(f"{'proxy':<16} {'Spearman with the hold-out score':>34}  (clean examples of {run.dir.name}, n={int(clean.sum())})")
    for name in PROXIES:
        a = agreement[name]
        print(f"{name:<16} {a['rho']:>+10.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}]   (ranks like it when "
              f"{'> 0' if a['expected_sign'] > 0 else '< 0'})")
    atypical = clean & (per["holdout_score"] < ATYPICAL_BELOW)
    print(f"{int((~clean).sum())} mislabeled, {int(atypical.sum())} atypical clean (hold-out score < "
          f"{ATYPICAL_BELOW:g}), {int((clean & ~atypical).sum())} typical clean training examples")
    write_examples(run, data)
    print(f"written: {run.dir.name}/memorization_scores.json and examples.csv")
    return {"agreement": agreement}


if __name__ == "__main__":
    cli.run(main)
