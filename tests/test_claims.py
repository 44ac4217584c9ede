"""common/claims.py: each rule on synthetic results just above and just below its thresholds, the
Mann-Whitney p-value on hand-checkable cases, and the bootstrap's determinism."""
import math

import numpy as np
import pytest

from common import claims

# ----------------------------------------------------------------------------- statistics


def test_mann_whitney_exact_small_cases():
    # no ties: U of x = pairs with x > y; p = P(U <= u) over the C(4, 2) = 6 equally likely orderings
    assert claims.mann_whitney_less([1, 2], [3, 4]) == (0.0, pytest.approx(1 / 6))
    assert claims.mann_whitney_less([1, 3], [2, 4]) == (1.0, pytest.approx(2 / 6))   # U = 0 or 1: 2 orderings
    assert claims.mann_whitney_less([3, 4], [1, 2]) == (4.0, pytest.approx(1.0))
    # 4 vs 4 fully separated: 1 / C(8, 4) = 1/70; 5 vs 5: 1/252
    assert claims.mann_whitney_less([1, 2, 3, 4], [5, 6, 7, 8])[1] == pytest.approx(1 / 70)
    assert claims.mann_whitney_less(range(5), range(5, 10))[1] == pytest.approx(1 / 252)


def test_mann_whitney_normal_approximation_with_ties():
    # x = [1, 1, 2], y = [2, 3, 3]: pooled ranks 1.5 1.5 3.5 | 3.5 5.5 5.5 -> R_x = 6.5, U = 6.5 - 6 = 0.5.
    # Ties: three pairs -> sum(t^3 - t) = 18; var = 3*3/12 * (7 - 18/30) = 4.8; mean 4.5;
    # z = (0.5 - 4.5 + 0.5) / sqrt(4.8) = -1.5975 -> p = Phi(z) = 0.0551
    u, p = claims.mann_whitney_less([1, 1, 2], [2, 3, 3])
    assert u == 0.5
    assert p == pytest.approx(0.5 * math.erfc(3.5 / math.sqrt(4.8) / math.sqrt(2)))
    assert p == pytest.approx(0.0551, abs=1e-4)
    assert claims.mann_whitney_less([2, 2], [2, 2])[1] == 1.0  # all equal: no evidence


def test_bootstrap_is_deterministic_and_covers_the_estimate():
    rng = np.random.default_rng(1)
    strata = [(rng.normal(size=50),), (rng.normal(1, size=40),)]
    stat = lambda s: claims._pooled(s).mean()  # noqa: E731
    a = claims.bootstrap(strata, stat, "x", resample_strata=True)
    assert a == claims.bootstrap(strata, stat, "x", resample_strata=True)
    assert a != claims.bootstrap(strata, stat, "y", resample_strata=True)  # each interval its own generator
    est = stat(strata)
    assert a[0] < est < a[1]
    narrow = claims.bootstrap(strata, stat, "x")  # seeds fixed: only examples vary
    assert narrow[1] - narrow[0] < a[1] - a[0]


# ----------------------------------------------------------------------------- claim 1

def _accounting(factor=3.0, negative=5, control_cos=0.3, groups=("a", "b", "c"), bad=()):
    """One seed, a memorization phase of 5 epochs; norm(noisy)/norm(control) = factor in every epoch
    (in the groups listed in `bad`: 1.5); cosine(rest, noisy) < 0 in `negative` of the 5 epochs."""
    epochs = []
    for e in range(1, 6):
        g = {name: {"norm_clean_rest": 10.0, "norm_noisy": 10.0 * (1.5 if name in bad else factor) * 0.1,
                    "norm_control": 1.0, "cosine_rest_noisy": -0.5 if e <= negative else 0.2,
                    "cosine_control_rest": control_cos} for name in groups}
        epochs.append({"epoch": e, "groups": g})
    return {"groups": list(groups), "memorization_phase": {"epochs": [1, 2, 3, 4, 5]}, "epochs": epochs}


def test_claim1_previous_rule():
    """The previous rule (random control only), still computed beside the new one."""
    assert claims.accounting(_accounting(factor=2.05)).previous == "yes"
    assert claims.accounting(_accounting(factor=1.95)).previous == "no"             # factor CI low <= 2
    assert claims.accounting(_accounting(negative=4)).previous == "yes"             # 80% of the epochs
    assert claims.accounting(_accounting(negative=3)).previous == "no"              # 60%
    assert claims.accounting(_accounting(control_cos=0.01)).previous == "yes"
    assert claims.accounting(_accounting(control_cos=-0.01)).previous == "inconclusive"  # control fails
    assert claims.accounting(_accounting(bad=("c",))).previous == "partial"         # 2 of 3 groups
    assert claims.accounting(_accounting(bad=("b", "c"))).previous == "no"          # 1 of 3
    c = claims.accounting([_accounting(), _accounting(factor=4.0)])                 # two seeds
    assert c.values["groups"]["a"]["factor"] == pytest.approx(math.sqrt(12))      # geometric mean
    lo, hi = c.values["groups"]["a"]["ci"]
    assert 3.0 - 1e-9 <= lo < hi <= 4.0 + 1e-9
    no_control = _accounting()
    for t in no_control["epochs"]:
        for g in t["groups"].values():
            del g["norm_control"]
    assert claims.accounting(no_control).verdict == claims.accounting(no_control).previous == "inconclusive"


