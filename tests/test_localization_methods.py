"""localization_methods.py: every method's ranking, a hand-built model with a known answer, the stopping
rule of the learned masks, ZeroOut, the ETD ground truth against the masks a model trained with, its
baselines and oracle on a hand-built ETD model, and the script end to end on the tiny run."""
import copy
import json
import math
import shutil
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import localization_methods
from conftest import REPO
from common import dropout
from common.cli import UserError
from common.evaluation import predict
from common.flipping import Units, flip_sequential, objective, pick_targets, reference_batch
from common.localization import (MASKS, METHODS, ORACLE, ActivationProbe, ChannelUnits, Localizer, PinnedMask,
                                 Plateau, average_precision,
                                 ig_scores, label_probability, mask_scores, oracle_ranking, pin_tied, report_section,
                                 tied_channels, topk_predictions, zeroout_scores)
from common.rng import generator
from common.runs import sole_writer
from common.models import Net, model_for
from common.training import make_optimizer, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: many tiny kernels


OPTIONS = dict(max_k=6, ig_steps=2, mask_max_steps=20, mask_window=5, mask_tol=0.01, hc_lr=0.1, slim_lr=0.02,
               penalties={"hardconcrete": 0.01, "slimming": 0.01, "keep_hc": 1.0, "keep_slim": 1.0})


def batch(data, index, size=7):
    idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, size, 0)])
    return idx, data.batch(idx), data.labels(idx)


def first_noisy(model, data):
    return next(i for i, kind in pick_targets(data, predict(model, data, "train") == data.y_train, 1, 0)
                if kind == "noisy")


def test_every_ranking_is_a_seeded_permutation(tiny_trained):
    cfg, model, data, run = tiny_trained
    model.eval()
    units = Units(model, "channel")
    index = first_noisy(model, data)
    _, x, y = batch(data, index)
    a, b, other = Localizer(model, units, 0, **OPTIONS), Localizer(model, units, 0, **OPTIONS), \
        Localizer(model, units, 1, **OPTIONS)
    for method in METHODS:
        r = a.rank(method, x, y, index)[0]
        assert torch.equal(torch.sort(r).values, torch.arange(len(units))), method
        assert torch.equal(r, b.rank(method, x, y, index)[0]), method  # deterministic with the seed
        if method in ("hardconcrete", "keep_hc", "random"):  # the seeded pieces: another seed, another ranking
            assert not torch.equal(r, other.rank(method, x, y, index)[0]), method


def test_greedy_is_the_flipping_search_continued(tiny_trained):
    cfg, model, data, run = tiny_trained
    model.eval()
    units = Units(model, "channel")
    index = first_noisy(model, data)
    _, x, y = batch(data, index)
    k = 8
    ranking, facts = Localizer(model, units, 0, **{**OPTIONS, "max_k": k}).rank("greedy", x, y, index)
    search = flip_sequential(model, units, x, y, k)
    assert search.flipped and facts["flip_at"] == len(search.units) < k
    assert ranking[:len(search.units)].tolist() == search.units
    # past the flip: the same rule, step by step, on the plainly edited model
    m = copy.deepcopy(model).eval()
    order = []
    for _ in range(k):
        for u in order[-1:]:
            units.zero_(m, u)
        params = [m.get_parameter(n) for n in units.grad_names]
        scores = units.scores(m, torch.autograd.grad(objective(m(x), y), params))
        scores[order] = -math.inf
        order.append(int(scores.argmax()))
    assert ranking[:k].tolist() == order
    oneshot = Localizer(model, units, 0, **OPTIONS).rank("oneshot", x, y, index)[0]
    assert int(oneshot[0]) == order[0]  # one-shot = the search's first step


