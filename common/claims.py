"""The paper's five claims, judged from the experiments' JSON results: one rule per claim.

Each rule (statistic, thresholds, control) is fixed here and written out in docs/protocol.md ("How
each claim is judged") before the numbers it judges were seen; it is never loosened afterwards. A
rule changed in this release keeps its previous text (PREVIOUS_RULES) and its verdict is still
computed beside the new one (Claim.previous); docs/protocol.md "Rule history" says why it changed.
Every judge takes the JSON result of one run, or a list of them (one per seed), and returns Claim
objects: the statistic, its 95% confidence interval (percentile bootstrap; each judge says what it
resamples), the rule, and a verdict: yes / partial / no, or inconclusive when a control fails or a
deciding quantity's CI contains its threshold (`side`, `settle`: "inconclusive at n seeds").

    accounting(results)          claim 1, gradient_accounting.json            -> Claim
    rewinding(results)           claim 2, layer_rewinding.json                -> [Claim per BatchNorm mode]
    retraining(results)          claim 3, layer_retraining.json               -> [Claim, + one for the ablation]
    flipping(results, variant)   claim 4, neuron_flipping*.json               -> Claim
    tied_dropout(results)        claim 5, example_tied_dropout.json           -> [Claim per drop scaling]

The scripts print `claim.line()`; common/report.py puts the same Claims in the report's table.
Nothing else judges a claim.
"""
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .dropout import DROP_SCALINGS, scaling_name
from .rng import derive_seed

VERDICTS = ("yes", "partial", "no", "inconclusive")

# ----------------------------------------------------------------------------- the bootstrap
RESAMPLES = 2000        # bootstrap resamples per interval
LEVEL = 0.95            # confidence level (percentile interval)
BOOTSTRAP_SEED = 0      # every interval draws from its own generator, derived from this and its name

# ----------------------------------------------------------------------------- the rules' constants
MEMORIZED = 0.9         # a model "has memorized" when it predicts >= 90% of the noisy examples with their
                        # noisy label (the controls of claims 2, 3 and 5: nothing to remove otherwise)
# claim 1, gradient accounting
FACTOR = 2.0            # per group: [norm(noisy)/norm(clean-rest)] / [norm(control)/norm(clean-rest)], CI low > 2
NEGATIVE_SHARE = 0.8    # per group: cosine(clean-rest, noisy) < 0 in >= 80% of the memorization-phase epochs
MATCHED_FACTOR = 1.0    # per group: norm(noisy) / norm(loss-matched control) > 1 (CI): more than equally hard clean examples
MATCHED_LOSS = 0.9      # the loss-matched control is trusted when its mean loss is >= 90% of the noisy ones
# claim 2, layer rewinding
CRITICAL_NOISY = 0.5    # rewound alone to epoch 0, the group leaves < 50% of the noisy examples memorized
CLEAN_KEPT = 0.9        # ... while clean accuracy stays >= 90% of the final model's: critical for memorization
LAST_SHARE = 1 / 3      # "the last layers": the last third of the groups (rounded up)
# claim 3, layer retraining
RETAINED = 0.5          # noisy accuracy >= 50%: still (or again) memorized
PARTIAL_SHARE = 1 / 3   # partial: kept + back in at least a third of the conclusive groups (yes: a majority)
# claim 4, neuron flipping
MEAN_RATIO = 2.0        # mean units clean / noisy >= 2 (CI), against the clean and the margin-matched clean targets
MEDIAN_RATIO = 2.0      # (previous rule) median units clean / noisy >= 2 ...
RATIO_CI_LOW = 1.0      # ... with the CI's lower bound > 1
ALPHA = 0.01            # one-sided Mann-Whitney U: noisy examples need fewer units than clean ones
MAX_TEST_COST = 0.01    # a noisy example's edit costs < 1 test-accuracy point on average
# claim 5, example-tied dropout
DROPPED = 0.05          # noisy accuracy after the drop: the CI's upper bound <= 5%
TEST_MARGIN = 0.01      # test accuracy kept: the CI's lower bound of (drop - plain) >= -1 point

STATEMENTS = {
    1: "Noisy examples' gradient is large for their share, in every layer, and opposes the clean one "
       "while they are memorized",
    2: "Rewinding single layers leaves memorization mostly intact; the critical layers are not the last",
    3: "Retraining a single layer on clean data only brings the memorized labels back for most layers",
    4: "Noisy examples flip after far fewer units than clean ones, with little collateral damage",
    5: "Example-tied dropout: noisy accuracy ~100% -> near 0 after dropping, test accuracy kept",
}

RULES = {
    1: (f"per layer group, over the memorization-phase epochs (CIs: bootstrap over seeds, then epochs): (i) factor "
        f"= [norm(noisy)/norm(clean-rest)] / [norm(control)/norm(clean-rest)] (geometric mean) > {FACTOR:g}; (ii) "
        f"loss-matched factor = norm(noisy) / norm(loss-matched clean control) (geometric mean) > "
        f"{MATCHED_FACTOR:g}; (iii) share of epochs with cosine(clean-rest, noisy) < 0 >= {NEGATIVE_SHARE:.0%}; a "
        f"group passes when all three CIs lie on the claim's side. yes: every group; partial: a majority; no: "
        f"otherwise; inconclusive at n seeds when a CI containing its threshold could change that. Controls: "
        f"mean cosine(control, clean-rest) > 0 in every group, else inconclusive; the loss-matched control's mean "
        f"loss >= {MATCHED_LOSS:.0%} of the noisy examples' over the phase, else a pass of (ii) is not trusted "
        f"(an easier control carries a smaller gradient) and counts as unsettled. The paper's statistic, "
        f"norm(noisy)/norm(clean), is reported beside, not judged"),
    2: (f"rewound alone to epoch 0 (mean over seeds), a group is critical for memorization when noisy accuracy "
        f"< {CRITICAL_NOISY:.0%} and clean accuracy >= {CLEAN_KEPT:.0%} of the final model's (critical for "
        f"everything when clean falls too), else redundant. (a) a majority of groups is redundant (its share's "
        f"CI, bootstrap over seeds, above 1/2; one seed: the share itself); (b) some group is critical for "
        f"memorization and not all of them lie in the last third of the groups. yes: (a) and (b); partial: one; "
        f"no: neither; inconclusive at n seeds when the share's CI contains 1/2 and that decides. Control: the "
        f"final model memorized (noisy >= {MEMORIZED:.0%}), else inconclusive"),
    3: (f"per group (mean over seeds), noisy accuracy right after the reset / after clean-only retraining, "
        f"threshold {RETAINED:.0%}: uninformative (the reset left >= {RETAINED:.0%}: nothing to bring back), back "
        f"(<, >=), not back (<, <). Positive control: the group retrained on all examples returns to >= "
        f"{MEMORIZED:.0%} noisy accuracy, else the group is inconclusive. Share = back / (back + not back); yes: "
        f"> 1/2; partial: >= {PARTIAL_SHARE:.2g}; no: below (CI: bootstrap over seeds, the resamples without a "
        f"back or not-back group counted and ranked lowest; one seed: the share itself); inconclusive at n seeds "
        f"when the CI contains a threshold that decides. Inconclusive when the positive control fails in more "
        f"than half the groups, no group lost memorization at the reset, or the final model did not memorize"),
    4: (f"units to flip (not flipped = max_units, a lower bound), CIs: bootstrap over seeds, then examples. Noisy "
        f"vs clean targets: one-sided Mann-Whitney p < {ALPHA:g} (seeds pooled) and ratio of mean units "
        f"clean/noisy >= {MEAN_RATIO:g} (CI); the same two against the margin-matched clean targets (clean, "
        f"matched to the noisy ones on the trained model's margin); mean test-accuracy drop after a noisy edit < "
        f"{100 * MAX_TEST_COST:g} point (CI). yes: all; partial: both p < {ALPHA:g} but not all of the rest; no: "
        f"either p >= {ALPHA:g}; inconclusive at n seeds when a CI containing its threshold, or a missing "
        f"margin-matched control, could change that. Reported beside: the Hodges-Lehmann shift (clean minus "
        f"noisy units) and the rank-biserial correlation, each with its CI"),
    5: (f"(a) removed: noisy accuracy after the drop, CI high <= {DROPPED:.0%} (CI low > {DROPPED:.0%}: not "
        f"removed); (b) kept: test accuracy drop - plain, CI low >= -{100 * TEST_MARGIN:g} point (CI high < "
        f"-{100 * TEST_MARGIN:g}: not kept); both CIs bootstrap over seeds, then examples (paired for the test). "
        f"yes: (a) and (b); partial: one, the other not; no: neither; inconclusive: a CI straddles its "
        f"threshold. Controls, else inconclusive: the ETD model memorized (tied-mode noisy >= {MEMORIZED:.0%}); "
        f"negative control: the plain model with as many randomly chosen channels dropped at the same places "
        f"(same scaling, mean over draws) does not meet (a) and (b) itself. The same rule for each scaling of "
        f"the drop (generalization channels x (p_gen + p_mem) / p_gen, the authors', first; not rescaled) and "
        f"each model (the authors' ResNet-18 with dropout after layer2 and layer3 first), one row each"),
}