# ----------------------------------------------------------------------------- claim 2

GROUPS = ["g1", "g2", "g3", "g4", "g5", "g6"]  # last third: g5, g6


def _rewinding(noisy, clean=None, final_noisy=1.0, modes=("final", "recompute")):
    clean = clean or {}
    acc = {g: {"0": {"noisy": noisy.get(g, 0.9), "clean": clean.get(g, 1.0), "noisy_true": 0.0, "test": 0.9},
               "5": {"noisy": 1.0, "clean": 1.0, "noisy_true": 0.0, "test": 0.9}} for g in GROUPS}
    return {"groups": GROUPS, "rewind_epochs": [0, 5],
            "final": {"clean": 1.0, "noisy": final_noisy, "noisy_true": 0.0, "test": 0.9},
            "bn_modes": {m: {"accuracy": acc} for m in modes}}


def test_claim2_thresholds_and_modes():
    out = claims.rewinding(_rewinding({"g2": 0.49}))
    assert [c.values["mode"] for c in out] == ["final", "recompute"]   # the authors' mode first
    assert out[0].verdict == "yes" and out[0].values["classes"]["g2"] == "memorization"
    assert claims.rewinding(_rewinding({"g2": 0.51}))[0].verdict == "partial"   # nothing critical: (b) fails
    # clean accuracy 0.9 of the final model's: still critical for memorization; 0.89: critical for everything
    assert claims.rewinding(_rewinding({"g2": 0.4}, {"g2": 0.9}))[0].verdict == "yes"
    c = claims.rewinding(_rewinding({"g2": 0.4}, {"g2": 0.89}))[0]
    assert c.verdict == "partial" and c.values["classes"]["g2"] == "everything"
    # memorization-critical groups all in the last third -> partial; one earlier -> yes
    assert claims.rewinding(_rewinding({"g5": 0.1, "g6": 0.1}))[0].verdict == "partial"
    assert claims.rewinding(_rewinding({"g4": 0.1, "g6": 0.1}))[0].verdict == "yes"
    # a majority must be redundant: 3 of 6 critical -> partial (b only); and neither -> no
    assert claims.rewinding(_rewinding({"g1": 0.1, "g2": 0.1, "g3": 0.1}))[0].verdict == "partial"
    assert claims.rewinding(_rewinding({"g1": 0.1, "g2": 0.1, "g3": 0.1, "g4": 0.1}, {"g1": 0.5, "g2": 0.5,
                                       "g3": 0.5, "g4": 0.5}))[0].verdict == "no"
    assert claims.rewinding(_rewinding({"g2": 0.4}, final_noisy=0.89))[0].verdict == "inconclusive"
    # seeds: classes from the mean; the CI of the redundant share from a bootstrap over seeds
    two = claims.rewinding([_rewinding({"g2": 0.2}), _rewinding({"g2": 0.7})])[0]
    assert two.values["classes"]["g2"] == "memorization" and two.ci.endswith("(redundant share)")


# ----------------------------------------------------------------------------- claim 3

def _retraining(pairs, control=None, final_noisy=1.0, ablation=None):
    """pairs: {group: (noisy after reset, noisy after retraining)}; control: {group: noisy after the
    retraining on all examples} (default 1.0)."""
    control = control or {}

    def groups(p):
        return {g: {"reset": {"noisy": r}, "final": {"noisy": f},
                    "curve": [{"epoch": 0, "noisy": r}, {"epoch": 1, "noisy": f}],
                    "control": {"final": {"noisy": control.get(g, 1.0)}}} for g, (r, f) in p.items()}
    return {"groups": groups(pairs), "final_model": {"noisy": final_noisy}, "frozen_bn": "train",
            "ablation": {"frozen_bn": "eval", "groups": groups(ablation)} if ablation else None}


