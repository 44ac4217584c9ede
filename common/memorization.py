"""Per-example memorization scores: the hold-out consistency score and cheap proxies for it.

- Hold-out score (the C-score of Jiang et al. 2021): the expected accuracy on an example of models
  trained on random subsets of the data that leave it out. K models, each on a seeded random subset
  of `fraction` of the pool; an example's score is the share of the models that held it out and
  still predict its label, with the standard error of that mean (0/1 outcomes, ddof=1). Low:
  atypical (the example must be memorized to be fitted); high: typical.
- Proxies from one ordinary training run (its per-epoch checkpoints, evaluated after each epoch):
  learning speed (epochs at which the example is predicted correctly, summed), forgetting events
  (correct after one epoch, wrong after the next: Toneva et al. 2019, counted per epoch rather than
  per minibatch presentation) and the epoch it is first learned for good (correct from then to the
  end; epochs + 1 when it is wrong at the end).
- Agreement: Spearman's rank correlation of each proxy with the hold-out score, with a percentile
  bootstrap CI over examples.

Each hold-out model's predictions are saved as it finishes (holdout_dir/model_<j>.pt), so a killed
run resumes with the next model. The scores file itself is read by common/data.py.
"""
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import torch

from .cli import UserError
from .data import Data
from .evaluation import predict
from .models import model_for
from .rng import derive_seed, generator
from .runs import load_tensors, save_tensors
from .training import batch_order, make_optimizer, train_epoch

PROXIES = ("learning_speed", "forgetting", "first_learned")
# The sign a proxy's Spearman with the hold-out score has when it ranks like it (slow, often-forgotten,
# late-learned examples are the atypical ones).
PROXY_SIGN = {"learning_speed": +1, "forgetting": -1, "first_learned": -1}
BOOTSTRAP = 1000  # resamples of the examples for a Spearman CI
LEVEL = 0.95


# ----------------------------------------------------------------------------- hold-out models

def holdout_subset(n, fraction, seed, j):
    """Model j's training subset: a seeded random round(fraction * n) of the pool (bool mask)."""
    k = int(round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator(seed, "holdout_subset", j))[:k]] = True
    return mask


def train_holdout_model(recipe, x, y, num_classes, subset, j, device):
    """Train one model on the pool examples in `subset` with `recipe` (a namespace of the run's
    training keys) and return its predictions on the held-out examples (the rest of the pool)."""
    held = torch.nonzero(~subset).flatten()
    tr = torch.nonzero(subset).flatten()
    data = Data("holdout", x[tr], y[tr], y[tr], torch.zeros(len(tr), dtype=torch.bool), x[held], y[held],
                num_classes, device)
    cfg = SimpleNamespace(**{**vars(recipe), "model_seed": derive_seed(recipe.seed, "holdout_model", j) % 2**31})
    model = model_for(cfg, data)
    optimizer = make_optimizer(model.parameters(), cfg)
    steps = len(batch_order(torch.arange(data.n_train), cfg.batch_size, cfg.model_seed, 0))
    order = torch.arange(data.n_train, device=data.device)
    for epoch in range(1, cfg.epochs + 1):
        train_epoch(model, data, order, optimizer, cfg, epoch, step0=(epoch - 1) * steps,
                    total_steps=cfg.epochs * steps, desc=f"hold-out model {j} epoch {epoch}")
    pred = predict(model, data, "test", amp=getattr(cfg, "amp", True)).cpu()
    return held, pred


def run_holdout(recipe, x, y, num_classes, k, fraction, directory, device, budget_s=0.0, log=print):
    """Train the K hold-out models not yet saved in `directory` (one file per model, written as it
    finishes); stop starting new ones once `budget_s` seconds have passed (0: no limit).
    Returns the number of models saved."""
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for j in range(k):
        path = directory / f"model_{j:03d}.pt"
        if path.is_file():
            continue
        if budget_s and time.time() - t0 > budget_s:
            break
        t = time.time()
        subset = holdout_subset(len(y), fraction, recipe.seed, j)
        held, pred = train_holdout_model(recipe, x, y, num_classes, subset, j, device)
        seconds = time.time() - t
        save_tensors(path, {"held": held, "pred": pred.to(torch.int16), "seconds": seconds})
        log(f"hold-out model {j + 1}/{k}: {seconds:.1f} s, accuracy on its {len(held)} held-out examples "
            f"{float((pred == y[held]).float().mean()):.1%}")
    return sum((directory / f"model_{j:03d}.pt").is_file() for j in range(k))