# The rules this release replaced (docs/protocol.md, "Rule history"): their verdicts are still computed
# and shown beside the new ones (Claim.previous, values["previous_rule"]).
PREVIOUS_RULES = {
    1: (f"per layer group, over the memorization-phase epochs: factor = [norm(noisy)/norm(clean-rest)] / "
        f"[norm(control)/norm(clean-rest)] (geometric mean; CI: bootstrap over seeds, then epochs) with CI low "
        f"> {FACTOR:g}, and cosine(clean-rest, noisy) < 0 in >= {NEGATIVE_SHARE:.0%} of the epochs. yes: every "
        f"group; partial: a majority; no: otherwise. Control: mean cosine(control, clean-rest) > 0 in every "
        f"group, else inconclusive"),
    2: (f"rewound alone to epoch 0 (mean over seeds), a group is critical for memorization when noisy accuracy "
        f"< {CRITICAL_NOISY:.0%} and clean accuracy >= {CLEAN_KEPT:.0%} of the final model's (critical for "
        f"everything when clean falls too), else redundant. (a) a majority of groups is redundant; (b) some "
        f"group is critical for memorization and not all of them lie in the last third of the groups. yes: "
        f"(a) and (b); partial: one; no: neither. CI of the redundant share: bootstrap over seeds. Control: the "
        f"final model memorized (noisy >= {MEMORIZED:.0%}), else inconclusive"),
    3: (f"per group (mean over seeds), noisy accuracy right after the reset / after clean-only retraining, "
        f"threshold {RETAINED:.0%}: kept (>=, >=), back (<, >=), not back (<, <), erased (>=, <). Positive "
        f"control: the group retrained on all examples returns to >= {MEMORIZED:.0%} noisy accuracy, else the "
        f"group is inconclusive. Share = (kept + back) / conclusive groups; yes: > 1/2; partial: >= "
        f"{PARTIAL_SHARE:.2g}; no: below. Inconclusive when fewer than half the groups are conclusive or the "
        f"final model did not memorize. CI: bootstrap over seeds"),
    4: (f"units to flip (not flipped = max_units, a lower bound): ratio of medians clean/noisy >= "
        f"{MEDIAN_RATIO:g} with CI low > {RATIO_CI_LOW:g} (bootstrap over examples, stratified by seed), "
        f"one-sided Mann-Whitney p < {ALPHA:g} (seeds pooled), and mean test-accuracy drop after a noisy edit "
        f"< {100 * MAX_TEST_COST:g} point: yes. partial: p < {ALPHA:g} but not all of the rest; no: otherwise"),
}


@dataclass
class Claim:
    """One judged claim: a row of the report's claims table."""
    number: int
    variant: str            # e.g. "BatchNorm: final (authors)"; "" for the only row of a claim
    statistic: str          # what was measured, in words and numbers
    ci: str                 # its 95% confidence interval(s), or "n/a (why)"
    verdict: str            # one of VERDICTS
    reason: str             # why this verdict (which parts of the rule held)
    values: dict = field(default_factory=dict)  # the numbers behind the row (for tables and tests)
    previous: str = ""      # the verdict under the previous rule where this release changed the rule
                            # (values["previous_rule"] its text), else ""

    @property
    def statement(self):
        return STATEMENTS[self.number]

    @property
    def rule(self):
        return RULES[self.number]

    def line(self):
        """One printable line: the verdict, the statistic and CI, why, and the rule beside it."""
        head = f"claim {self.number}" + (f" [{self.variant}]" if self.variant else "")
        before = f" (previous rule: {self.previous})" if self.previous else ""
        return (f"{head}: {self.verdict.upper()}{before}: {self.statistic}; 95% CI {self.ci}; {self.reason}.\n"
                f"  rule: {self.rule}")

    def as_dict(self):
        return {**asdict(self), "statement": self.statement, "rule": self.rule}


def _claim(number, variant, statistic, ci, verdict, reason, previous=None, **values):
    """A Claim; `previous`: its verdict under PREVIOUS_RULES[number] (claims whose rule changed)."""
    assert verdict in VERDICTS, verdict
    if previous is None:
        return Claim(number, variant, statistic, ci, verdict, reason, values)
    assert previous in VERDICTS, previous
    return Claim(number, variant, statistic, ci, verdict, reason, {**values, "previous_rule": PREVIOUS_RULES[number]},
                 previous)


def _runs(results):
    """A result dict, or a list of them (one per seed) -> a list."""
    return [results] if isinstance(results, dict) else list(results)


# ----------------------------------------------------------------------------- statistics

class Interval(tuple):
    """(low, high) of a bootstrap interval; `.undefined`: how many resamples had no value (e.g. a share with
    an empty denominator). They are not dropped: they rank below every value (bootstrap's undefined="low",
    against a claim that needs the statistic high) or above ("high"), so once more than 2.5% of the
    resamples are undefined that end of the interval is unbounded (-inf / inf): the data cannot place it."""
    undefined = 0


def _percentile_sorted(v, q):
    """np.percentile's linear interpolation on sorted `v`, where an infinite neighbour wins."""
    pos = q / 100 * (len(v) - 1)
    i = int(math.floor(pos))
    a, b = v[i], v[min(i + 1, len(v) - 1)]
    if np.isinf(a) or np.isinf(b):
        return a if np.isinf(a) and (a < 0 or pos == i) else b
    return a + (b - a) * (pos - i)


def bootstrap(strata, statistic, name, resample_strata=False, n=RESAMPLES, undefined="low", k=None):
    """Percentile CI (LEVEL) of `statistic(sample)` by resampling with replacement: an Interval (with
    `k`: statistic returns k numbers, and the result is a list of k Intervals from the same resamples).

    `strata`: one entry per seed, each a tuple of numpy arrays; the rows of every array are resampled
    independently within the stratum (paired data: one array with a column per member of the pair).
    `resample_strata`: first resample the strata (seeds) themselves (two-level bootstrap; with a
    single stratum only its rows are resampled). `name` seeds the interval's own generator, so every
    interval is reproducible on its own. Resamples whose statistic is undefined (not finite) are
    counted (`.undefined`) and ranked as `undefined` says; (nan, nan) if none is finite."""
    rng = np.random.default_rng(derive_seed(BOOTSTRAP_SEED, "bootstrap", name))
    strata = [tuple(np.asarray(a) for a in s) for s in strata]
    stats = np.empty((n, k or 1))
    for b in range(n):
        picks = rng.integers(len(strata), size=len(strata)) if resample_strata and len(strata) > 1 \
            else range(len(strata))
        sample = [tuple(a[rng.integers(len(a), size=len(a))] if len(a) else a for a in strata[s]) for s in picks]
        stats[b] = statistic(sample)
    if k:
        return [_interval_of(stats[:, j], undefined) for j in range(k)]
    return _interval_of(stats[:, 0], undefined)


def _interval_of(stats, undefined):
    """The percentile Interval of a bootstrap's statistics (see Interval for the undefined ones)."""
    bad = ~np.isfinite(stats)
    tail = 50 * (1 - LEVEL)
    if bad.all():
        lo = hi = float("nan")
    elif not bad.any():
        lo, hi = np.percentile(stats, [tail, 100 - tail])
    else:
        ranked = np.sort(np.where(bad, -np.inf if undefined == "low" else np.inf, stats))
        lo, hi = (_percentile_sorted(ranked, q) for q in (tail, 100 - tail))
    out = Interval((float(lo), float(hi)))
    out.undefined = int(bad.sum())
    return out


def side(ci, threshold, above=True, strict=True, point=None):
    """Where a deciding quantity lies against its threshold: True (its CI wholly on the claim's side),
    False (wholly on the other side), None (the CI contains the threshold or an end is undefined: at
    these seeds the data cannot tell). `above`: the claim needs the quantity above the threshold (else
    below); `strict`: > (or <) rather than >= (<=). `ci` None (a bootstrap over seeds with one seed):
    the point estimate `point` decides."""
    lo, hi = (point, point) if ci is None else ci
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return None

    def holds(v):
        if above:
            return v > threshold if strict else v >= threshold
        return v < threshold if strict else v <= threshold
    near, far = (lo, hi) if above else (hi, lo)
    return True if holds(near) else False if not holds(far) else None