def hand_built():
    """Input: 4 channels x 1 x 2 positions. Filter c of a 1x1 conv passes channel c (ReLU); the head reads
    filter k at both positions for class k (weight 1 each); filter 3, on for everyone, votes weakly for
    classes 0 and 1. The target alone has channel 2 (class 2): filter 2 alone carries its label --
    zeroing it flips the target and changes no other example; zeroing one of its two head weights
    leaves the target at class 2 (logit 1 > 0.6)."""
    conv, head = nn.Conv2d(4, 4, 1, bias=False), nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        head.weight.zero_()
        for k in range(3):
            head.weight[k, 2 * k] = head.weight[k, 2 * k + 1] = 1.0  # flatten order: (filter, position)
        head.weight[0, 6:] = 0.3
        head.weight[1, 6:] = 0.2
    model = Net([("block", nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))), ("flatten", nn.Flatten(1)),
                 ("head", head)]).eval()
    feature = [2] + [0, 1] * 4  # the target (class 2), then references of classes 0 and 1
    x = torch.zeros(len(feature), 4, 1, 2)
    for i, c in enumerate(feature):
        x[i, c] = x[i, 3] = 1
    return model, x, torch.tensor(feature)


def test_hand_built_unit_is_found_by_every_method_but_random():
    model, x, y = hand_built()
    assert torch.equal(model(x).argmax(1), y)
    units = Units(model, "channel")
    filter2 = 2  # the block's filters are units 0..3
    assert units.describe(filter2)["param"] == "conv.weight" and units.describe(filter2)["index"] == [2]
    head = units.entries[1].offset
    edges = {head + 2 * 8 + 4, head + 2 * 8 + 5}  # the head weights from filter 2 to class 2
    options = {**OPTIONS, "mask_max_steps": 300}
    for method in METHODS:
        seeds = range(10 if method in ("hardconcrete", "keep_hc", "random") else 3)  # 10 where seeds differ
        ranks = [Localizer(model, units, seed, **options).rank(method, x, y, 0)[0] for seed in seeds]
        tops = [set(r[:3].tolist()) for r in ranks]
        firsts = [int(r[0]) for r in ranks]
        if method == "activation":
            # An edge's signal is |w| x its input, so its selectivity is its input's: the two head weights
            # from filter 2 tie with the filter at 1 (the target's alone), ties in seeded random order.
            s = ActivationProbe(copy.deepcopy(model), units).selectivity(x)
            assert {int(u) for u in torch.nonzero(s == s.max()).flatten()} == {filter2} | edges
            assert all(t == {filter2} | edges for t in tops)
        elif method == "hardconcrete":
            # Run to convergence the three removal gates end open; their order is the gate noise's: the
            # three on top for every seed.
            assert all(t == {filter2} | edges for t in tops), tops
        elif method in ("keep_hc", "keep_slim"):
            # Keeping the target's class 2 needs filter 2 and a head weight from it; every other unit's mask
            # only pays the penalty: the three stay on top, their order among equal masks seeded.
            assert all(t == {filter2} | edges for t in tops), (method, tops)
        elif method == "random":
            assert len(set(map(tuple, (r.tolist() for r in ranks)))) == 10  # no answer, another per seed
        else:
            assert firsts == [filter2] * 3, (method, firsts)