def collect_holdout(directory, k, y):
    """(correct, held): (K, n) bool matrices of the saved models: held out by model j, and predicted right."""
    n = len(y)
    correct, held = torch.zeros(k, n, dtype=torch.bool), torch.zeros(k, n, dtype=torch.bool)
    seconds = 0.0
    for j in range(k):
        m = load_tensors(directory / f"model_{j:03d}.pt", "hold-out model file")
        held[j, m["held"]] = True
        correct[j, m["held"]] = m["pred"].long() == y[m["held"]]
        seconds += float(m["seconds"])
    return correct, held, seconds


def holdout_scores(correct, held):
    """Per example: (score, standard error, models that held it out). The score is the mean of the
    0/1 outcomes of those models; its standard error std(ddof=1) / sqrt(m) = sqrt(p (1 - p) / (m - 1))
    (NaN for m < 2; score NaN for m = 0)."""
    m = held.sum(0).double()
    p = (correct & held).sum(0).double() / m
    se = torch.sqrt(p * (1 - p) / (m - 1))
    se[m < 2] = float("nan")
    return p.numpy(), se.numpy(), m.long().numpy()


# ----------------------------------------------------------------------------- proxies from one run

def learning_proxies(correct):
    """correct: (E, n) bool, example predicted right after epoch 1..E. Returns {learning_speed,
    forgetting, first_learned} as arrays of n."""
    c = np.asarray(correct, dtype=bool)
    e = c.shape[0]
    speed = c.sum(0)
    forgetting = (c[:-1] & ~c[1:]).sum(0)
    # first learned for good: the first epoch from which every later evaluation is correct
    wrong_after = np.where(~c, np.arange(1, e + 1)[:, None], 0).max(0)  # last epoch it was wrong (0: never)
    first = np.where(c[-1], wrong_after + 1, e + 1)
    return {"learning_speed": speed.astype(float), "forgetting": forgetting.astype(float),
            "first_learned": first.astype(float)}


# ----------------------------------------------------------------------------- rank agreement

def _ranks(v):
    """Ranks 1..n, ties averaged."""
    v = np.asarray(v, dtype=float)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b):
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def spearman_ci(a, b, name, n=BOOTSTRAP, level=LEVEL):
    """(rho, lo, hi): Spearman and its percentile bootstrap interval over examples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(derive_seed(0, "spearman", name))
    draws = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n))]
    draws = np.array([d for d in draws if np.isfinite(d)])
    if not len(draws):
        return spearman(a, b), float("nan"), float("nan")
    q = (1 - level) / 2
    return spearman(a, b), float(np.quantile(draws, q)), float(np.quantile(draws, 1 - q))


def proxy_agreement(score, proxies, mask=None):
    """{proxy: {rho, lo, hi, n}}: Spearman of each proxy with the hold-out score over the examples in
    `mask` (default: all with a finite score)."""
    score = np.asarray(score, dtype=float)
    ok = np.isfinite(score) if mask is None else np.asarray(mask, dtype=bool) & np.isfinite(score)
    out = {}
    for name, values in proxies.items():
        rho, lo, hi = spearman_ci(score[ok], np.asarray(values, dtype=float)[ok], name)
        out[name] = {"rho": rho, "lo": lo, "hi": hi, "n": int(ok.sum()), "expected_sign": PROXY_SIGN.get(name, 0)}
    return out


# ----------------------------------------------------------------------------- scores files

def write_scores(path, score, se, n_held, labels, meta):
    """The dataset's scores file (numpy arrays only, no pickle; `meta` as a JSON string)."""
    def write(f):
        np.savez_compressed(f, score=np.asarray(score, dtype=np.float32), se=np.asarray(se, dtype=np.float32),
                            n_held=np.asarray(n_held, dtype=np.int16), labels=np.asarray(labels, dtype=np.int16),
                            meta=np.array(json.dumps(meta)))
    from .runs import atomic_write
    atomic_write(path, write)