def settle(verdict_of, tests):
    """The verdict of a rule whose conditions may be unsettled (side() None, or a missing control):
    `tests` {condition: True | False | None}; `verdict_of(tests)` the rule's verdict from settled
    conditions (monotone: a condition that holds never makes it worse). The unsettled conditions are
    tried all holding and all failing: the verdict stands where both agree, else it is "inconclusive".
    Returns (verdict, [the unsettled conditions] where that made it inconclusive)."""
    best = verdict_of({k: True if v is None else v for k, v in tests.items()})
    worst = verdict_of({k: False if v is None else v for k, v in tests.items()})
    if best == worst:
        return best, []
    return "inconclusive", [k for k, v in tests.items() if v is None]


def _unsettled(names, seeds):
    return (f"inconclusive at {seeds} seed{'s' if seeds != 1 else ''}, not settled (a CI contains its threshold, "
            f"or a control is missing): {'; '.join(names)}")


def _pooled(sample, k=0):
    """The k-th array of every stratum of a bootstrap sample, concatenated."""
    return np.concatenate([s[k] for s in sample]) if sample else np.array([])


def _ranks(v):
    """Ranks 1..n, ties sharing their average rank; and the tie-correction term sum(t^3 - t)."""
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse], float(np.sum(counts ** 3 - counts))


def _exact_u_counts(n1, n2):
    """Number of orderings of n1 + n2 distinct values giving each U = 0 .. n1*n2 (the Mann-Whitney
    null distribution), by the recurrence c(m, n) = c(m-1, n) shifted by n + c(m, n-1)."""
    rows = [np.ones(1)] * (n2 + 1)  # c(0, n) = [1] for every n
    for m in range(1, n1 + 1):
        new = [np.zeros(1)]
        new[0][0] = 1.0             # c(m, 0) = [1]
        for n in range(1, n2 + 1):
            c = np.zeros(m * n + 1)
            c[n:n + len(rows[n])] += rows[n]   # the largest value is one of the m: each of the n is below it
            c[:len(new[n - 1])] += new[n - 1]  # the largest value is one of the n
            new.append(c)
        rows = new
    return rows[n2]


EXACT_MAX = 50  # exact Mann-Whitney p-value when there are no ties and both samples have at most 50 values