def test_plateau_stops_when_the_loss_and_the_top_units_settle():
    theta = torch.arange(10.0)
    rule = Plateau(window=4, tol=0.01, k=3)
    falling = [rule.step(10.0 / (1 + i), theta) for i in range(12)]  # 25% less per window: never converged
    assert not any(falling) and len(rule.means) == 3
    flat = [rule.step(1.0, theta) for _ in range(4)]  # a window no lower than the last (0.96): settled, same top 3
    assert flat == [False, False, False, True]
    moving = Plateau(window=2, tol=0.01, k=3)  # a flat loss, but the top units change: not converged
    assert not any(moving.step(1.0, torch.roll(theta, i // 2)) for i in range(8))
    assert Plateau(window=2, tol=0.01, k=3).step(torch.tensor(1.0, requires_grad=True), theta) is False


def test_learned_masks_stop_by_the_rule_and_flip_the_hand_built_target():
    model, x, y = hand_built()
    units = Units(model, "channel")
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    for method, penalty, lr in (("hardconcrete", 0.01, 0.1), ("slimming", 0.01, 0.02), ("keep_hc", 1.0, 0.1),
                                ("keep_slim", 1.0, 0.02)):
        theta, facts = mask_scores(frozen, units, x, y, method, lr, penalty, generator(0, method), Plateau(10, 0.01, 3), 2000)
        assert facts["converged"] and facts["steps"] < 2000 and facts["steps"] % 10 == 0, (method, facts["steps"])
        assert len(facts["trace"]) == facts["steps"] // 10
        ranking = torch.sort(theta, descending=True, stable=True).indices
        assert topk_predictions(model, units, ranking, x, 3)[-1] != 2, method  # its top 3 zeroed: the target flips
    # a cap below convergence is reported as such
    _, facts = mask_scores(frozen, units, x, y, "hardconcrete", 0.1, 0.01, generator(0, "hc"), Plateau(10, 0.01, 3), 15)
    assert facts == {**facts, "steps": 15, "converged": False}


def test_zeroout_is_every_unit_zeroed_alone():
    model, x, y = hand_built()
    units = Units(model, "channel")
    scores, forwards = zeroout_scores(copy.deepcopy(model), units, x, y)
    assert forwards == len(units) + 1
    with torch.no_grad():
        p = float(label_probability(model(x[:1]), y[:1]))
        for u in range(len(units)):
            m = copy.deepcopy(model)
            units.zero_(m, u)
            assert float(scores[u]) == pytest.approx(p - float(label_probability(m(x[:1]), y[:1])), abs=1e-6), u
    assert int(scores.argmax()) == 2  # filter 2 carries the target's class


def test_zeroout_restarts_from_cached_stages_exactly(tiny_trained):
    cfg, model, data, run = tiny_trained
    model.eval()
    units = Units(model, "channel")
    _, x, y = batch(data, first_noisy(model, data))
    scores, _ = zeroout_scores(copy.deepcopy(model), units, x, y)
    with torch.no_grad():
        p = float(label_probability(model(x[:1]), y[:1]))
        for u in torch.randperm(len(units), generator=generator(0, "zeroout"))[:20].tolist():
            m = copy.deepcopy(model)
            units.zero_(m, u)
            assert float(scores[u]) == pytest.approx(p - float(label_probability(m(x[:1]), y[:1])), abs=1e-5), u


def hand_built_etd(p_gen=0.5, p_mem=0.5):
    """A 1x1 conv of 8 filters + ReLU + example-tied dropout (4 generalization, 4 memorization channels),
    then a head: seeded random weights. Returns (model, x for examples 0..5, their labels, indices)."""
    torch.manual_seed(0)
    drop = dropout.etd_factory(p_gen, p_mem, 0)("block", 8)
    model = Net([("block", nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 1, bias=False), relu=nn.ReLU(), drop=drop))),
                 ("flatten", nn.Flatten(1)), ("head", nn.Linear(8 * 4, 3))]).eval()
    count = drop.memorization_mask(torch.arange(100)).sum(1)
    idx = torch.nonzero((count > 0) & (count < 4)).flatten()[:6]  # each: some, not all, memorization channels
    return model, torch.randn(6, 3, 2, 2), torch.randint(0, 3, (6,)), idx