def test_claim3_previous_rule():
    """The previous rule (kept + back over the conclusive groups), still computed beside the new one."""
    assert claims.classify_retrained(0.5, 0.5) == "kept"
    assert claims.classify_retrained(0.49, 0.5) == "back"
    assert claims.classify_retrained(0.49, 0.49) == "not back"
    assert claims.classify_retrained(0.5, 0.49) == "erased"
    lost = (0.1, 0.1)
    # 3 groups: kept + back 2/3 -> yes; 1/3 -> partial (>= a third); 0 -> no
    assert claims.retraining(_retraining({"a": (0.1, 0.5), "b": (0.6, 0.6), "c": lost}))[0].previous == "yes"
    assert claims.retraining(_retraining({"a": (0.1, 0.49), "b": (0.6, 0.6), "c": lost}))[0].previous == "partial"
    assert claims.retraining(_retraining({"a": (0.1, 0.49), "b": (0.6, 0.49), "c": lost}))[0].previous == "no"
    # 4 groups, 2 kept + 2 lost: exactly half is not a majority
    c = claims.retraining(_retraining({"a": (0.6, 0.6), "b": (0.6, 0.6), "c": lost, "d": lost}))[0]
    assert c.previous == "partial" and "no group lost" not in c.statistic
    # the positive control: 0.9 passes, 0.89 makes the group inconclusive (not evidence either way)
    p = {"a": (0.1, 0.6), "b": (0.1, 0.6), "c": lost}
    assert claims.retraining(_retraining(p, control={"c": 0.9}))[0].previous == "yes"
    c = claims.retraining(_retraining(p, control={"c": 0.89}))[0]
    old = c.values["previous_values"]
    assert old["classes"]["c"] == "inconclusive" and old["share"] == 1.0 and c.previous == "yes"
    assert claims.retraining(_retraining(p, control={"a": 0.5, "b": 0.5}))[0].previous == "inconclusive"
    assert claims.retraining(_retraining(p, final_noisy=0.5))[0].previous == "inconclusive"
    # a control that ran for some seeds only is judged on those seeds
    no_control = _retraining(p)
    for g in no_control["groups"].values():
        g["control"] = None
    c = claims.retraining([_retraining(p, control={"c": 0.89}), no_control])[0]
    assert c.values["classes"]["c"] == "inconclusive" and c.values["control_seeds"] == 1
    assert "control from 1 of 2 seeds" in c.statistic
    assert claims.retraining(no_control)[0].verdict == "inconclusive"
    # nothing lost at the reset: said in the statistic
    assert "no group lost" in claims.retraining(_retraining({"a": (0.6, 0.6), "b": (0.7, 0.7)}))[0].statistic
    # the ablation is its own row
    out = claims.retraining(_retraining(p, ablation={"a": lost, "b": lost, "c": lost}))
    assert [c.previous for c in out] == ["yes", "no"] and "eval" in out[1].variant


# ----------------------------------------------------------------------------- claim 4

def _flipping(noisy, clean, noisy_cost=0.0, max_units=100, unit="channel"):
    recs = [{"index": i, "kind": "noisy", "n_units": n, "flipped": n < max_units, "units": [{"group": "g1"}] * n,
             "accuracy_drop": {"test": noisy_cost}} for i, n in enumerate(noisy)]
    recs += [{"index": 1000 + i, "kind": "clean", "n_units": n, "flipped": n < max_units,
              "units": [{"group": "g2"}] * n, "accuracy_drop": {"test": 0.05}} for i, n in enumerate(clean)]
    return {"settings": {"unit": unit, "max_units": max_units}, "records": recs}


def test_claim4_previous_rule():
    """The previous rule (ratio of medians), still computed beside the new one."""
    noisy, clean = list(range(1, 21)), list(range(40, 60))   # medians 10.5 and 49.5
    assert claims.flipping(_flipping(noisy, clean)).previous == "yes"
    assert claims.flipping(_flipping(noisy, clean, noisy_cost=0.0099)).previous == "yes"
    assert claims.flipping(_flipping(noisy, clean, noisy_cost=0.0101)).previous == "partial"   # >= 1 test point
    # median ratio exactly 2 (CI degenerate at 2 > 1) vs 1.9; significant in both
    assert claims.flipping(_flipping([5] * 30, [10] * 30)).previous == "yes"
    c = claims.flipping(_flipping([10] * 30, [19] * 30))
    assert c.previous == "partial" and c.values["p"] < claims.ALPHA
    # p just above / below 0.01 (exact test): 4 vs 4 separated p = 1/70; 5 vs 5 p = 1/252
    assert claims.flipping(_flipping([1, 2, 3, 4], [5, 6, 7, 8])).previous == "no"
    assert claims.flipping(_flipping([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])).previous == "yes"
    # not flipped counts as max_units (a lower bound), and is said
    c = claims.flipping(_flipping([1, 2, 3], [100, 100, 100], max_units=100, unit="channel_out"))
    assert c.values["not_flipped"] == 3 and "not flipped" in c.statistic and c.variant == "unit: channel_out"
    assert (claims.flip_counts(_flipping([1], [100]), "clean") == [100]).all()


# ----------------------------------------------------------------------------- claim 5

def _etd(noisy_correct, plain, drop, tied=1.0, std_noisy=0.01, control=(0.5, 0.5)):
    """A result with one drop scaling; `control`: the negative control's (noisy, test) accuracy, every
    example at that fraction of draws (None: no control in the results, as in earlier files)."""
    r = {"etd": {"modes": {"tied": {"noisy": tied}, "drop": {"noisy": float(np.mean(noisy_correct))}}},
         "plain_test": float(np.mean(plain)),
         "table": [{"model": "no dropout (20 epochs)", "noisy": 0.99, "test": float(np.mean(plain))},
                   {"model": "standard dropout p=0.4", "noisy": std_noisy, "test": 0.96},
                   {"model": "standard dropout p=0.4, BN re-estimated", "noisy": 0.0, "test": 0.97}],
         "per_example": {"noisy_drop_correct": list(noisy_correct),
                         "test_correct": {"plain": list(plain), "drop": list(drop)}}}
    if control is not None:
        r["per_example"]["negative_control"] = {s: {"noisy_correct": [control[0]] * len(noisy_correct),
                                                    "test_correct": [control[1]] * len(plain)}
                                                for s in claims.DROP_VARIANTS}
    return r