def mann_whitney_less(x, y):
    """One-sided Mann-Whitney U test of H1 "x tends to be smaller than y". Returns (U of x, p).

    U = number of pairs (x_i, y_j) with x_i > y_j, ties counting one half. Exact null distribution
    without ties for small samples (both <= EXACT_MAX); otherwise the normal approximation with the
    tie correction of the variance and a continuity correction."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return float("nan"), float("nan")
    ranks, ties = _ranks(np.concatenate([x, y]))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    if ties == 0 and max(n1, n2) <= EXACT_MAX:
        counts = _exact_u_counts(n1, n2)
        return u, float(counts[:int(round(u)) + 1].sum() / counts.sum())
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:  # every value equal: no evidence either way
        return u, 1.0
    z = (u - n1 * n2 / 2 + 0.5) / math.sqrt(var)
    return u, 0.5 * math.erfc(-z / math.sqrt(2))


def _pct(v, digits=1):
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.{digits}f}%"


def _interval(lo, hi, fmt="{:.2f}"):
    if np.isnan(lo) or np.isnan(hi):
        return "n/a"
    end = lambda v: "undefined" if np.isinf(v) else fmt.format(v)  # noqa: E731  (see Interval)
    return f"[{end(lo)}, {end(hi)}]"


def _pct_interval(lo, hi):
    return _interval(100 * lo, 100 * hi, "{:.1f}%")


def _mean(values):
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _colmean(a):
    """Column means of a seeds x items array over its finite entries (NaN for a column without any)."""
    ok = np.isfinite(a)
    return np.where(ok.any(0), np.where(ok, a, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)


# ----------------------------------------------------------------------------- claim 1

def accounting(results):
    """Claim 1 from gradient_accounting.json (one per seed). CIs: two-level bootstrap, seeds then
    memorization-phase epochs."""
    runs = _runs(results)
    groups = runs[0]["groups"]
    phases = [set(r["memorization_phase"]["epochs"]) for r in runs]
    rows = [[t for t in r["epochs"] if t["epoch"] in p] for r, p in zip(runs, phases)]
    if not any(rows):
        return _claim(1, "", "no memorization phase", "n/a", "inconclusive",
                      "no epoch took the noisy examples to memorized (or there is no noisy example)",
                      previous="inconclusive")
    if any("norm_control" not in t["groups"][groups[0]] for rs in rows for t in rs):
        return _claim(1, "", "no control group in the results", "n/a", "inconclusive",
                      "re-run gradient_accounting.py: it accounts the control group", previous="inconclusive")
    matched = all("norm_matched" in t["groups"][groups[0]] for rs in rows for t in rs)
    # how hard the loss-matched control was: its mean loss / the noisy examples', over the phase epochs
    match_loss = _mean([t["matching"]["loss_matched"] / t["matching"]["loss_noisy"] for rs in rows for t in rs
                        if t["matching"]["loss_noisy"]]) if matched else float("nan")
    trusted = match_loss >= MATCHED_LOSS

    def two_level(per_seed, fn, name):
        pooled = np.concatenate(per_seed)
        if len(pooled) and (pooled == pooled[0]).all():  # every resample is the same value: no need to draw
            return Interval((float(fn(pooled)),) * 2)
        return bootstrap([(v,) for v in per_seed], lambda s: fn(_pooled(s)) if len(_pooled(s)) else np.nan, name,
                         resample_strata=True)

    geo = lambda v: float(np.exp(v.mean())) if len(v) else float("nan")  # noqa: E731
    per_group, tests = {}, {}
    for g in groups:
        logf, logm, logp, neg, ctrl = [], [], [], [], []
        for rs in rows:
            f, m, pp, ng = [], [], [], []
            for t in rs:
                x = t["groups"][g]
                rest, noisy, control = x["norm_clean_rest"], x["norm_noisy"], x["norm_control"]
                if rest and noisy and control:
                    f.append(math.log((noisy / rest) / (control / rest)))
                if noisy and x.get("norm_clean"):
                    pp.append(math.log(noisy / x["norm_clean"]))
                if matched and noisy and x["norm_matched"]:
                    m.append(math.log(noisy / x["norm_matched"]))
                if x["cosine_rest_noisy"] is not None:
                    ng.append(float(x["cosine_rest_noisy"] < 0))
                if x["cosine_control_rest"] is not None:
                    ctrl.append(x["cosine_control_rest"])
            logf.append(np.array(f))
            logm.append(np.array(m))
            logp.append(np.array(pp))
            neg.append(np.array(ng))
        lo, hi = two_level(logf, lambda v: np.exp(v.mean()), f"accounting:{g}")
        share = float(np.concatenate(neg).mean()) if sum(map(len, neg)) else float("nan")
        v = {"factor": geo(np.concatenate(logf)), "ci": (lo, hi), "negative_share": share,
             "negative_share_ci": two_level(neg, np.mean, f"accounting:{g}:negative"),
             "matched_factor": geo(np.concatenate(logm)),
             "matched_ci": two_level(logm, lambda v: np.exp(v.mean()), f"accounting:{g}:matched") if matched
             else (float("nan"), float("nan")),
             "noisy_clean_ratio": geo(np.concatenate(logp)),
             "control_cosine": _mean(ctrl),
             "passes_previous": bool(lo > FACTOR and share >= NEGATIVE_SHARE)}
        m_side = side(v["matched_ci"], MATCHED_FACTOR) if matched else None
        tests[f"{g}: factor > {FACTOR:g}"] = side(v["ci"], FACTOR)
        tests[f"{g}: loss-matched factor > {MATCHED_FACTOR:g}" + ("" if matched else " (no loss-matched control)")
              + ("" if trusted or not matched else " (control easier than the noisy examples)")] = \
            None if m_side and not trusted else m_side
        tests[f"{g}: cosine < 0 in >= {NEGATIVE_SHARE:.0%} of the epochs"] = side(v["negative_share_ci"], NEGATIVE_SHARE,
                                                                                 strict=False)
        per_group[g] = v
    names = list(tests)

    def verdict_of(t):
        passed = sum(all(t[k] for k in names[3 * i:3 * i + 3]) for i in range(len(groups)))
        return "yes" if passed == len(groups) else "partial" if 2 * passed > len(groups) else "no"

    verdict, open_ = settle(verdict_of, tests)
    for i, g in enumerate(groups):
        own = [tests[k] for k in names[3 * i:3 * i + 3]]
        per_group[g]["passes"] = False if False in own else None if None in own else True  # None: not settled
    passed = [g for g in groups if per_group[g]["passes"]]
    failing = [g for g in groups if per_group[g]["passes"] is False]
    worst = min(groups, key=lambda g: per_group[g]["ci"][0] if np.isfinite(per_group[g]["ci"][0]) else -np.inf)
    worst_m = min(groups, key=lambda g: per_group[g]["matched_ci"][0] if np.isfinite(per_group[g]["matched_ci"][0])
                  else -np.inf)
    least_negative = min(groups, key=lambda g: per_group[g]["negative_share"])
    n_epochs = sum(len(rs) for rs in rows)

    def span(key):  # "lowest (group) to highest (group)" of a per-group number
        ok = [g for g in groups if np.isfinite(per_group[g][key])]
        if not ok:
            return "n/a"
        lo_g, hi_g = (f(ok, key=lambda g: per_group[g][key]) for f in (min, max))
        return f"{per_group[lo_g][key]:.2f} ({lo_g}) to {per_group[hi_g][key]:.2f} ({hi_g})"
    statistic = (f"factor {span('factor')}; loss-matched factor "
                 + (f"{span('matched_factor')} (matched loss {_pct(match_loss, 0)} of the noisy examples')"
                    if matched else "n/a (no loss-matched control)")
                 + f"; the paper's norm(noisy)/norm(clean) {span('noisy_clean_ratio')}; cosine(clean-rest, noisy) < 0 "
                   f"in >= {per_group[least_negative]['negative_share']:.0%} of {n_epochs} phase epochs "
                   f"({least_negative}); {len(passed)}/{len(groups)} groups pass")
    ci = f"{_interval(*per_group[worst]['ci'])} (factor, {worst}: the lowest CI)" + (
        f"; {_interval(*per_group[worst_m]['matched_ci'])} (loss-matched factor, {worst_m}: the lowest CI)"
        if matched else "")
    bad_control = [g for g in groups if not per_group[g]["control_cosine"] > 0]
    control_words = f"control cosine > 0 in every group (min {min(per_group[g]['control_cosine'] for g in groups):+.2f})"
    if bad_control:
        verdict = previous = "inconclusive"
        reason = f"the control's mean cosine with clean-rest is not positive in {', '.join(bad_control)}"
    else:
        prev_passed = [g for g in groups if per_group[g]["passes_previous"]]
        previous = "yes" if len(prev_passed) == len(groups) else "partial" if 2 * len(prev_passed) > len(groups) \
            else "no"
        if open_:
            reason = _unsettled(open_, len(runs))
        else:
            reason = "every group passes" if not failing else f"failing: {', '.join(failing)}"
        reason += "; " + control_words
        if matched and not trusted:
            reason += (f"; the loss-matched control is easier than the noisy examples (mean loss {_pct(match_loss, 0)} "
                       f"of theirs < {MATCHED_LOSS:.0%}): its passes are not trusted")
    return _claim(1, "", statistic, ci, verdict, reason, previous=previous, groups=per_group, seeds=len(runs),
                  matched_loss=match_loss)


# ----------------------------------------------------------------------------- claim 2

BN_MODES = {"final": "BatchNorm: final (authors)", "recompute": "BatchNorm: recomputed",
            "checkpoint": "BatchNorm: checkpoint's"}


def _rewind_modes(r):
    """{BatchNorm mode: accuracy[group][str(epoch)]} of a layer_rewinding.json."""
    if r.get("bn_modes"):
        return {m: v["accuracy"] for m, v in r["bn_modes"].items()}
    return {r.get("rewind_bn_stats", "final"): r["accuracy"]}


def last_groups(groups):
    """The last third of the groups (rounded up): "the last layers"."""
    return groups[len(groups) - math.ceil(LAST_SHARE * len(groups)):]


def rewinding(results):
    """Claim 2 from layer_rewinding.json (one per seed): one Claim per BatchNorm mode present in
    every seed (the authors' `final` first)."""
    runs = _runs(results)
    modes = set.intersection(*(set(_rewind_modes(r)) for r in runs))
    order = list(BN_MODES) + sorted(modes - set(BN_MODES))
    return [_rewinding_mode(runs, m) for m in order if m in modes]


def classify_rewound(noisy, clean, final_clean):
    """'redundant' | 'memorization' (critical for memorization) | 'everything' (critical for everything)."""
    if noisy >= CRITICAL_NOISY:
        return "redundant"
    return "memorization" if clean >= CLEAN_KEPT * final_clean else "everything"


def _rewinding_mode(runs, mode):
    groups = runs[0]["groups"]
    accs = [_rewind_modes(r)[mode] for r in runs]
    epoch = "0" if all("0" in a[groups[0]] for a in accs) else str(min(int(e) for e in accs[0][groups[0]]))
    noisy = np.array([[a[g][epoch]["noisy"] for g in groups] for a in accs])
    clean = np.array([[a[g][epoch]["clean"] for g in groups] for a in accs])
    final_clean = np.array([r["final"]["clean"] for r in runs])
    final_noisy = _mean([r["final"]["noisy"] for r in runs])

    def classes(seeds):
        return [classify_rewound(noisy[seeds, i].mean(), clean[seeds, i].mean(), final_clean[seeds].mean())
                for i in range(len(groups))]

    cls = classes(np.arange(len(runs)))
    share = cls.count("redundant") / len(groups)
    lo, hi = bootstrap([(np.arange(len(runs)),)], lambda s: classes(s[0][0]).count("redundant") / len(groups),
                       f"rewinding:{mode}") if len(runs) > 1 else (float("nan"), float("nan"))
    memo = [g for g, c in zip(groups, cls) if c == "memorization"]
    every = [g for g, c in zip(groups, cls) if c == "everything"]
    late = last_groups(groups)
    majority = 2 * cls.count("redundant") > len(groups)
    not_last = bool(memo) and not all(g in late for g in memo)
    where = lambda gs: ", ".join(f"{g} ({groups.index(g) + 1}/{len(groups)})" for g in gs) or "none"  # noqa: E731
    statistic = (f"{cls.count('redundant')}/{len(groups)} groups redundant rewound to epoch {epoch}; critical for "
                 f"memorization: {where(memo)}; critical for everything: {where(every)}")
    ci = (f"{_pct_interval(lo, hi)} (redundant share)" if len(runs) > 1 else "n/a (1 seed)")
    rule = lambda t: "yes" if all(t.values()) else "partial" if any(t.values()) else "no"  # noqa: E731
    if not final_noisy >= MEMORIZED:
        verdict = previous = "inconclusive"
        reason = f"the final model did not memorize (noisy {_pct(final_noisy)})"
    else:
        previous = rule({"a": majority, "b": not_last})
        tests = {f"a majority redundant (share {_pct(share, 0)}, CI {_pct_interval(lo, hi)})":
                 side(None if len(runs) == 1 else (lo, hi), 0.5, point=share), "b": not_last}
        verdict, open_ = settle(rule, tests)
        reason = (("a majority is redundant" if majority else "no majority is redundant") + "; " +
                  ("no group is critical for memorization alone" if not memo else
                   f"critical groups {'not all' if not_last else 'all'} in the last third ({', '.join(late)})"))
        if open_:
            reason = _unsettled(open_, len(runs)) + "; " + reason
    if epoch != "0":
        reason += f"; epoch 0 was not rewound to: epoch {epoch} used"
    return _claim(2, BN_MODES.get(mode, f"BatchNorm: {mode}"), statistic, ci, verdict, reason, previous=previous,
                  mode=mode, epoch=int(epoch), classes=dict(zip(groups, cls)), redundant_share=share,
                  noisy=dict(zip(groups, noisy.mean(0).tolist())), clean=dict(zip(groups, clean.mean(0).tolist())),
                  final_clean=float(final_clean.mean()), seeds=len(runs))


# ----------------------------------------------------------------------------- claim 3

def classify_informative(reset, retrained):
    """'uninformative' (the reset left the group memorized: nothing to bring back) | 'back' | 'not back'
    from noisy accuracy after the reset and after retraining."""
    if reset >= RETAINED:
        return "uninformative"
    return "back" if retrained >= RETAINED else "not back"


def classify_retrained(reset, retrained):
    """(previous rule) 'kept' | 'back' | 'not back' | 'erased' from noisy accuracy after the reset and after
    retraining."""
    if reset >= RETAINED:
        return "kept" if retrained >= RETAINED else "erased"
    return "back" if retrained >= RETAINED else "not back"


def _noisy(entry, key, curve_index):
    """Noisy accuracy of a retraining group entry: entry[key] if present, else from its curve."""
    return entry[key]["noisy"] if isinstance(entry.get(key), dict) else entry["curve"][curve_index]["noisy"]


def retraining(results):
    """Claim 3 from layer_retraining.json (one per seed): the main run (the authors' loop) and, where
    the seeds have it, the frozen-BatchNorm ablation, each its own Claim."""
    runs = _runs(results)
    main = _retraining_variant([(r["groups"], r["final_model"]) for r in runs],
                               f"BatchNorm: {runs[0].get('frozen_bn', 'train')}" + (
                                   " (authors)" if runs[0].get("frozen_bn", "train") == "train" else ""), "main")
    out = [main]
    ablated = [(r["ablation"]["groups"], r["final_model"], r["ablation"].get("frozen_bn", "eval"))
               for r in runs if r.get("ablation")]
    if ablated:
        seeds = f"; {len(ablated)} of {len(runs)} seeds" if len(ablated) < len(runs) else ""
        out.append(_retraining_variant([a[:2] for a in ablated], f"BatchNorm: {ablated[0][2]} (ablation{seeds})",
                                       "ablation"))
    return out


def _retraining_variant(seeds, variant, name):
    groups = list(seeds[0][0])
    reset = np.array([[_noisy(gs[g], "reset", 0) for g in groups] for gs, _ in seeds])
    final = np.array([[_noisy(gs[g], "final", -1) for g in groups] for gs, _ in seeds])
    control = np.array([[gs[g]["control"]["final"]["noisy"] if gs[g].get("control") else np.nan for g in groups]
                        for gs, _ in seeds])
    final_noisy = _mean([fm["noisy"] for _, fm in seeds])

    def classes(idx, classify=classify_informative):
        ctrl = _colmean(control[idx])  # over the seeds that ran the control (it may run for fewer seeds)
        out = [classify(reset[idx, i].mean(), final[idx, i].mean()) for i in range(len(groups))]
        # an uninformative group stays so whatever its control; the others need the control to pass
        return [c if c == "uninformative" or ctrl[i] >= MEMORIZED else "inconclusive" for i, c in enumerate(out)]

    def share(cls):
        informative = cls.count("back") + cls.count("not back")
        return cls.count("back") / informative if informative else float("nan")

    cls = classes(np.arange(len(seeds)))
    counts = {k: cls.count(k) for k in ("back", "not back", "uninformative", "inconclusive")}
    failed = [g for g, c in zip(groups, _colmean(control)) if not c >= MEMORIZED]  # positive control failed
    s = share(cls)
    iv = bootstrap([(np.arange(len(seeds)),)], lambda smp: share(classes(smp[0][0])), f"retraining:{name}:informative") \
        if len(seeds) > 1 else None
    statistic = (f"back in {counts['back']}/{counts['back'] + counts['not back']} groups that lost memorization at "
                 f"the reset ({_pct(s, 0)}): back {counts['back']}, not back {counts['not back']}, uninformative (reset "
                 f"left >= {RETAINED:.0%}) {counts['uninformative']}, inconclusive {counts['inconclusive']}")
    n_control = int((~np.isnan(control).all(1)).sum())
    if 0 < n_control < len(seeds):
        statistic += f"; positive control from {n_control} of {len(seeds)} seeds"
    if counts["back"] + counts["not back"] == 0:
        statistic += "; no group lost memorization at the reset"
    if iv is None:
        ci = "n/a (1 seed)"
    else:
        ci = f"{_pct_interval(*iv)} (share)" + (f"; {iv.undefined} of {RESAMPLES} resamples without a back or not-back "
                                                f"group, ranked lowest" if iv.undefined else "")
    cls_old = classes(np.arange(len(seeds)), classify_retrained)
    previous, prev = _retraining_previous(cls_old, groups, np.isnan(control).all(), final_noisy)
    if np.isnan(control).all():
        verdict, reason = "inconclusive", "no positive control in the results (re-run layer_retraining.py)"
    elif not final_noisy >= MEMORIZED:
        verdict, reason = "inconclusive", f"the final model did not memorize (noisy {_pct(final_noisy)})"
    elif 2 * len(failed) > len(groups):
        verdict, reason = "inconclusive", f"the positive control failed in {len(failed)} of {len(groups)} groups"
    elif not np.isfinite(s):
        verdict, reason = "inconclusive", ("no group with a passing control lost memorization at the reset: nothing "
                                           "came back or stayed away")
    else:
        tests = {"share > 1/2": side(iv, 0.5, point=s),
                 f"share >= {PARTIAL_SHARE:.2g}": side(iv, PARTIAL_SHARE, strict=False, point=s)}
        verdict, open_ = settle(lambda t: "yes" if all(t.values()) else "partial" if any(t.values()) else "no", tests)
        reason = (_unsettled(open_, len(seeds)) + "; " if open_ else "") + f"share {_pct(s, 0)}" + (
            f"; positive control failed in {', '.join(failed)}" if failed else "; positive control passed in every group")
    return _claim(3, variant, statistic, ci, verdict, reason, previous=previous, classes=dict(zip(groups, cls)),
                  share=s, share_ci=tuple(iv) if iv is not None else None,
                  undefined_resamples=iv.undefined if iv is not None else 0,
                  reset=dict(zip(groups, reset.mean(0).tolist())), retrained=dict(zip(groups, final.mean(0).tolist())),
                  control=dict(zip(groups, _colmean(control).tolist())), seeds=len(seeds), counts=counts,
                  control_seeds=n_control, previous_values={**prev, "classes": dict(zip(groups, cls_old))})


def _retraining_previous(cls, groups, no_control, final_noisy):
    """Claim 3's verdict under the previous rule (kept + back over the conclusive groups) from its classes."""
    counts = {k: cls.count(k) for k in ("kept", "back", "not back", "erased", "inconclusive")}
    conclusive = len(groups) - counts["inconclusive"]
    s = (counts["kept"] + counts["back"]) / conclusive if conclusive else float("nan")
    if no_control or not final_noisy >= MEMORIZED or 2 * conclusive < len(groups):
        verdict = "inconclusive"
    else:
        verdict = "yes" if s > 0.5 else "partial" if s >= PARTIAL_SHARE else "no"
    return verdict, {"share": s, "counts": counts}


# ----------------------------------------------------------------------------- claim 4

def flip_counts(run, kind):
    """Units zeroed per `kind` example of a neuron_flipping.json; a not-flipped example counts as
    max_units (a lower bound)."""
    cap = run["settings"]["max_units"]
    return np.array([r["n_units"] if r["flipped"] else cap for r in run["records"] if r["kind"] == kind], dtype=float)


def _pair_differences(x, y):
    """The differences y_j - x_i over all pairs as (sorted distinct values, how many pairs give each): unit
    counts take few distinct values, so this stays small however many examples there are."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.min() >= 0 and y.min() >= 0 and max(x.max(), y.max()) < 100_000 and \
            (x == np.round(x)).all() and (y == np.round(y)).all():  # counts: one histogram correlation
        cx, cy = np.bincount(x.astype(np.int64)), np.bincount(y.astype(np.int64))
        w = np.convolve(cy, cx[::-1])  # w[i]: the pairs with y - x = i - (len(cx) - 1)
        keep = w > 0
        return (np.arange(len(w)) - (len(cx) - 1))[keep].astype(float), w[keep]
    ux, cx = np.unique(x, return_counts=True)
    uy, cy = np.unique(y, return_counts=True)
    d, w = (uy[:, None] - ux[None, :]).ravel(), (cy[:, None] * cx[None, :]).ravel()
    order = np.argsort(d, kind="stable")
    return d[order], w[order]


def hodges_lehmann(x, y, pairs=None):
    """Hodges-Lehmann shift of y against x: the median of all pairwise differences y_j - x_i (`pairs`:
    _pair_differences(x, y) if already computed)."""
    if not len(x) or not len(y):
        return float("nan")
    d, w = pairs or _pair_differences(x, y)
    c = np.cumsum(w)
    mid = [d[np.searchsorted(c, k, side="right")] for k in ((c[-1] - 1) // 2, c[-1] // 2)]  # 0-based middle pair(s)
    return float((mid[0] + mid[1]) / 2)


def rank_biserial(x, y, pairs=None):
    """Rank-biserial correlation of y against x: P(y > x) - P(y < x) over all pairs, in [-1, 1]
    (= 2 U_y / (n_x n_y) - 1 with the Mann-Whitney U of y); > 0: y tends to be larger."""
    if not len(x) or not len(y):
        return float("nan")
    d, w = pairs or _pair_differences(x, y)
    return float((w[d > 0].sum() - w[d < 0].sum()) / w.sum())


def _ratio_of_means(x, y, pairs=None):
    return y.mean() / x.mean() if len(x) and len(y) and x.mean() > 0 else np.nan


def _effect_values(x, y, effects):
    pairs = _pair_differences(x, y) if len(x) and len(y) else None
    return [fn(x, y, pairs) for _, fn in effects]


def _ratio_of_medians(sample):
    noisy, clean = _pooled(sample, 0), _pooled(sample, 1)
    return np.median(clean) / np.median(noisy) if len(noisy) and len(clean) and np.median(noisy) > 0 else np.nan


def _effects(noisy, other, name):
    """Noisy vs other targets (lists per seed): the continuous effects, each with its two-level CI (seeds,
    then examples), and the one-sided Mann-Whitney test (seeds pooled)."""
    strata = list(zip(noisy, other))
    x, y = np.concatenate(noisy), np.concatenate(other)
    out = {"n": len(y)}
    effects = (("hl_shift", hodges_lehmann), ("rank_biserial", rank_biserial), ("mean_ratio", _ratio_of_means))
    cis = bootstrap(strata, lambda s: _effect_values(_pooled(s, 0), _pooled(s, 1), effects), f"{name}:effects",
                    resample_strata=True, k=len(effects))
    for (key, _), value, ci in zip(effects, _effect_values(x, y, effects), cis):
        out[key], out[key + "_ci"] = float(value), ci
    out["u"], out["p"] = mann_whitney_less(x, y)
    out["means"] = (float(x.mean()), float(y.mean()))
    return out


def flipping(results, variant=None):
    """Claim 4 from neuron_flipping.json (one per seed, same settings). CIs: bootstrap over seeds, then
    examples; the U tests pool the seeds. The previous rule's ratio of medians: bootstrap over examples
    stratified by seed."""
    runs = _runs(results)
    settings = runs[0]["settings"]
    variant = variant if variant is not None else f"unit: {settings.get('unit', '?')}"
    noisy = [flip_counts(r, "noisy") for r in runs]
    clean = [flip_counts(r, "clean") for r in runs]
    matched = [flip_counts(r, "clean_matched") for r in runs]
    if not sum(map(len, noisy)) or not sum(map(len, clean)):
        return _claim(4, variant, "no noisy or no clean example", "n/a", "inconclusive", "nothing to compare",
                      previous="inconclusive")
    has_matched = all(len(m) for m in matched)
    noisy_recs = [[x for x in r["records"] if x["kind"] == "noisy"] for r in runs]
    cost = [np.array([x["accuracy_drop"]["test"] for x in rs], dtype=float) for rs in noisy_recs]
    spread = [np.array([len({u["group"] for u in x["units"]}) for x in rs], dtype=float) for rs in noisy_recs]
    vs_clean = _effects(noisy, clean, f"flipping:{variant}")
    vs_matched = _effects(noisy, matched, f"flipping:{variant}:matched") if has_matched else None
    mean_cost = float(np.concatenate(cost).mean())
    cost_ci = bootstrap([(c,) for c in cost], lambda s: _pooled(s).mean(), f"flipping:{variant}:cost:seeds",
                        resample_strata=True)
    groups_per = float(np.concatenate(spread).mean())
    capped = int(sum((x == settings["max_units"]).sum() for x in noisy + clean + matched))
    medians = {k: float(np.median(np.concatenate(v))) for k, v in (("clean", clean), ("noisy", noisy))}

    def effect_words(e, other):
        return (f"{other} - noisy: HL shift {e['hl_shift']:+g} units, rank-biserial {e['rank_biserial']:+.2f}, "
                f"mean units {e['means'][1]:.2f} / {e['means'][0]:.2f} = {e['mean_ratio']:.2f}, one-sided "
                f"Mann-Whitney p = {e['p']:.2g} (n = {sum(map(len, noisy))} noisy, {e['n']} {other})")

    def effect_ci(e, other):
        return (f"{other}: {_interval(*e['hl_shift_ci'], '{:+g}')} (HL shift), {_interval(*e['rank_biserial_ci'])} "
                f"(rank-biserial), {_interval(*e['mean_ratio_ci'])} (ratio of means)")

    statistic = "; ".join([effect_words(vs_clean, "clean"),
                           effect_words(vs_matched, "margin-matched clean") if has_matched
                           else "no margin-matched clean targets in the results",
                           f"test cost of a noisy edit {100 * mean_cost:.2f} points; {groups_per:.1f} layer groups per "
                           f"noisy example; {capped} not flipped (counted as {settings['max_units']}, a lower bound)"])
    ci = "; ".join([effect_ci(vs_clean, "clean")] + ([effect_ci(vs_matched, "margin-matched")] if has_matched else [])
                   + [f"{_interval(100 * cost_ci[0], 100 * cost_ci[1])} points (test cost)"])
    tests = {"noisy < clean (p)": vs_clean["p"] < ALPHA,
             "noisy < margin-matched (p)": vs_matched["p"] < ALPHA if has_matched else None,
             f"ratio of means clean/noisy >= {MEAN_RATIO:g}": side(vs_clean["mean_ratio_ci"], MEAN_RATIO, strict=False),
             f"ratio of means margin-matched/noisy >= {MEAN_RATIO:g}":
                 side(vs_matched["mean_ratio_ci"], MEAN_RATIO, strict=False) if has_matched else None,
             f"test cost < {100 * MAX_TEST_COST:g} point": side(cost_ci, MAX_TEST_COST, above=False)}
    significant = list(tests)[:2]

    def rule(t):
        if not all(t[k] for k in significant):
            return "no"
        return "yes" if all(t.values()) else "partial"

    verdict, open_ = settle(rule, tests)
    words = [f"{k}: {'holds' if v else 'fails' if v is False else 'not settled'}" for k, v in tests.items()]
    reason = (f"inconclusive at {len(runs)} seed{'s' if len(runs) != 1 else ''}: " if open_ else "") + "; ".join(words)
    # the previous rule: ratio of medians, its CI over examples stratified by seed, the cost's mean
    ratio = _ratio_of_medians(list(zip(noisy, clean)))
    lo, hi = bootstrap(list(zip(noisy, clean)), _ratio_of_medians, f"flipping:{variant}:ratio")
    p = vs_clean["p"]
    previous = ("yes" if p < ALPHA and ratio >= MEDIAN_RATIO and lo > RATIO_CI_LOW and mean_cost < MAX_TEST_COST
                else "partial" if p < ALPHA else "no")
    return _claim(4, variant, statistic, ci, verdict, reason, previous=previous, clean=vs_clean, matched=vs_matched,
                  ratio=ratio, ratio_ci=(lo, hi), medians=medians, p=p, u=vs_clean["u"], test_cost=mean_cost,
                  test_cost_ci=cost_ci, groups_per_example=groups_per, not_flipped=capped, seeds=len(runs))


# ----------------------------------------------------------------------------- claim 5

def standard_row(run):
    """The standard-dropout row of an example_tied_dropout.json table (without BatchNorm re-estimation)."""
    rows = [r for r in run["table"] if r["model"].startswith("standard dropout") and "BN" not in r["model"]]
    return rows[0] if rows else None


# the report's label of each drop scaling (common.dropout.DROP_SCALINGS), the authors' first
DROP_VARIANTS = {"rescaled": "drop: rescaled (authors)", "unscaled": "drop: not rescaled"}
assert list(DROP_VARIANTS) == list(DROP_SCALINGS)


def drop_scalings(run):
    """{scaling: {"noisy": noisy accuracy after the drop, "per_example": {"test_correct": [...],
    "noisy_drop_correct": [...]} or None}} of an example_tied_dropout.json, "rescaled" / "unscaled"
    (common.dropout.DROP_SCALINGS): both where the drop was evaluated both ways ("drop_scalings"), else
    the one an older file holds, named by its config's drop_rescale (False when it has none)."""
    etd, per = run["etd"], run.get("per_example")
    if "drop_scalings" in etd:
        return {s: {"noisy": v["accuracy"]["noisy"], "per_example": per and per["drop_scalings"][s]}
                for s, v in etd["drop_scalings"].items()}
    s = scaling_name(run.get("config", {}).get("drop_rescale", False))
    return {s: {"noisy": etd["modes"]["drop"]["noisy"], "per_example": per and {
        "test_correct": per["test_correct"]["drop"], "noisy_drop_correct": per["noisy_drop_correct"]}}}


def standard_dropout_words(runs, scaling=None):
    """What standard dropout at the matched rate shows, in words (for the report beside claim 5); the ETD
    drop with `scaling` (default: the drop mode of the runs' drop_rescale)."""
    rows = [standard_row(r) for r in runs]
    if any(r is None for r in rows):
        return "No standard-dropout baseline in the results."
    noisy, test = _mean([r["noisy"] for r in rows]), _mean([r["test"] for r in rows])
    plain = _mean([r["plain_test"] for r in runs])
    tied = _mean([r["etd"]["modes"]["tied"]["noisy"] for r in runs])
    drop = _mean([drop_scalings(r)[scaling]["noisy"] if scaling else r["etd"]["modes"]["drop"]["noisy"]
                  for r in runs])
    after = "after the drop" + (f", {DROP_VARIANTS[scaling].split(': ', 1)[1]}" if scaling else "")
    head = (f"Standard dropout at the matched rate ({rows[0]['model'].replace('standard dropout ', '')}) ends with "
            f"{_pct(noisy)} of the noisy examples predicted with their noisy label and {_pct(test)} test accuracy "
            f"(plain training {_pct(plain)}). ")
    if noisy < RETAINED:
        return head + (f"It keeps the network from memorizing the noisy labels in the first place, so a low noisy "
                       f"accuracy alone is no sign of localization: what example-tied dropout adds is that the noisy "
                       f"labels were memorized ({_pct(tied)} in tied mode) into channels whose removal takes them "
                       f"away ({_pct(drop)} {after}).")
    return head + (f"It memorizes the noisy labels much as plain training does: dropout at this rate does not remove "
                   f"memorization by itself, while dropping example-tied dropout's memorization channels does "
                   f"({_pct(tied)} tied -> {_pct(drop)} {after}).")


# The rule before this release: a one-level noisy CI (examples, stratified by seed), no negative control,
# no undecided band (docs/protocol.md, "Rule history"); its verdict is still shown beside the new one.
RULE5_PREVIOUS = (f"noisy accuracy after the drop: CI high <= {DROPPED:.0%} (bootstrap over noisy examples, "
                  f"stratified by seed); test accuracy drop - plain: CI low >= -{100 * TEST_MARGIN:g} point (paired "
                  f"bootstrap over seeds, then test examples). yes: both; partial: one; no: neither. Control: the "
                  f"ETD model memorized (tied-mode noisy >= {MEMORIZED:.0%}), else inconclusive")


def setup_words(run):
    """The ETD model of a run in words, e.g. "resnet18 x0.125, dropout after layer2, layer3" ("" when the
    results do not say)."""
    c, places = run.get("config", {}), run.get("etd", {}).get("places")
    if "model" not in c:
        return ""
    where = ("" if places is None else f", dropout after {', '.join(places)}" if len(places) <= 3
             else f", dropout at {len(places)} places")
    return f"{c['model']} x{c.get('width', 1):g}{where}"


def tied_dropout(results, variant=None):
    """Claim 5 from example_tied_dropout.json (one per seed): one Claim per scaling of the drop mode that
    every seed holds (drop_scalings; the authors' rescaled first), each by the same rule; `variant` (e.g.
    the model, from reproduce.py's variants) prefixes the rows' labels."""
    runs = _runs(results)
    per_run = [drop_scalings(r) for r in runs]
    present = [s for s in DROP_VARIANTS if all(s in p for p in per_run)]
    if not present:
        return [_claim(5, variant or "", "no drop scaling common to every seed", "n/a", "inconclusive",
                       "the seeds' results hold different drop scalings (re-run example_tied_dropout.py)")]
    return [_tied_dropout_scaling(runs, [p[s] for p in per_run], s, variant) for s in present]


def _part(held, not_held, text_held, text_not, text_undecided):
    """One part of a rule: "held" | "not held" | "undecided" (its CI straddles the threshold), and its words."""
    return ("held", text_held) if held else ("not held", text_not) if not_held else ("undecided", text_undecided)


def _mean_ci(strata, name, two_level=True):
    """Pooled mean of per-example 0/1 values (or fractions) and its bootstrap CI (seeds, then examples)."""
    return (float(np.concatenate(strata).mean()),
            *bootstrap([(x,) for x in strata], lambda s: _pooled(s).mean(), name, resample_strata=two_level))


def _diff_ci(paired, name):
    """Mean of column 0 minus column 1 of paired per-example values, and its two-level bootstrap CI."""
    diff = lambda s: (lambda a: a[:, 0].mean() - a[:, 1].mean())(_pooled(s))  # noqa: E731
    return (float(diff([(p,) for p in paired])),
            *bootstrap([(p,) for p in paired], diff, name, resample_strata=True))


def _tied_dropout_scaling(runs, drops, scaling, variant=None):
    label = f"{variant}; {DROP_VARIANTS[scaling]}" if variant else DROP_VARIANTS[scaling]
    tied = _mean([r["etd"]["modes"]["tied"]["noisy"] for r in runs])
    words = standard_dropout_words(runs, scaling)
    setup = setup_words(runs[0])
    if any(d["per_example"] is None for d in drops):
        return _claim(5, label, f"noisy after drop {_pct(_mean([d['noisy'] for d in drops]))}", "n/a",
                      "inconclusive", "no per-example results (re-run example_tied_dropout.py)",
                      scaling=scaling, standard_dropout=words)
    noisy = [np.array(d["per_example"]["noisy_drop_correct"], dtype=float) for d in drops]
    plain = [np.array(r["per_example"]["test_correct"]["plain"], dtype=float) for r in runs]
    paired = [np.stack([np.array(d["per_example"]["test_correct"], dtype=float), p], 1) for d, p in zip(drops, plain)]
    # the same generators for both scalings: the same resamples, so their intervals differ by the data alone
    noisy_acc, n_lo, n_hi = _mean_ci(noisy, "tied_dropout:noisy2")
    d, d_lo, d_hi = _diff_ci(paired, "tied_dropout:test")
    removed = _part(n_hi <= DROPPED, n_lo > DROPPED, f"noisy CI high <= {DROPPED:.0%}",
                    f"noisy CI high > {DROPPED:.0%} and low > {DROPPED:.0%}",
                    f"noisy CI high > {DROPPED:.0%} but low <= {DROPPED:.0%}: undecided")
    kept = _part(d_lo >= -TEST_MARGIN, d_hi < -TEST_MARGIN, f"test CI low >= -{100 * TEST_MARGIN:g} point",
                 f"test CI low < -{100 * TEST_MARGIN:g} point and high < -{100 * TEST_MARGIN:g}",
                 f"test CI low < -{100 * TEST_MARGIN:g} point but high >= -{100 * TEST_MARGIN:g}: undecided")
    # the negative control: the plain model with as many random channels dropped at the same places
    ctl = [(r.get("per_example") or {}).get("negative_control", {}).get(scaling) for r in runs]
    control = None
    if all(c is not None for c in ctl):
        c_noisy, c_lo, c_hi = _mean_ci([np.array(c["noisy_correct"], dtype=float) for c in ctl],
                                       "tied_dropout:control_noisy")
        c_d, cd_lo, cd_hi = _diff_ci([np.stack([np.array(c["test_correct"], dtype=float), p], 1)
                                      for c, p in zip(ctl, plain)], "tied_dropout:control_test")
        control = dict(control_noisy=c_noisy, control_noisy_ci=(c_lo, c_hi), control_test_diff=c_d,
                       control_test_diff_ci=(cd_lo, cd_hi),
                       control_meets=bool(c_hi <= DROPPED and cd_lo >= -TEST_MARGIN))
    statistic = ((f"{setup}: " if setup else "") + f"noisy accuracy after the drop {_pct(noisy_acc)} (tied mode "
                 f"{_pct(tied)}); test accuracy drop - plain {100 * d:+.2f} points")
    ci = f"{_pct_interval(n_lo, n_hi)} (noisy); {_interval(100 * d_lo, 100 * d_hi, '{:+.2f}')} points (test)"
    if control:
        statistic += (f"; negative control (plain model, random channels dropped): noisy "
                      f"{_pct(control['control_noisy'])}, test {100 * control['control_test_diff']:+.2f} points")
        ci += (f"; control {_pct_interval(*control['control_noisy_ci'])} (noisy), "
               f"{_interval(*(100 * v for v in control['control_test_diff_ci']), '{:+.2f}')} points (test)")
    reason = f"{removed[1]}; {kept[1]}"
    if not tied >= MEMORIZED:
        verdict, reason = "inconclusive", f"the ETD model did not memorize (tied-mode noisy {_pct(tied)})"
    elif control is None:
        verdict, reason = "inconclusive", f"{reason}; no negative control in the results (re-run example_tied_dropout.py)"
    elif control["control_meets"]:
        verdict, reason = "inconclusive", (f"{reason}; but dropping random channels of the plain model meets the rule "
                                           f"too (negative control): the drop is not specific to ETD's channels")
    elif "undecided" in (removed[0], kept[0]):
        verdict, reason = "inconclusive", f"{reason} (at {len(runs)} seed{'s' if len(runs) > 1 else ''})"
    else:
        held = [removed[0], kept[0]].count("held")
        verdict = ("no", "partial", "yes")[held]
    # the previous rule's verdict: one-level noisy CI, no negative control, no undecided band
    _, p_lo, p_hi = _mean_ci(noisy, "tied_dropout:noisy", two_level=False)
    previous = ("inconclusive" if not tied >= MEMORIZED else
                ("no", "partial", "yes")[(p_hi <= DROPPED) + (d_lo >= -TEST_MARGIN)])
    return Claim(5, label, statistic, ci, verdict, reason,
                 dict(scaling=scaling, setup=setup, noisy_after_drop=noisy_acc, noisy_ci=(n_lo, n_hi), test_diff=d,
                      test_diff_ci=(d_lo, d_hi), tied_noisy=tied, standard_dropout=words, seeds=len(runs),
                      previous_rule=RULE5_PREVIOUS, previous_noisy_ci=(p_lo, p_hi), **(control or {})),
                 previous=previous)


# ----------------------------------------------------------------------------- all of them

JUDGES = {"gradient_accounting": accounting, "layer_rewinding": rewinding, "layer_retraining": retraining,
          "neuron_flipping": flipping, "example_tied_dropout": tied_dropout}


def judge(experiment, results, **kwargs):
    """The Claims of one experiment's results (a list, possibly empty: a section may have no claim)."""
    fn = JUDGES.get(experiment)
    if fn is None:
        return []
    out = fn(results, **kwargs)
    return out if isinstance(out, list) else [out]


def print_claims(claims):
    for c in claims:
        print(c.line())


# ----------------------------------------------------------------------------- atypical examples (memorized=both)
# The finding of docs/experiments/atypical.md: do atypical clean examples behave like mislabeled ones?
# Judged on neuron_flipping.json of `memorized=both` runs (targets of three kinds: noisy = mislabeled,
# atypical = clean with a hold-out score < 0.5, clean = typical clean).
ATYPICAL = 6
EASIER = 0.5            # A = P(units of an atypical target < units of a typical one) + ties / 2: CI low > 0.5
STATEMENTS[ATYPICAL] = ("Atypical clean examples behave like mislabeled ones: they flip after fewer units than "
                        "typical clean examples, and not detectably more than mislabeled ones")
RULES[ATYPICAL] = (
    f"units to flip (not flipped = max_units), records of kinds noisy (mislabeled), atypical and clean (typical) "
    f"of memorized=both runs. A = P(atypical < typical) + ties/2, B = P(atypical > mislabeled) + ties/2, "
    f"control C = P(mislabeled < typical) + ties/2; CIs: bootstrap over seeds, then examples. yes: A's CI low > "
    f"{EASIER:g} and B's CI low <= {EASIER:g}; partial: A's CI low > {EASIER:g} and B's CI low > {EASIER:g} "
    f"(between typical and mislabeled); no: A's CI high < {EASIER:g}; inconclusive: A's CI straddles {EASIER:g}, "
    f"or the control fails (C's CI low <= {EASIER:g}: the search does not separate mislabeled from typical)")


def superiority(x, y):
    """P(x < y) + P(x = y) / 2 over all pairs (the common-language effect size; from the U statistic)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not len(x) or not len(y):
        return float("nan")
    u, _ = mann_whitney_less(x, y)  # pairs with x > y, ties one half
    return 1 - u / (len(x) * len(y))


def atypical(results):
    """The atypical-vs-mislabeled claim from neuron_flipping.json of memorized=both runs (one per seed)."""
    runs = _runs(results)
    kinds = {k: [flip_counts(r, k) for r in runs] for k in ("noisy", "atypical", "clean")}
    variant = f"unit: {runs[0]['settings'].get('unit', '?')}"
    if any(not sum(map(len, v)) for v in kinds.values()):
        return _claim(ATYPICAL, variant, "needs noisy, atypical and clean targets (memorized=both)", "n/a",
                      "inconclusive", "a kind is missing")
    strata = list(zip(kinds["atypical"], kinds["clean"], kinds["noisy"]))
    stat = {"A": lambda s: superiority(_pooled(s, 0), _pooled(s, 1)),
            "B": lambda s: superiority(_pooled(s, 2), _pooled(s, 0)),  # P(mislabeled < atypical) = P(atyp > misl)
            "C": lambda s: superiority(_pooled(s, 2), _pooled(s, 1))}
    point = {k: f(strata) for k, f in stat.items()}
    ci = {k: bootstrap(strata, f, f"atypical:{variant}:{k}", resample_strata=True) for k, f in stat.items()}
    med = {k: float(np.median(np.concatenate(v))) for k, v in kinds.items()}
    n = {k: int(sum(map(len, v))) for k, v in kinds.items()}
    recs = {k: [x for r in runs for x in r["records"] if x["kind"] == k] for k in kinds}
    cost = {k: _mean([x["accuracy_drop"]["test"] for x in v]) for k, v in recs.items()}
    spread = {k: _mean([len({u["group"] for u in x["units"]}) for x in v]) for k, v in recs.items()}
    statistic = (f"median units mislabeled {med['noisy']:g} / atypical {med['atypical']:g} / typical {med['clean']:g} "
                 f"(n = {n['noisy']}, {n['atypical']}, {n['clean']}); A = P(atypical < typical) {point['A']:.2f}, "
                 f"B = P(atypical > mislabeled) {point['B']:.2f}, control C = P(mislabeled < typical) "
                 f"{point['C']:.2f}; test cost of an edit {100 * cost['noisy']:.2f} / {100 * cost['atypical']:.2f} / "
                 f"{100 * cost['clean']:.2f} points; layer groups per example {spread['noisy']:.1f} / "
                 f"{spread['atypical']:.1f} / {spread['clean']:.1f}")
    ci_text = f"A {_interval(*ci['A'])}; B {_interval(*ci['B'])}; C {_interval(*ci['C'])}"
    (a_lo, a_hi), (b_lo, _), (c_lo, _) = ci["A"], ci["B"], ci["C"]
    if not all(np.isfinite(v) for v in (a_lo, a_hi, b_lo, c_lo)):
        verdict, reason = "inconclusive", "an interval could not be computed"
    elif c_lo <= EASIER:
        verdict, reason = "inconclusive", f"control failed: C's CI low {c_lo:.2f} <= {EASIER:g}"
    elif a_lo > EASIER:
        like = b_lo <= EASIER
        verdict = "yes" if like else "partial"
        reason = (f"atypical need fewer units than typical (A's CI low {a_lo:.2f} > {EASIER:g}); "
                  + ("not detectably more than mislabeled" if like else
                     f"but more than mislabeled (B's CI low {b_lo:.2f} > {EASIER:g})"))
    elif a_hi < EASIER:
        verdict, reason = "no", f"atypical need more units than typical (A's CI high {a_hi:.2f} < {EASIER:g})"
    else:
        verdict, reason = "inconclusive", f"A's CI [{a_lo:.2f}, {a_hi:.2f}] straddles {EASIER:g}"
    return _claim(ATYPICAL, variant, statistic, ci_text, verdict, reason, medians=med, n=n, point=point,
                  intervals={k: list(v) for k, v in ci.items()}, test_cost=cost, groups_per_example=spread,
                  seeds=len(runs))


def _flipping_and_atypical(results, **kwargs):
    """Claim 4, and claim 6 where the records hold atypical targets (memorized=both runs)."""
    out = [flipping(results, **kwargs)]
    if any(r["kind"] == "atypical" for run in _runs(results) for r in run["records"]):
        out.append(atypical(results))
    return out


JUDGES["neuron_flipping"] = _flipping_and_atypical