def test_etd_baselines_score_a_mask_reader_at_zero_and_the_probe_reads_no_mask():
    model, x, y, idx = hand_built_etd()
    other = copy.deepcopy(model)  # "trained without ETD": other weights, the same masks pinned
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    units = Units(model, "channel")
    truth = ChannelUnits(model, units)
    own = {i: truth.own(tied_channels(model, 0.5, 0.5, 0, idx[i:i + 1])) for i in range(len(idx))}
    assert all(0 < int(o.sum()) < 4 for o in own.values())

    def reader(m, i):
        """Reads the answer off the target's pinned mask (as selectivity probed after the mask did): the
        units of memorization channels open for example i first, then the rest in unit order."""
        mask = next(mod for mod in pin_tied(m, torch.roll(idx, -i)).modules() if isinstance(mod, PinnedMask)).mask
        read = (truth.unit_channel >= 0) & (mask[0] & truth.is_mem)[truth.unit_channel.clamp_min(0)]
        return torch.sort(read.int(), descending=True, stable=True).indices
    noisy, clean = [0, 1, 2], [3, 4, 5]  # which examples play the memorized targets is arbitrary here
    ap = lambda m, i: truth.scores(reader(m, i), own[i], 3)["ap"]
    etd = [ap(model, i) for i in noisy]
    assert min(etd) == 1.0  # against the ground truth alone a mask reader is perfect ...
    assert [a - b for a, b in zip(etd, [ap(other, i) for i in noisy])] == [0.0] * 3  # ... but no better than (a)
    assert sum(etd) / 3 - sum(ap(model, i) for i in clean) / 3 == 0.0  # ... or (b)
    # The activation probe sits before the mask: pinning other examples' masks changes no selectivity.
    probe_scores = [ActivationProbe(pin_tied(model, torch.cat([idx[:1], torch.roll(idx[1:], s)])), units).selectivity(x)
                    for s in (0, 1)]
    filters = units.entries[0].count
    assert torch.equal(probe_scores[0][:filters], probe_scores[1][:filters])
    # The oracle: the own channels' units first (every unit writing them), so precision 1 while they last.
    ranking = oracle_ranking(truth, own[0], generator(0, "oracle"))
    n_own = int(((truth.unit_channel >= 0) & own[0][truth.unit_channel.clamp_min(0)]).sum())
    s = truth.scores(ranking, own[0], n_own + 1)
    assert s["precision"][:n_own] == [1.0] * n_own and s["precision"][n_own] < 1 and s["ap"] == 1.0
    assert s["recall"][n_own - 1] == 1.0 and sorted(ranking.tolist()) == list(range(len(units)))
    assert average_precision([False, True, False, True]) == pytest.approx((1 / 2 + 2 / 4) / 2)


def assert_complete(model, x, y, steps, rel):
    """Per layer group, the IG scores add up to L(trained) - L(group zeroed)."""
    units = Units(model, "channel")
    scores = ig_scores(model, units, x, y, steps)
    with torch.no_grad():
        full = float(objective(model(x), y))
        for group in dict.fromkeys(e.group for e in units.entries):
            entries = [e for e in units.entries if e.group == group]
            zeroed = {n: torch.zeros_like(model.get_parameter(n)) for e in entries for n in e.names}
            gap = full - float(objective(functional_call(model, zeroed, (x,)), y))
            total = float(sum(scores[e.offset:e.offset + e.count].sum() for e in entries))
            assert total == pytest.approx(gap, rel=rel, abs=1e-4), group


def test_integrated_gradients_are_complete_per_layer_group(tiny_trained):
    assert_complete(*hand_built(), steps=16, rel=2e-3)  # a smooth path: the midpoint rule converges fast
    cfg, model, data, run = tiny_trained
    _, x, y = batch(data, first_noisy(model.eval(), data))
    assert_complete(model, x, y, steps=64, rel=0.05)  # kinks (ReLU, max-pool, BatchNorm near 0): slowly