def test_claim5_thresholds(monkeypatch):
    rng = np.random.default_rng(0)
    noisy = (rng.random(500) < 0.02).astype(int).tolist()
    plain = (rng.random(1000) < 0.97).astype(int)
    drop = plain.copy()
    drop[:3] = 0  # 0.3 point lower (where plain was right)
    runs = [_etd(noisy, plain.tolist(), drop.tolist()), _etd(noisy[::-1], plain.tolist(), drop.tolist())]
    c, = claims.tied_dropout(runs)  # an earlier file: one drop scaling, named by its config (no config: unscaled)
    assert c.verdict == "yes" and c.values["seeds"] == 2 and c.variant == "drop: not rescaled"
    assert c.previous == "yes" and c.values["previous_rule"] == claims.RULE5_PREVIOUS
    # the previous rule (one-level noisy CI, no undecided band), at its own CI's ends
    p_hi = c.values["previous_noisy_ci"][1]
    d_lo = c.values["test_diff_ci"][0]
    assert p_hi < 0.05 and d_lo > -0.01
    monkeypatch.setattr(claims, "DROPPED", p_hi - 1e-9)      # the CI's high end just above the threshold
    assert claims.tied_dropout(runs)[0].previous == "partial"
    monkeypatch.setattr(claims, "DROPPED", p_hi)             # at it: <= holds
    assert claims.tied_dropout(runs)[0].previous == "yes"
    monkeypatch.setattr(claims, "TEST_MARGIN", -d_lo - 1e-9)  # the CI's low end just below -margin
    assert claims.tied_dropout(runs)[0].previous == "partial"
    monkeypatch.setattr(claims, "DROPPED", p_hi - 1e-9)
    assert claims.tied_dropout(runs)[0].previous == "no"          # neither holds
    monkeypatch.setattr(claims, "TEST_MARGIN", -d_lo)
    assert claims.tied_dropout(runs)[0].previous == "partial"     # test kept again, noisy still above
    monkeypatch.setattr(claims, "DROPPED", p_hi)
    assert claims.tied_dropout(runs)[0].previous == "yes"
    monkeypatch.undo()
    # the rule now: a CI that straddles its threshold leaves the verdict undecided (inconclusive)
    (n_lo, n_hi), (d_lo, d_hi) = c.values["noisy_ci"], c.values["test_diff_ci"]
    assert n_lo < n_hi and d_lo < d_hi
    monkeypatch.setattr(claims, "DROPPED", n_hi - 1e-9)      # straddled
    c2, = claims.tied_dropout(runs)
    assert c2.verdict == "inconclusive" and "undecided" in c2.reason and "at 2 seeds" in c2.reason
    monkeypatch.setattr(claims, "DROPPED", n_lo - 1e-9)      # the whole CI above: not removed, test kept
    assert claims.tied_dropout(runs)[0].verdict == "partial"
    monkeypatch.setattr(claims, "TEST_MARGIN", -d_hi - 1e-9)  # the whole test CI below -margin: not kept either
    assert claims.tied_dropout(runs)[0].verdict == "no"
    monkeypatch.setattr(claims, "TEST_MARGIN", -d_lo - 1e-9)  # straddled
    assert claims.tied_dropout(runs)[0].verdict == "inconclusive"
    monkeypatch.setattr(claims, "DROPPED", n_hi)             # removed; test straddled: yes or partial, undecided
    assert claims.tied_dropout(runs)[0].verdict == "inconclusive"
    monkeypatch.setattr(claims, "TEST_MARGIN", -d_lo)
    assert claims.tied_dropout(runs)[0].verdict == "yes"
    monkeypatch.undo()
    # the controls: the ETD model must have memorized (tied mode >= 90%) ...
    assert claims.tied_dropout(_etd(noisy, plain, drop, tied=0.9))[0].verdict == "yes"
    assert claims.tied_dropout(_etd(noisy, plain, drop, tied=0.89))[0].verdict == "inconclusive"
    assert claims.tied_dropout(_etd(noisy, plain, drop, tied=0.89))[0].previous == "inconclusive"
    # ... and random channels dropped from the plain model must not meet the rule too (negative control)
    assert claims.tied_dropout(_etd(noisy, plain, drop, control=(0.06, 0.97)))[0].verdict == "yes"  # not removed
    assert claims.tied_dropout(_etd(noisy, plain, drop, control=(0.0, 0.9)))[0].verdict == "yes"    # test lost
    same = claims.tied_dropout(_etd(noisy, plain, drop, control=(0.0, 1.0)))[0]  # removes it, keeps test
    assert same.verdict == "inconclusive" and "negative control" in same.reason and same.previous == "yes"
    assert same.values["control_meets"] and same.values["control_noisy"] == 0.0
    assert same.values["control_test_diff"] == pytest.approx(1.0 - np.mean(plain))
    no_control = claims.tied_dropout(_etd(noisy, plain, drop, control=None))[0]
    assert no_control.verdict == "inconclusive" and "no negative control" in no_control.reason
    assert no_control.previous == "yes"
    # the noisy CI resamples seeds, then examples: two seeds far apart widen it; the previous one did not
    far = claims.tied_dropout([_etd([0] * 500, plain, drop), _etd([1] * 25 + [0] * 475, plain, drop)])[0]
    lo, hi = far.values["noisy_ci"]
    p_lo, p_hi = far.values["previous_noisy_ci"]
    assert lo == 0.0 < p_lo and hi > 0.05 > p_hi  # a resample of seed 0 twice holds no noisy example at all
    # standard dropout in words, either way
    assert "keeps the network from memorizing" in claims.tied_dropout(runs)[0].values["standard_dropout"]
    assert "memorizes the noisy labels" in claims.tied_dropout(_etd(noisy, plain, drop, std_noisy=0.8)
                                                                )[0].values["standard_dropout"]


