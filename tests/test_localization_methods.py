"""localization_methods.py: every method's ranking, a hand-built model with a known answer, the ETD
ground truth against the masks a model trained with, and the script end to end on the tiny run."""
import copy
import math
import shutil
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import localization_methods
from common import dropout
from common.cli import UserError
from common.evaluation import predict
from common.flipping import Units, flip_sequential, objective, pick_targets, reference_batch
from common.localization import (METHODS, ActivationProbe, ChannelUnits, Localizer, ig_scores, pin_tied,
                                 report_section, tied_channels)
from common.models import Net, model_for
from common.training import make_optimizer, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: many tiny kernels


OPTIONS = dict(max_k=6, ig_steps=2, mask_steps=5, hc_lr=0.1, slim_lr=0.02, l0_penalty=0.01, l1_penalty=0.01)


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
        if method in ("hardconcrete", "random"):  # the seeded pieces: another seed, another ranking
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
    options = {**OPTIONS, "mask_steps": 50}
    for method in METHODS:
        seeds = range(10 if method in ("hardconcrete", "random") else 3)  # 10 where seeds make a difference
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
            # Adam moves the three log_alphas at the same rate while removing each helps; the gate noise
            # then decides their order: the filter first for most seeds, the three always on top.
            assert all(t == {filter2} | edges for t in tops) and firsts.count(filter2) >= 6, firsts
        elif method == "random":
            assert len(set(map(tuple, (r.tolist() for r in ranks)))) == 10  # no answer, another per seed
        else:
            assert firsts == [filter2] * 3, (method, firsts)


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
    small = ["--n_examples=2", "--ref_batch=7", "--max_k=4", "--ig_steps=2", "--mask_steps=4", "--collateral_n=20",
             "--collateral_k=[1,4,9]", "--etd_epochs=12"]
    return (lambda *extra: tiny_argv(runs_dir=runs) + small + list(extra)), runs / run.dir.name


def test_script_end_to_end_and_report_section(run_copy, tmp_path):
    argv, run_dir = run_copy
    results = localization_methods.main(argv())
    for name in ("localization_methods.json", "localization_methods.png", "localization_methods_etd.png",
                 "localization_methods_cost.png"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "localization_methods.partial.json").exists()
    assert results["methods"] == list(METHODS) and results["collateral_k"] == [1, 4]
    plain, etd = results["plain"]["records"], results["etd"]["records"]
    assert [r["kind"] for r in plain] == ["noisy", "clean"] * 2 and len(etd) == 2
    for r in plain + etd:
        for method, m in r["methods"].items():
            assert len(m["top"]) == len(set(m["top"])) == 4 and len(m["flipped"]) == 4 and m["seconds"] >= 0
            assert m["flipped"] == [p != r["label"] for p in m["predictions"]]
    for r in plain:
        for m in r["methods"].values():
            assert sorted(m["collateral_drop"], key=int) == ["1", "4"]
    for r in etd:
        assert r["own_channels"] > 0 and 0 < r["chance_precision"] < 1
        for m in r["methods"].values():
            assert all(0 <= v <= 1 for v in m["precision"] + m["recall"] + m["refs_kept"])
            assert m["recall"] == sorted(m["recall"]) and len(m["refs_kept"]) == 4
    s = results["summary"]
    assert s["plain"]["greedy"]["noisy"]["flip_rate"][-1] == 1.0  # the search flips these memorized targets
    assert set(results["cost_ratio_to_oneshot"]) == set(METHODS) and results["cost_ratio_to_oneshot"]["oneshot"] == 1
    # an interrupted run resumes from its records; another setting recomputes
    again = localization_methods.main(argv())
    assert again["plain"]["records"] == plain and again["etd"]["records"] == etd
    fewer = localization_methods.main(argv("--methods=['oneshot','random']", "--etd=False"))
    assert fewer["methods"] == ["oneshot", "random"] and fewer["etd"] is None
    assert [r["methods"]["oneshot"] for r in fewer["plain"]["records"]] == [r["methods"]["oneshot"] for r in plain]

    fig, text = report_section([results, results], SimpleNamespace(**results["config"]), tmp_path / "report")
    assert fig.is_file() and all(f"| {label}" in text for label in localization_methods.LABELS.values())


def test_bad_input_is_one_line(run_copy):
    argv, _ = run_copy
    for bad, match in (("--methods=['oneshot','nope']", "methods="), ("--ref_batch=0", "ref_batch=0"),
                       ("--max_k=100000", "max_k=100000"), ("--collateral_k=[0]", "collateral_k=")):
        with pytest.raises(UserError, match=match):
            localization_methods.main(argv(bad))