def test_etd_ground_truth_is_what_the_model_trained_with(tiny_trained):
    cfg, _, data, run = tiny_trained
    p_gen, p_mem = 0.5, 0.3
    ecfg = SimpleNamespace(**{**vars(cfg), "epochs": 1})
    model = model_for(ecfg, data, dropout=dropout.etd_factory(p_gen, p_mem, cfg.model_seed))
    seen = {}  # (layer, example) -> (channels whose input was not all zero, channels the dropout let through)

    def capture(module, inputs, out):
        if module.training:
            known, on = (inputs[0] != 0).flatten(2).any(2), (out != 0).flatten(2).any(2)
            for i, ex in enumerate(module.index.tolist()):
                seen[module.layer, ex] = (known[i], on[i])
    for m in dropout.etd_modules(model):
        m.register_forward_hook(capture)
    train_epoch(model, data, torch.arange(data.n_train), make_optimizer(model.parameters(), ecfg), ecfg, 1)
    examples = sorted({ex for _, ex in seen})
    assert len(examples) >= data.n_train - 1  # every batch of the epoch (a last batch of 1 is dropped)
    truth = tied_channels(model, p_gen, p_mem, cfg.model_seed, torch.tensor(examples))
    n_gen = {m.layer: m.n_gen for m in dropout.etd_modules(model)}
    checked = 0
    for (layer, ex), (known, on) in seen.items():  # trained with = generalization channels + its own
        expected = truth[layer][examples.index(ex)] | (torch.arange(len(on)) < n_gen[layer])
        assert torch.equal(on[known], expected[known]), (layer, ex)
        checked += int(known.sum())
    assert checked > 0.5 * sum(len(k) for k, _ in seen.values())
    # another p_mem is another answer: the read-back really depends on the settings
    other = tied_channels(model, p_gen, 0.2, cfg.model_seed, torch.tensor(examples))
    assert any(not torch.equal(other[k], truth[k]) for k in truth)

    # Pinned masks = tied evaluation; the channel map: filter c and BatchNorm scale and shift c write channel c.
    model.eval()
    idx = torch.tensor(examples[:9])
    with dropout.mode(model, "tied"), torch.no_grad():
        tied = model(data.batch(idx), index=idx)
        assert torch.equal(pin_tied(model, idx)(data.batch(idx)), tied)
    units = Units(model, "channel")
    cu = ChannelUnits(model, units)
    for e in units.entries:
        if e.group != "head":
            first = cu.first[e.group]
            assert cu.unit_channel[e.offset:e.offset + e.count].tolist() == list(range(first, first + e.count))
        else:
            assert bool((cu.unit_channel[e.offset:e.offset + e.count] == -1).all())
    own = cu.own(tied_channels(model, p_gen, p_mem, cfg.model_seed, idx[:1]))
    assert int(own.sum()) == sum(int(t[0].sum()) for t in tied_channels(model, p_gen, p_mem, cfg.model_seed, idx[:1]).values())
    perfect = torch.cat([torch.nonzero(own[cu.unit_channel.clamp_min(0)] & (cu.unit_channel >= 0)).flatten(),
                         torch.nonzero(~(own[cu.unit_channel.clamp_min(0)] & (cu.unit_channel >= 0))).flatten()])
    pr = cu.scores(perfect, own, 5)
    assert pr["precision"] == [1.0] * 5 and pr["recall"][-1] <= 5 / int(own.sum()) + 1e-9


@pytest.fixture
def run_copy(tiny_trained, tiny_argv, tmp_path):
    cfg, model, data, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)
    small = ["--n_examples=2", "--n_dev=1", "--ref_batch=7", "--max_k=4", "--ig_steps=2", "--mask_max_steps=20",
             "--mask_window=5", "--penalty_factors=[1,10]", "--collateral_n=20", "--collateral_k=[1,4,9]",
             "--etd_epochs=12", "--resamples=50"]
    return (lambda *extra: tiny_argv(runs_dir=runs) + small + list(extra)), runs / run.dir.name