def _etd_both(rescaled, unscaled, plain, tied=1.0):
    """A result with the drop evaluated both ways: (noisy_drop_correct, test_correct) per scaling."""
    r = _etd(unscaled[0], plain, unscaled[1], tied=tied)
    r["config"] = {"drop_rescale": True}  # the earlier keys hold the knob's scaling
    r["etd"]["drop_scalings"] = {s: {"accuracy": {"noisy": float(np.mean(n))}}
                                 for s, (n, _) in (("rescaled", rescaled), ("unscaled", unscaled))}
    r["per_example"] = {"test_correct": {"plain": list(plain), "drop": list(rescaled[1])},
                        "noisy_drop_correct": list(rescaled[0]),
                        "drop_scalings": {s: {"noisy_drop_correct": list(n), "test_correct": list(t)}
                                          for s, (n, t) in (("rescaled", rescaled), ("unscaled", unscaled))},
                        "negative_control": r["per_example"]["negative_control"]}
    return r


def test_claim5_both_scalings_same_rule(monkeypatch):
    """One row per drop scaling, the authors' first, each judged by the same thresholds on its own data."""
    rng = np.random.default_rng(1)
    plain = (rng.random(1000) < 0.97).astype(int)
    low = (rng.random(500) < 0.02).astype(int)               # ~2% noisy after the drop: removed
    high = (rng.random(500) < 0.08).astype(int)              # ~8%: not removed
    kept, lost = plain.copy(), plain.copy()
    kept[:3] = 0                                             # -0.3 point: test accuracy kept
    lost[:60] = 0                                            # about -6 points: not kept
    runs = [_etd_both((low, lost), (high, kept), plain), _etd_both((low[::-1], lost), (high[::-1], kept), plain)]
    rescaled, unscaled = claims.tied_dropout(runs)
    assert (rescaled.variant, unscaled.variant) == ("drop: rescaled (authors)", "drop: not rescaled")
    assert (rescaled.previous, unscaled.previous) == ("partial", "partial")
    assert (rescaled.values["scaling"], unscaled.values["scaling"]) == ("rescaled", "unscaled")
    assert rescaled.verdict == "partial" and "noisy CI high <=" in rescaled.reason and "test CI low <" in rescaled.reason
    assert unscaled.verdict == "partial" and "noisy CI high >" in unscaled.reason and "test CI low >=" in unscaled.reason
    assert rescaled.values["noisy_after_drop"] == pytest.approx(low.mean())
    assert unscaled.values["noisy_after_drop"] == pytest.approx(high.mean())
    # the same thresholds move both rows: at each row's own CI ends
    n_hi, d_lo = unscaled.values["noisy_ci"][1], unscaled.values["test_diff_ci"][0]
    r_hi, r_lo = rescaled.values["noisy_ci"][1], rescaled.values["test_diff_ci"][0]
    assert r_hi <= 0.05 < n_hi and r_lo < -0.01 <= d_lo
    monkeypatch.setattr(claims, "DROPPED", n_hi)             # both remove now; the unscaled row keeps test too
    assert [c.verdict for c in claims.tied_dropout(runs)] == ["partial", "yes"]
    monkeypatch.setattr(claims, "TEST_MARGIN", -r_lo)        # at the rescaled row's test CI low: >= holds
    assert [c.verdict for c in claims.tied_dropout(runs)] == ["yes", "yes"]
    monkeypatch.setattr(claims, "TEST_MARGIN", -r_lo - 1e-9)  # the rescaled row's test CI straddles the margin
    assert [c.verdict for c in claims.tied_dropout(runs)] == ["inconclusive", "yes"]   # (previous rule: partial)
    monkeypatch.setattr(claims, "DROPPED", n_hi - 1e-9)      # and the unscaled row's noisy CI straddles DROPPED
    assert [c.verdict for c in claims.tied_dropout(runs)] == ["inconclusive", "inconclusive"]
    monkeypatch.undo()
    # the control (the same tied-mode model) applies to both rows
    assert [c.verdict for c in claims.tied_dropout([_etd_both((low, kept), (high, kept), plain, tied=0.89)])] \
        == ["inconclusive", "inconclusive"]
    # each row's standard-dropout words name its own scaling's drop
    assert "after the drop, rescaled (authors)" in rescaled.values["standard_dropout"]
    assert "after the drop, not rescaled" in unscaled.values["standard_dropout"]
    # an earlier file with drop_rescale=True: its one scaling is the rescaled one; seeds holding different
    # scalings judge the scalings common to all of them
    old = _etd(low, plain, kept)
    old["config"] = {"drop_rescale": True}
    assert [c.variant for c in claims.tied_dropout(old)] == ["drop: rescaled (authors)"]
    assert [c.variant for c in claims.tied_dropout([runs[0], old])] == ["drop: rescaled (authors)"]
    assert claims.tied_dropout([_etd(low, plain, kept), old])[0].verdict == "inconclusive"
    no_per_example = {k: v for k, v in runs[0].items() if k != "per_example"}
    assert [c.verdict for c in claims.tied_dropout(no_per_example)] == ["inconclusive", "inconclusive"]