def load_published(path, labels):
    """Published C-scores (Jiang et al.'s cifar10/cifar100-cscores-orig-order.npz: arrays `scores`
    and `labels`, training set in its original order). The labels must equal the dataset's training
    labels, which checks the order. Returns the scores as float array."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "scores" not in f.files or "labels" not in f.files:
                raise UserError(f"{path} has no arrays 'scores' and 'labels' (has: {', '.join(f.files)}); give "
                                f"the published *-cscores-orig-order.npz file")
            scores, pub_labels = f["scores"].astype(float), f["labels"].astype(np.int64)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read published scores {path} ({type(e).__name__}: {e}); give the .npz file")
    labels = np.asarray(labels, dtype=np.int64)
    if len(pub_labels) != len(labels) or not np.array_equal(pub_labels, labels):
        same = int((pub_labels[:len(labels)] == labels[:len(pub_labels)]).sum())
        raise UserError(f"published scores {path} do not match this dataset's training labels ({len(pub_labels)} "
                        f"scores vs {len(labels)} examples, {same} labels equal): another dataset or order; give "
                        f"the file of this dataset in the original training order")
    return scores


# ----------------------------------------------------------------------------- examples.csv

EXAMPLE_COLUMNS = {
    "index": "training example index (position in the run's training set)",
    "true_label": "the dataset's label",
    "training_label": "the label trained on (differs from true_label for a mislabeled example)",
    "kind": "mislabeled | atypical (clean, hold-out score < 0.5) | typical (clean); atypical needs the scores file",
    "memorized": "1 if the example is in the run's memorized set (knob `memorized`), else 0",
    "holdout_score": "hold-out (C-)score of the image, true label (empty without a scores file)",
    "holdout_se": "its standard error",
    "holdout_n": "hold-out models that left the image out",
    "learning_speed": "memorization_scores.py: epochs after which the run predicts the training label",
    "forgetting": "memorization_scores.py: forgetting events (right after one epoch, wrong after the next)",
    "first_learned": "memorization_scores.py: first epoch from which it stays right (epochs + 1: wrong at the end)",
    "<flipping>_units": "neuron flipping (file <flipping>.json) target: units zeroed (empty: not a target)",
    "<flipping>_flipped": "1 if the prediction flipped within max_units, else 0",
    "<flipping>_groups": "layer groups of the zeroed units, ';'-separated, in the order they were zeroed",
    "<flipping>_target_kind": "the target kind the search used (noisy, atypical, clean)",
    "etd_drop_correct": "example-tied dropout, memorized examples only: 1 if the drop mode (the run's drop "
                        "scaling) still predicts the training label, else 0",
    "etd_clean_forgotten": "1 if a clean example the tied model fits is lost by the drop, else 0 (empty: no ETD)",
}


def write_examples(run, data):
    """`examples.csv` in the run directory: one row per training example with its labels, kind, the
    scores and each experiment's per-example result found in the run directory (EXAMPLE_COLUMNS)."""
    import csv
    import io

    from .data import ATYPICAL_BELOW, KINDS, load_scores, pool_positions
    from .runs import atomic_write, read_json
    n = data.n_train
    y_true, y_train = data.y_true.cpu().tolist(), data.y_train.cpu().tolist()
    kind = [KINDS[k] for k in data.kind.cpu().tolist()]
    cols = {"index": list(range(n)), "true_label": y_true, "training_label": y_train, "kind": kind,
            "memorized": data.noisy.cpu().int().tolist()}
    scores = load_scores(data.name) if data.name != "holdout" else None
    if scores is not None and len(scores["labels"]) >= n:
        pos = pool_positions(data.name, run.config.get("seed", 0),
                             torch.from_numpy(scores["labels"].astype(np.int64))).numpy()
        if len(pos) == n and np.array_equal(scores["labels"][pos].astype(np.int64), np.array(y_true)):
            for key, name in (("score", "holdout_score"), ("se", "holdout_se"), ("n_held", "holdout_n")):
                cols[name] = scores[key][pos].tolist()
            cols["kind"] = [k if k != "typical" or not s < ATYPICAL_BELOW else "atypical"  # NaN (never held out): typical
                            for k, s in zip(kind, cols["holdout_score"])]
    if run.path("memorization_scores.json").is_file():
        per = read_json(run.path("memorization_scores.json"))["per_example"]
        cols.update({k: per[k] for k in PROXIES if k in per and len(per[k]) == n})
    for path in sorted(run.dir.glob("neuron_flipping*.json")):
        if ".partial" in path.name:
            continue
        stem, records = path.stem, read_json(path).get("records", [])
        units, flipped, groups, kinds = ([None] * n for _ in range(4))
        for r in records:
            i = r["index"]
            units[i], flipped[i], kinds[i] = r["n_units"], int(r["flipped"]), r["kind"]
            groups[i] = ";".join(u["group"] for u in r["units"])
        cols.update({f"{stem}_units": units, f"{stem}_flipped": flipped, f"{stem}_groups": groups,
                     f"{stem}_target_kind": kinds})
    if run.path("example_tied_dropout.json").is_file():
        etd = read_json(run.path("example_tied_dropout.json"))
        drop = [None] * n
        for i, c in zip(etd["per_example"]["noisy_index"], etd["per_example"]["noisy_drop_correct"]):
            drop[i] = c
        forgotten = set(etd["etd"]["clean_forgotten"])
        cols["etd_drop_correct"] = drop
        cols["etd_clean_forgotten"] = [int(i in forgotten) if not m else None
                                       for i, m in enumerate(cols["memorized"])]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for row in zip(*cols.values()):
        w.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
                    (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    atomic_write(run.path("examples.csv"), buf.getvalue())
    return list(cols)