def test_script_end_to_end_and_report_section(run_copy, tmp_path):
    argv, run_dir = run_copy
    results = localization_methods.main(argv())
    for name in ("localization_methods.json", "localization_methods.png", "localization_methods_etd.png",
                 "localization_methods_cost.png", "localization_methods_convergence.png"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "localization_methods.partial.json").exists()
    assert results["methods"] == list(METHODS) and results["collateral_k"] == [1, 4]
    assert set(results["tuning"]) == set(MASKS) and all(t["chosen"] in (results["config"][localization_methods.PENALTY[m]]
                                                                        * f for f in (1, 10))
                                                        for m, t in results["tuning"].items())
    plain, etd = results["plain"]["records"], results["etd"]["records"]
    assert [r["kind"] for r in plain] == ["noisy", "clean"] * 2
    assert [(r["model"], r["kind"]) for r in etd] == [("etd", "noisy"), ("etd", "clean")] * 2 + [("etd_base", "noisy")] * 2
    assert [r["index"] for r in etd if r["model"] == "etd_base"] == [r["index"] for r in etd[:4] if r["kind"] == "noisy"]
    for r in plain + etd:
        for method, m in r["methods"].items():
            assert len(m["top"]) == len(set(m["top"])) == 4 and len(m["flipped"]) == 4 and m["seconds"] >= 0
            assert m["flipped"] == [p != r["label"] for p in m["predictions"]]
            assert m["flip_k"] == (m["flipped"].index(True) + 1 if any(m["flipped"]) else None)
            assert m["auc"] == sum(m["flipped"]) / 4
            if method != ORACLE:
                assert m["passes"]["forward"] >= (method != "random") and m["passes"]["forward_examples"] >= m["passes"]["forward"]
            if method in MASKS:
                assert 0 < m["mask"]["steps"] <= 20 and len(m["mask"]["trace"]) == m["mask"]["steps"] // 5
    for r in plain:
        for m in r["methods"].values():
            assert sorted(m["collateral_drop"], key=int) == ["1", "4"]
            assert (m["collateral_at_flip"] is None) == (m["flip_k"] is None)
    for r in etd:
        assert r["own_channels"] > 0 and 0 < r["chance_precision"] < 1 and list(r["methods"]) == list(METHODS) + [ORACLE]
        for name, m in r["methods"].items():
            assert all(0 <= v <= 1 for v in m["precision"] + m["recall"] + m["refs_kept"])
            assert m["recall"] == sorted(m["recall"]) and len(m["refs_kept"]) == 4
            assert ("held_out_at_flip" in m) == (m["flip_k"] is not None)
            assert set(m["layer_ap"]) == set(m["layer_precision"]) and len(m["layer_ap"]) > 1
        assert r["methods"][ORACLE]["precision"] == [1.0] * 4 and r["methods"][ORACLE]["ap"] == 1.0
    c = results["comparison"]
    assert set(c) == set(METHODS) | {ORACLE}
    for key in ("auc", "median_k", "ap_minus_a", "ap_minus_b", "layer_ap_minus_a"):
        v = c["oneshot"][key]
        assert v["ci"][0] <= v["value"] <= v["ci"][1] or not math.isfinite(v["ci"][0]), key
    assert c[ORACLE]["ap_minus_a"]["value"] == 0 and c[ORACLE]["ap_minus_b"]["value"] == 0  # it reads the mask
    assert c["random"]["forward_equivalents"]["value"] == 0 < c["zeroout"]["forward_equivalents"]["value"]
    s = results["summary"]
    assert s["plain"]["greedy"]["noisy"]["flip_rate"][-1] == 1.0  # the search flips these memorized targets
    assert set(results["cost_ratio_to_oneshot"]) == set(METHODS) and results["cost_ratio_to_oneshot"]["oneshot"] == 1
    # an interrupted run resumes from its records; another setting recomputes
    again = localization_methods.main(argv())
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN (an AP without hits) != NaN
    assert same(again["plain"]["records"], plain) and same(again["etd"]["records"], etd)
    assert again["tuning"] == results["tuning"]
    # the comparison over seeds: each seed's JSON combined (here one file twice)
    out = tmp_path / "combined"
    path = str(run_dir / "localization_methods.json")
    combined = localization_methods.main(argv(f"--combine={[path, path]!r}",
                                              f"--combine_out={out}"))
    assert (tmp_path / "combined.json").is_file() and (tmp_path / "combined_cost.png").is_file()
    assert combined["comparison"]["oneshot"]["auc"]["n"] == 4 and combined["targets"][0]["etd_base/noisy"] == 2

    fewer = localization_methods.main(argv("--methods=['oneshot','random']", "--etd=False"))
    assert fewer["methods"] == ["oneshot", "random"] and fewer["etd"] is None
    assert [r["methods"]["oneshot"]["top"] for r in fewer["plain"]["records"]] == \
        [r["methods"]["oneshot"]["top"] for r in plain]

    fig, text = report_section([results, results], SimpleNamespace(**results["config"]), tmp_path / "report")
    assert fig.is_file() and all(f"| {localization_methods.LABELS[m]}" in text for m in METHODS)