def test_every_claim_has_a_rule_and_prints_it():
    c, = claims.tied_dropout(_etd([0] * 50, [1] * 50, [1] * 50))
    line = c.line()
    assert c.rule in line and "YES" in line
    assert set(claims.RULES) == set(claims.STATEMENTS) == {1, 2, 3, 4, 5, claims.ATYPICAL}
    assert claims.judge("localization_methods", {}) == []   # a section without a claim


# ----------------------------------------------------------------------------- this release's rules

def test_hodges_lehmann_and_rank_biserial_by_hand():
    # clean [2, 3] vs noisy [1, 2]: differences 2-1=1, 2-2=0, 3-1=2, 3-2=1 -> sorted 0 1 1 2, median 1;
    # pairs clean > noisy 3, < 0, tied 1 -> rank-biserial (3 - 0) / 4
    assert claims.hodges_lehmann([1, 2], [2, 3]) == 1.0
    assert claims.rank_biserial([1, 2], [2, 3]) == 0.75
    # odd number of pairs: [1, 2, 4] vs [3]: differences 2, 1, -1 -> median 1; 2 greater, 1 less -> 1/3
    assert claims.hodges_lehmann([1, 2, 4], [3]) == 1.0
    assert claims.rank_biserial([1, 2, 4], [3]) == pytest.approx(1 / 3)
    assert claims.rank_biserial([3, 4], [1, 2]) == -1.0 and claims.hodges_lehmann([3, 4], [1, 2]) == -2.0
    # against the definitions by brute force, and against Mann-Whitney's U: r = 2 U_clean / (n1 n2) - 1
    rng = np.random.default_rng(0)
    x, y = rng.integers(1, 8, 37), rng.integers(2, 12, 23)
    d = (y[:, None] - x[None, :]).ravel()
    assert claims.hodges_lehmann(x, y) == np.median(d)
    assert claims.rank_biserial(x, y) == pytest.approx(((d > 0).sum() - (d < 0).sum()) / d.size)
    u_clean, _ = claims.mann_whitney_less(y, x)
    assert claims.rank_biserial(x, y) == pytest.approx(2 * u_clean / d.size - 1)


def test_side_and_settle():
    assert claims.side((2.1, 3.0), 2) is True and claims.side((1.0, 1.9), 2) is False
    assert claims.side((1.9, 2.1), 2) is None                       # contains the threshold
    assert claims.side((2.0, 3.0), 2) is None and claims.side((2.0, 3.0), 2, strict=False) is True
    assert claims.side((0.0, 0.009), 0.01, above=False) is True and claims.side((0.005, 0.02), 0.01, above=False) is None
    assert claims.side((float("-inf"), 0.4), 0.5) is False and claims.side((float("-inf"), 0.6), 0.5) is None
    assert claims.side((float("nan"), float("nan")), 0.5) is None
    assert claims.side(None, 0.5, point=0.6) is True              # one seed: the point estimate decides
    rule = lambda t: "yes" if all(t.values()) else "partial" if any(t.values()) else "no"  # noqa: E731
    assert claims.settle(rule, {"a": True, "b": None}) == ("inconclusive", ["b"])
    assert claims.settle(rule, {"a": True, "b": True}) == ("yes", [])
    assert claims.settle(lambda t: "no" if not t["a"] else "yes" if t["b"] else "partial",
                         {"a": False, "b": None}) == ("no", [])     # settled by the other condition