def test_bad_input_is_one_line(run_copy):
    argv, _ = run_copy
    for bad, match in (("--methods=['oneshot','nope']", "methods="), ("--ref_batch=0", "ref_batch=0"),
                       ("--max_k=100000", "max_k=100000"), ("--collateral_k=[0]", "collateral_k="),
                       ("--penalty_factors=[0]", "penalty_factors="), ("--combine=['nope.json']", "no file nope.json")):
        with pytest.raises(UserError, match=match):
            localization_methods.main(argv(bad))



def test_a_store_adds_up_targets_across_sessions_and_refuses_other_records(run_copy, tmp_path, monkeypatch):
    """--store keeps a seed's records where they can be committed: a run stopped after one target resumes
    there (the same records as one uninterrupted run); records of other settings or code are refused in
    one line, and the stored file is left as it was."""
    argv, _ = run_copy
    fast = ["--methods=['oneshot','random']", "--etd=False"]
    whole = localization_methods.main(argv(*fast, f"--store={tmp_path / 'whole'}"))
    store = tmp_path / "store"
    calls, judge = [], localization_methods.judge

    def stop_after_one_target(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # the first target's two methods, then a crash
            raise KeyboardInterrupt
        return judge(*a, **k)

    monkeypatch.setattr(localization_methods, "judge", stop_after_one_target)
    with pytest.raises(KeyboardInterrupt):
        localization_methods.main(argv(*fast, f"--store={store}"))
    partial = json.loads((store / "localization_methods.partial.json").read_text())
    assert len(partial["records"]) == 1 and partial["run"] == whole["run"] and partial["code"] == whole["code"]
    monkeypatch.setattr(localization_methods, "judge", judge)
    resumed = localization_methods.main(argv(*fast, f"--store={store}"))
    assert [r["index"] for r in resumed["plain"]["records"]] == [r["index"] for r in whole["plain"]["records"]]
    assert resumed["plain"]["records"][0] == partial["records"][0]  # reused, not recomputed
    for a, b in zip(resumed["plain"]["records"], whole["plain"]["records"]):
        assert [m["top"] for m in a["methods"].values()] == [m["top"] for m in b["methods"].values()]
    assert not (store / "localization_methods.partial.json").exists()

    final = store / "localization_methods.json"
    kept = final.read_bytes()
    for extra, match in (("--max_k=3", r"another setting \(max_k: 4 there, 3 now\)"),
                         ("--n_examples=1", r"another n_examples \(development targets"),
                         ("--methods=['oneshot','greedy']", r"another list of methods \(greedy not there\)")):
        with pytest.raises(UserError, match=match):
            localization_methods.main(argv("--etd=False", f"--store={store}", *([] if "methods" in extra else fast[:1]), extra))
        assert final.read_bytes() == kept
    tampered = json.loads(kept)
    tampered["code"]["common/localization.py"] = "0" * 12
    final.write_text(json.dumps(tampered))
    with pytest.raises(UserError, match=r"another code version \(code of common/localization.py changed\)"):
        localization_methods.main(argv(*fast, f"--store={store}"))
    proc = subprocess.run([sys.executable, str(REPO / "localization_methods.py"), *argv(*fast, f"--store={store}")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "another code version" in proc.stderr
    assert json.loads(final.read_text()) == tampered
    with sole_writer(store, "store"):  # another process writing the same store
        with pytest.raises(UserError, match="is being written by process"):
            localization_methods.main(argv(*fast, f"--store={store}"))


def test_findings_count_how_masks_stopped_and_the_oracle_on_hand_built_records(tmp_path):
    """common.localization_findings: a mask stopped by the rule, one at the cap with a flat loss, one at
    the cap still falling; the oracle's flips with every own channel zeroed vs within its top K, per kind."""
    from common.localization_findings import findings, findings_section

    def rec(model, kind, converged, trace, all_flipped=False, oracle_last=False, own=30):
        methods = {"slimming": {"mask": {"converged": converged, "steps": 25 * len(trace), "trace": trace}}}
        if model == "etd":
            methods[ORACLE] = {"flipped": [False, oracle_last]}
        return {"model": model, "kind": kind, "methods": methods, "own_channels": own, "oracle_all_flipped": all_flipped}

    settings = {"mask_tol": 0.01, "max_k": 2, "mask_max_steps": 75}
    seed0 = {"settings": settings, "plain": {"records": [rec("plain", "noisy", True, [2.0, 1.999])]},
             "etd": {"held_out_before": {"etd": {"clean": 1.0}, "etd_base": {"clean": 0.1}}, "records": [rec("etd", "noisy", False, [2.0, 1.0, 0.995], all_flipped=True, own=30),
                                 rec("etd", "clean", False, [2.0, 1.5, 1.0], own=40)]}}
    seed1 = {"settings": settings, "plain": {"records": []},
             "etd": {"held_out_before": {"etd": {"clean": 0.9}, "etd_base": {"clean": 0.2}}, "records": [rec("etd", "noisy", False, [1.0, 0.5, 0.2], all_flipped=True, oracle_last=True, own=20)]}}
    f = findings([seed0, seed1])
    assert f["masks"] == {"slimming": {"n": 4, "converged": 1, "flat_at_cap": 1}}
    assert f["oracle"]["noisy"] == {"n": 2, "all_flipped": 2, "flipped_at_k": 1, "own_channels_mean": 25.0}
    assert f["oracle"]["clean"] == {"n": 1, "all_flipped": 0, "flipped_at_k": 0, "own_channels_mean": 40.0}
    assert f["held_out_before"] == {"etd": {"clean": pytest.approx(0.95)}, "etd_base": {"clean": pytest.approx(0.15)}}
    from common.runs import write_json
    write_json(tmp_path / "s0.json", seed0), write_json(tmp_path / "s1.json", seed1)
    text = findings_section([tmp_path / "s0.json", tmp_path / "s1.json"])
    assert "slimming removal mask: 1/4 by the rule, 1 at the cap with a flat loss" in text and "2 at the cap with the loss still falling" in text
    assert "noisy targets: every own channel zeroed flips 2/2, its top 2 units flip 1/2" in text
    assert "baseline (a), the plain weights with the masks pinned: clean 15.0%" in text
    assert findings([seed0 | {"etd": None}])["oracle"] == {} == findings([seed0 | {"etd": None}])["held_out_before"]


def test_the_findings_command_prints_the_block_and_refuses_no_input(tmp_path):
    from common.localization_findings import findings_section
    from common.runs import write_json
    seed = {"settings": {"mask_tol": 0.01, "max_k": 2, "mask_max_steps": 75}, "etd": None,
            "plain": {"records": [{"model": "plain", "kind": "noisy", "methods": {
                "keep_hc": {"mask": {"converged": False, "steps": 75, "trace": [3.0, 2.0, 1.0]}}}}]}}
    write_json(tmp_path / "s.json", seed)
    run = lambda *a: subprocess.run([sys.executable, "-m", "common.localization_findings", *a], cwd=REPO,
                                    capture_output=True, text=True)
    done = run(str(tmp_path / "s.json"))
    assert done.returncode == 0 and done.stdout.strip() == findings_section([tmp_path / "s.json"])
    assert "0/1 by the rule, 0 at the cap with a flat loss" in done.stdout and "1 at the cap with the loss still falling" in done.stdout
    write_json(tmp_path / "other.json", [{"number": 1}])  # another results file (a claims.json)
    for bad, words in (((), "no records given"), ((str(tmp_path / "nope.json"),), "no file"),
                       ((str(tmp_path / "other.json"),), f"{tmp_path / 'other.json'} is not a seed's")):
        refused = run(*bad)
        assert refused.returncode == 2 and refused.stderr.startswith(f"error: {words}") and not refused.stdout