def test_bootstrap_counts_undefined_resamples_and_ranks_them_lowest():
    values = np.array([0.0, 1.0, 1.0, 1.0])
    # statistic undefined when the resample holds no 0: P = (3/4)^4 = 32% of the resamples
    stat = lambda s: np.nan if not (s[0][0] == 0).any() else s[0][0].mean()  # noqa: E731
    iv = claims.bootstrap([(values,)], stat, "undefined")
    assert 500 < iv.undefined < 800 and iv[0] == -np.inf and np.isfinite(iv[1])
    assert claims._interval(*iv).startswith("[undefined, ")
    few = claims.bootstrap([(np.array([0.0] * 30 + [1.0]),)], lambda s: np.nan if s[0][0].all() else 1.0, "few")
    assert few.undefined == 0 and tuple(few) == (1.0, 1.0)
    assert claims.bootstrap([(values,)], lambda s: s[0][0].mean(), "none").undefined == 0


def _matched(e, factor=3.0, noisy=1.0, matched_loss=0.95):
    """An epoch of _accounting's with a loss-matched control: norm(noisy)/norm(matched) = factor."""
    for g in e["groups"].values():
        g["norm_matched"] = g["norm_noisy"] / factor
    e["matching"] = {"loss_noisy": noisy, "loss_matched": matched_loss * noisy}
    return e


def _accounting_matched(factor=3.0, matched_loss=0.95, seeds=1, **kw):
    runs = []
    for _ in range(seeds):
        r = _accounting(**kw)
        r["epochs"] = [_matched(e, factor, matched_loss=matched_loss) for e in r["epochs"]]
        runs.append(r)
    return runs


def test_claim1_loss_matched_control():
    c = claims.accounting(_accounting_matched())
    assert c.verdict == "yes" and c.previous == "yes" and c.values["previous_rule"] == claims.PREVIOUS_RULES[1]
    assert c.values["groups"]["a"]["matched_factor"] == pytest.approx(3.0)
    assert "loss-matched factor 3.00" in c.statistic and "norm(noisy)/norm(clean)" in c.statistic
    # noisy no larger than equally hard clean examples: every group fails (ii) -> no, whatever the old rule says
    c = claims.accounting(_accounting_matched(factor=0.9))
    assert c.verdict == "no" and c.previous == "yes"
    assert claims.accounting(_accounting_matched(factor=1.05)).verdict == "yes"
    # the control easier than the noisy examples (89% of their loss): its passes are not trusted
    c = claims.accounting(_accounting_matched(matched_loss=0.89))
    assert c.verdict == "inconclusive" and "not trusted" in c.reason and "inconclusive at 1 seed" in c.reason
    assert claims.accounting(_accounting_matched(factor=0.9, matched_loss=0.89)).verdict == "no"  # a fail stands
    # no loss-matched control in the results: not settled
    assert claims.accounting(_accounting(factor=3.0)).verdict == "inconclusive"
    # the cosine share's CI: 3 of 5 epochs -> CI contains 80% -> not settled; with the factor failing anyway -> no
    assert claims.accounting(_accounting_matched(negative=3)).verdict == "inconclusive"
    assert claims.accounting(_accounting_matched(negative=3, factor=0.9)).verdict == "no"
    # a factor CI containing 2 over seeds: inconclusive at 2 seeds
    two = _accounting_matched(factor=3.0) + _accounting_matched(factor=3.0, bad=("a", "b", "c"))
    for e in two[1]["epochs"]:
        for g in e["groups"].values():
            g["norm_noisy"] = 10.0 * 3.0 * 0.1 if e["epoch"] % 2 else 10.0 * 1.5 * 0.1
    c = claims.accounting(two)
    lo, hi = c.values["groups"]["a"]["ci"]
    assert lo < claims.FACTOR < hi and c.verdict == "inconclusive" and "at 2 seeds" in c.reason


def test_claim2_inconclusive_at_n_seeds():
    # 3 of 6 redundant in one seed, 4 of 6 in the other (and in their mean: g3 at 50% noisy is redundant):
    # the redundant share's CI over seeds, [1/2, 2/3], contains 1/2
    a = _rewinding({"g1": 0.1, "g2": 0.1, "g3": 0.1})
    b = _rewinding({"g1": 0.1, "g2": 0.1})
    c = claims.rewinding([a, b])[0]
    assert c.values["redundant_share"] == pytest.approx(4 / 6)
    assert c.previous == "yes" and c.verdict == "inconclusive" and "at 2 seeds" in c.reason
    assert claims.rewinding([b, b])[0].verdict == claims.rewinding([b, b])[0].previous == "yes"
    one = claims.rewinding(_rewinding({"g2": 0.49}))[0]
    assert one.verdict == one.previous == "yes" and one.values["previous_rule"] == claims.PREVIOUS_RULES[2]


def test_claim3_uninformative_groups_and_the_share():
    lost = (0.1, 0.1)
    assert claims.classify_informative(0.5, 0.1) == "uninformative" == claims.classify_informative(0.5, 0.9)
    assert claims.classify_informative(0.49, 0.5) == "back" and claims.classify_informative(0.49, 0.49) == "not back"
    # b: the reset left it memorized -> uninformative, not "kept": share = back / (back + not back) = 1/2
    c = claims.retraining(_retraining({"a": (0.1, 0.5), "b": (0.6, 0.6), "c": lost}))[0]
    assert c.values["classes"] == {"a": "back", "b": "uninformative", "c": "not back"} and c.values["share"] == 0.5
    assert c.verdict == "partial" and c.previous == "yes"
    assert claims.retraining(_retraining({"a": (0.1, 0.5), "b": (0.1, 0.6), "c": lost}))[0].verdict == "yes"
    assert claims.retraining(_retraining({"a": (0.1, 0.4), "b": (0.6, 0.6), "c": lost}))[0].verdict == "no"
    # nothing lost at the reset: the share is undefined -> inconclusive (the previous rule said yes)
    c = claims.retraining(_retraining({"a": (0.6, 0.6), "b": (0.7, 0.7)}))[0]
    assert c.verdict == "inconclusive" and c.previous == "yes" and "no group lost" in c.statistic
    # an uninformative group needs no control; a failed control in more than half the groups: inconclusive
    c = claims.retraining(_retraining({"a": (0.1, 0.6), "b": (0.6, 0.6), "c": lost}, control={"b": 0.5}))[0]
    assert c.values["classes"]["b"] == "uninformative" and c.verdict == "partial"
    assert claims.retraining(_retraining({"a": (0.1, 0.6), "b": (0.1, 0.6), "c": lost},
                                         control={"a": 0.5, "b": 0.5}))[0].verdict == "inconclusive"
    # over seeds: resamples without an informative group are counted, reported and ranked lowest
    # (a lost memorization in the first seed and in the mean, 45%; a resample of the second seed alone has
    # no such group: a quarter of the resamples)
    runs = [_retraining({"a": (0.1, 0.6), "b": (0.6, 0.6)}), _retraining({"a": (0.8, 0.6), "b": (0.6, 0.6)})]
    c = claims.retraining(runs)[0]
    n = c.values["undefined_resamples"]
    assert 300 < n < 700 and f"{n} of {claims.RESAMPLES} resamples" in c.ci and c.values["share_ci"][0] == -np.inf
    assert c.values["share"] == 1.0 and c.verdict == "inconclusive" and "at 2 seeds" in c.reason


def _flipping_matched(noisy, clean, matched, noisy_cost=0.0, max_units=100):
    r = _flipping(noisy, clean, noisy_cost, max_units)
    r["records"] += [{"index": 2000 + i, "kind": "clean_matched", "n_units": n, "flipped": n < max_units,
                      "units": [{"group": "g2"}] * n, "accuracy_drop": {"test": 0.05}, "margin": 0.1}
                     for i, n in enumerate(matched)]
    return r


def test_claim4_continuous_effects_and_the_margin_matched_control():
    noisy, clean = list(range(1, 21)), list(range(40, 60))
    c = claims.flipping(_flipping_matched(noisy, clean, clean))
    assert c.verdict == "yes" and c.previous == "yes" and c.values["previous_rule"] == claims.PREVIOUS_RULES[4]
    e = c.values["clean"]
    assert e["hl_shift"] == 39.0 and e["rank_biserial"] == 1.0 and e["mean_ratio"] == pytest.approx(49.5 / 10.5)
    assert e["hl_shift_ci"][0] <= 39.0 <= e["hl_shift_ci"][1] and e["mean_ratio_ci"][0] > 2
    # margin-matched clean targets flip as easily as the noisy ones: the effect does not survive -> no
    c = claims.flipping(_flipping_matched(noisy, clean, noisy))
    assert c.verdict == "no" and c.previous == "yes" and c.values["matched"]["rank_biserial"] == 0.0
    # significant against the matched targets but a ratio of means < 2 (CI wholly below): partial
    c = claims.flipping(_flipping_matched(noisy * 3, clean, [n + 6 for n in noisy] * 3))
    assert c.values["matched"]["p"] < claims.ALPHA and c.values["matched"]["mean_ratio_ci"][1] < claims.MEAN_RATIO
    assert c.verdict == "partial"
    # no margin-matched targets in the results: not settled
    c = claims.flipping(_flipping(noisy, clean))
    assert c.verdict == "inconclusive" and "no margin-matched" in c.statistic
    # a ratio of means whose CI contains 2 (the median ratio's previous rule saw a clear 2.0): inconclusive
    c = claims.flipping(_flipping_matched([1] * 15 + [3] * 15, [2] * 15 + [6] * 15, [2] * 15 + [6] * 15))
    lo, hi = c.values["clean"]["mean_ratio_ci"]
    assert lo < claims.MEAN_RATIO <= hi and c.verdict == "inconclusive" and "at 1 seed" in c.reason
    # the test cost's CI: wholly above 1 point -> partial
    assert claims.flipping(_flipping_matched(noisy, clean, clean, noisy_cost=0.02)).verdict == "partial"


def test_previous_verdict_in_the_line_and_the_dict():
    c = claims.flipping(_flipping_matched(list(range(1, 21)), list(range(40, 60)), list(range(1, 21))))
    assert "NO (previous rule: yes)" in c.line()
    d = c.as_dict()
    assert d["previous"] == "yes" and d["values"]["previous_rule"] == claims.PREVIOUS_RULES[4]
