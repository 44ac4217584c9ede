"""neuron_flipping.py: the criterion (objective, noise, units), the batched search and the steps in pieces
against the plain loop (any architecture), the margin-matched targets, the records, the stop, resume,
the result files."""
import copy
import math
import types
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neuron_flipping
from common import config
from common.cli import UserError
from common.evaluation import predict
from common import flipping
from common.flipping import (Collateral, FlipResult, Units, collateral_sets, eot_inputs, flip_batched, flip_sequential,
                             graph_bytes_per_row, graph_rows, margins, nearest_on_margin, objective, pick_targets,
                             reference_batch, refresh_batchnorm, search_step, step_input, target_prediction,
                             zeroed_copy)
from common.models import stages
from common.precision import strict_fp32
from common.rng import generator
from common.runs import read_json
from conftest import REPO

SMALL = ["--n_examples=3", "--ref_batch=15", "--max_units=40", "--collateral_n=40", "--n_show=2", "--n_eot=2"]


def batch(data, index, size=15, seed=0):
    idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, size, seed)])
    return data.batch(idx), data.labels(idx)


def targets(model, data, n):
    return pick_targets(data, predict(model, data, "train", amp=False) == data.y_train, n, seed=0)


def units_of(model, data, unit):
    return Units(model.eval(), unit, sample=data.batch(torch.tensor([0])))


@pytest.fixture
def run_copy(tiny_trained, tmp_path):
    """(argv(*extra), run directory): the script on a private copy of the tiny finished run."""
    cfg, model, data, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)
    argv = lambda *extra: [f"--dataset={cfg.dataset}", f"--runs_dir={runs}", "--model=cnn", "--width=0.5",
                           "--epochs=20", "--batch_size=64", "--lr=0.05", "--device=cpu", *SMALL, *extra]
    return argv, runs / run.dir.name


# ----------------------------------------------------------------------------- the criterion

def test_objective_on_a_hand_computed_batch():
    ce = lambda z, c: math.log(sum(math.exp(v) for v in z)) - z[c]  # cross-entropy of logits z, class c
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    one = (-3 * ce([2, 0], 0) + ce([0, 1], 1) + ce([1, 1], 0)) / 3  # the target's (row 0) term times -|B|, the mean
    assert float(objective(logits, y)) == pytest.approx(one, rel=1e-6)
    assert float(objective(logits, y, "mean_loss")) == pytest.approx(one, rel=1e-6)  # one copy: both agree
    # two noised copies stacked copy-major
    other = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    two = (-3 * ce([0, 0], 0) + ce([3, 0], 1) + ce([0, 2], 0)) / 3
    # the authors' current code: the cross-entropy of the copies' mean logits (1, 0), (1.5, 0.5), (0.5, 1.5)
    mean = (-3 * ce([1, 0], 0) + ce([1.5, 0.5], 1) + ce([0.5, 1.5], 0)) / 3
    assert float(objective(torch.cat([logits, other]), y)) == pytest.approx(mean, rel=1e-6)
    # their earlier code: the mean of the copies' objectives
    assert float(objective(torch.cat([logits, other]), y, "mean_loss")) == pytest.approx((one + two) / 2, rel=1e-6)
    assert abs(mean - (one + two) / 2) > 0.05  # the two objectives differ here
    with pytest.raises(ValueError, match="objective"):
        objective(logits, y, "mean_grad")
    # the flip is judged on the target's logits averaged over the copies: (2, 0) and (0, 0) -> class 0;
    # with a third copy (0, 5) the average is (2/3, 5/3) -> class 1
    assert target_prediction(torch.cat([logits, other]), 3) == 0
    assert target_prediction(torch.cat([logits, other, torch.tensor([[0.0, 5.0], [0, 0], [0, 0]])]), 3) == 1


def test_objective_gradient_is_the_authors_current_one(tiny_trained):
    """The plain loop's gradient equals the authors' code after their fix, written as they write it: the
    copies' logits summed and divided by n_EoT, CrossEntropyLoss(reduction='none'), the target's term
    times -batch_size, the mean, one backward; before the fix (mean_loss): per copy that loss, backward,
    gradients accumulated and divided by n_EoT."""
    cfg, model, data, run = tiny_trained
    x, y = batch(data, 5)
    inp = step_input(x, 3, 0.01, (0, 5), 0)
    m = copy.deepcopy(model).eval().requires_grad_(True)
    params = list(m.parameters())

    def authors(z):
        loss = nn.CrossEntropyLoss(reduction="none")(z, y)
        loss[0] *= -1 * len(y)
        return loss.mean()
    final = None
    for c in inp.split(len(y)):
        final = m(c) if final is None else final + m(c)
    current = torch.autograd.grad(authors(final / 3), params)
    earlier = [g / 3 for g in map(sum, zip(*(torch.autograd.grad(authors(m(c)), params) for c in inp.split(len(y)))))]
    for mode, expected in (("mean_logits", current), ("mean_loss", earlier)):
        _, grads = search_step(m, params, inp, y, mode, None, lambda z: False)
        for g, e in zip(grads, expected):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-7), mode
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(current, earlier))


def test_noise_is_redrawn_per_step_and_scaled_by_the_batch_norm(tiny_trained):
    cfg, model, data, run = tiny_trained
    index = targets(model, data, 1)[1][0]  # a clean example: several steps
    x, y = batch(data, index)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        result = flip_sequential(model, units_of(model, data, "channel"), x, y, 40, 3, 0.01, (7, index))
    finally:
        hook.remove()
    assert len(result.units) >= 2 and len(seen) == 3 * (len(result.units) + 1)  # a forward per copy and step
    for step in range(len(result.units) + 1):
        z = torch.randn((3,) + tuple(x.shape), generator=generator(7, "neuron_flipping", "eot", index, step))
        for k in range(3):  # each copy's noise: 1% of the norm of the whole batch
            direct = x + z[k] * (0.01 * x.norm() / z[k].norm())
            assert torch.allclose(seen[3 * step + k], direct, rtol=0, atol=1e-6), (step, k)
            noise = seen[3 * step + k] - x
            assert float(noise.norm()) == pytest.approx(0.01 * float(x.norm()), rel=1e-4)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[0], seen[3])  # fresh noise per copy and step
    assert torch.equal(eot_inputs(x, 0, 0.01, None), x)


def test_units_cover_every_parameter_once(tiny_trained):
    cfg, model, data, run = tiny_trained
    channel, weight, out = (units_of(model, data, u) for u in ("channel", "weight", "channel_out"))
    assert len(weight) == sum(p.numel() for p in model.parameters())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(channel) == len(weight) - sum(c.weight.numel() - c.out_channels for c in convs)  # one unit per filter
    # channel_out: one unit per conv output channel in place of its filter and its BatchNorm's gamma and beta
    assert len(out) == len(channel) - 2 * sum(c.out_channels for c in convs)
    first_bn = next(e for e in channel.entries if e.kind == "element")
    assert channel.describe(first_bn.offset) == {"group": "conv1", "param": "bn.weight", "kind": "element",
                                                 "index": [0], "params": ["layers.conv1.bn.weight"]}
    assert channel.describe(1) == {"group": "conv1", "param": "conv.weight", "kind": "channel", "index": [1],
                                   "params": ["layers.conv1.conv.weight"]}
    assert out.describe(1) == {"group": "conv1", "param": "bn", "kind": "channel_out", "index": [1],
                               "params": ["layers.conv1.bn.weight", "layers.conv1.bn.bias"]}
    m = copy.deepcopy(model)
    channel.zero_(m, 1)
    assert float(m.layers.conv1.conv.weight[1].detach().abs().sum()) == 0
    assert float(m.layers.conv1.conv.weight[0].detach().abs().sum()) > 0
    with pytest.raises(ValueError, match="sample"):
        Units(model, "channel_out")


def test_channel_out_zeroes_the_activation_after_batchnorm(tiny_trained):
    cfg, model, data, run = tiny_trained
    x = data.batch(torch.arange(32))
    out, channel = units_of(model, data, "channel_out"), units_of(model, data, "channel")
    after_bn = {}
    for name, units in (("channel_out", out), ("channel", channel)):
        m = zeroed_copy(model, units, [3])  # channel 3 of the first conv
        m.layers.conv1.bn.register_forward_hook(lambda mod, i, o, name=name: after_bn.__setitem__(name, o.clone()))
        with torch.no_grad():
            m(x)
    assert torch.count_nonzero(after_bn["channel_out"][:, 3]) == 0  # exactly zero, every example and position
    assert torch.count_nonzero(after_bn["channel_out"][:, 2]) > 0
    bn = model.layers.conv1.bn  # a zeroed filter still leaves BatchNorm's constant beta - gamma * mean / std
    constant = bn.bias[3] - bn.weight[3] * bn.running_mean[3] / torch.sqrt(bn.running_var[3] + bn.eps)
    assert float(constant.detach().abs()) > 0
    assert torch.allclose(after_bn["channel"][:, 3], constant.detach().expand_as(after_bn["channel"][:, 3]), atol=1e-5)


def test_channel_out_score_is_activation_times_its_gradient(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel_out")
    m = copy.deepcopy(model).eval()
    x, y = batch(data, 0)
    kept = {}
    m.layers.conv2.bn.register_forward_hook(lambda mod, i, o: kept.__setitem__("a", o))
    m.layers.conv2.relu.inplace = False  # keep the BatchNorm output as it was
    logits = m(x)
    a = kept["a"]
    grads = torch.autograd.grad(objective(logits, y), [a] + [m.get_parameter(n) for n in units.grad_names])
    scores = units.scores(m, grads[1:])
    e = next(e for e in units.entries if e.module == "layers.conv2.bn")
    assert torch.allclose(scores[e.offset:e.offset + e.count], (a * grads[0]).sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- the batched search and the pieces

def searches(model, units, picks, data, n_eot, mode="mean_logits", ref=15, max_units=40):
    """(the plain loop's results, jobs for flip_batched) on the targets `picks`."""
    jobs, plain = [], {}
    for index, kind in picks:
        x, y = batch(data, index, ref)
        jobs.append((index, x, y, (0, index)))
        plain[index] = flip_sequential(model, units, x, y, max_units, n_eot, 0.01, (0, index), mode)
    return plain, jobs


@pytest.mark.parametrize("unit, n_eot, mode, n", [("channel", 2, "mean_logits", 3), ("channel", 0, "mean_logits", 2),
                                                  ("channel_out", 2, "mean_loss", 2), ("weight", 2, "mean_logits", 1)])
def test_batched_search_gives_the_plain_sequences(tiny_trained, unit, n_eot, mode, n):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, unit)
    plain, jobs = searches(model, units, targets(model, data, n), data, n_eot, mode)
    finished = list(flip_batched(model, units, iter(jobs), 3, 40, n_eot, 0.01, mode))
    assert sorted(k for k, _ in finished) == sorted(plain) and dict(finished) == plain
    assert max(len(r.units) for r in plain.values()) >= 2  # multi-step searches were compared


def test_near_ties_go_to_the_plain_step(tiny_trained, monkeypatch):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    plain, jobs = searches(model, units, targets(model, data, 1), data, 2)
    monkeypatch.setattr(flipping, "TIE", 10.0)  # every step a near-tie: every step is the plain loop's own
    batched = flipping._Batched(model, units, 40, 2, 0.01, "mean_logits")
    assert dict(batched.run(iter(jobs), 2)) == plain
    assert batched.settled == sum(len(r.units) + 1 for r in plain.values())  # each step and each last check


def test_steps_in_pieces_give_the_same_gradient_and_sequences(tiny_trained):
    """A step too large for `rows` runs without a graph first, then piece by piece from the objective's
    gradient with respect to the logits: the same gradient (to rounding) and the same unit sequences."""
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    x, y = batch(data, 3, 31)
    inp = step_input(x, 3, 0.01, (0, 3), 0)
    m = copy.deepcopy(model).eval().requires_grad_(True)
    params = [m.get_parameter(n) for n in units.grad_names]
    for mode in ("mean_logits", "mean_loss"):
        z, whole = search_step(m, params, inp, y, mode, None, lambda z: False)
        zp, pieces = search_step(m, params, inp, y, mode, 10, lambda z: False)  # 10 rows: 4 pieces per copy
        assert torch.equal(z, zp)
        for a, b in zip(whole, pieces):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for index, kind in targets(model, data, 2):
        x, y = batch(data, index)
        assert (flip_sequential(model, units, x, y, 40, 2, 0.01, (0, index), rows=7)
                == flip_sequential(model, units, x, y, 40, 2, 0.01, (0, index))), index
    # a step that ends the search (its flip check) needs no backward
    assert search_step(m, params, inp, y, "mean_logits", 10, lambda z: True)[1] is None


def test_graph_rows_follow_the_memory_budget(tiny_trained):
    cfg, model, data, run = tiny_trained
    x = data.batch(torch.arange(4))
    per_row = graph_bytes_per_row(copy.deepcopy(model).requires_grad_(True), x)
    conv1 = model.layers.conv1.conv.out_channels * 28 * 28 * 4  # at least the first conv's output is saved
    assert per_row >= conv1
    was = [p.requires_grad for p in model.parameters()]
    assert graph_rows(model, x, 100 * per_row) == 100 and graph_rows(model, x, 1) == 1
    assert [p.requires_grad for p in model.parameters()] == was  # left as it was


class SkipNet(nn.Module):
    """Not a plain sequence: a biased 1x1 conv (no BatchNorm after it) skips the second conv block, added
    in forward. forward(x, index=None), as the models the scripts take."""

    def __init__(self, cnn):
        super().__init__()
        self.layers = nn.ModuleDict({k: getattr(cnn.layers, k) for k in ("conv1", "conv2", "conv3", "head")})
        self.skip = nn.Conv2d(cnn.layers.conv1.conv.out_channels, cnn.layers.conv2.conv.out_channels, 1)
        for p in self.skip.parameters():
            nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))

    def forward(self, x, index=None):
        h = F.max_pool2d(self.layers.conv1(x), 2)
        h = F.max_pool2d(self.layers.conv2(h) + self.skip(h), 2)
        h = self.layers.conv3(h)
        return self.layers.head(F.adaptive_max_pool2d(h, 1).flatten(1))


def test_non_sequential_model_batched_with_the_same_answers(tiny_trained):
    cfg, model, data, run = tiny_trained
    net = SkipNet(copy.deepcopy(model)).eval()
    assert stages(net) is None
    fits = predict(net, data, "train", amp=False) == data.y_train
    picks = pick_targets(data, fits, 1, seed=0)
    for unit, n_eot in (("channel", 0), ("channel_out", 2)):
        units = Units(net, unit, sample=data.batch(torch.tensor([0])))
        plain, jobs = searches(net, units, picks, data, n_eot, max_units=30)
        assert dict(flip_batched(net, units, iter(jobs), 2, 30, n_eot, 0.01)) == plain
        assert max(len(r.units) for r in plain.values()) >= 2
    expected = next(iter(plain.values()))
    skip = [e for e in units.entries if e.module == "skip"]  # a conv without BatchNorm after it
    assert [(e.group, e.param, e.kind, e.names) for e in skip] == [("skip", "skip", "channel_out",
                                                                    ("skip.weight", "skip.bias"))]
    assert [e.group for e in units.entries if e.module == "layers.conv2.bn"] == ["layers.conv2"]
    # collateral damage without stages: whole forwards, the same predictions as a plain evaluation
    collateral = Collateral(net, data, collateral_sets(data, 40, seed=0))
    edited = zeroed_copy(net, units, expected.units)
    full = predict(edited, data, "train", collateral.train_idx, amp=False)
    assert torch.equal(collateral.predict(edited, units.changed(expected.units))[:len(full)], full)


def test_max_units_stops_the_search(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    for index, kind in targets(model, data, 3):
        x, y = batch(data, index)
        full = flip_sequential(model, units, x, y, 40, 2, 0.01, (0, index))
        if len(full.units) >= 2:
            capped = flip_sequential(model, units, x, y, 1, 2, 0.01, (0, index))
            assert capped.units == full.units[:1] and not capped.flipped and capped.prediction == int(y[0])
            assert dict(flip_batched(model, units, iter([(index, x, y, (0, index))]), 2, 1, 2, 0.01)) == {index: capped}
            return
    pytest.fail("no target needed two or more units: the cap was never exercised")


# ----------------------------------------------------------------------------- the experiment's choices

def test_examples_and_reference_batches(tiny_trained):
    cfg, model, data, run = tiny_trained
    picks = targets(model, data, 5)
    indices = [i for i, _ in picks]
    assert len(set(indices)) == 10
    assert [bool(data.noisy[i]) for i, _ in picks] == [True, False] * 5
    assert targets(model, data, 3) == picks[:6]  # a larger run extends a smaller one
    for i in indices:
        ref = reference_batch(data.n_train, i, 30, seed=0)
        assert len(set(ref.tolist())) == 30 and i not in ref.tolist() and int(ref.max()) < data.n_train
        assert torch.equal(ref, reference_batch(data.n_train, i, 30, seed=0))
    assert not torch.equal(reference_batch(data.n_train, indices[0], 30, 0),
                           reference_batch(data.n_train, indices[1], 30, 0))
    everyone = reference_batch(data.n_train, 7, data.n_train - 1, 0)
    assert sorted(everyone.tolist()) == [j for j in range(data.n_train) if j != 7]
    with pytest.raises(UserError, match="n_examples=1000"):
        targets(model, data, 1000)


def test_collateral_runs_edits_from_their_first_changed_stage(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    sets = collateral_sets(data, 40, seed=0)
    assert [len(sets[k]) for k in ("clean", "noisy", "test")] == [40, 40, 40]
    assert bool(data.noisy[sets["noisy"]].all()) and not bool(data.noisy[sets["clean"]].any())
    collateral = Collateral(model, data, sets)
    assert collateral.cache  # some stages' outputs are cached
    head = next(e for e in units.entries if e.group == "head")
    late = [head.offset, head.offset + 3]  # an edit of the head only
    edited = zeroed_copy(model, units, late)
    assert len(model.layers) - 2 in collateral.cache  # the head's input is cached
    full = predict(edited, data, "train", collateral.train_idx, amp=False)
    assert torch.equal(collateral.predict(edited, units.changed(late))[:len(full)], full)
    assert torch.equal(collateral.predict(edited)[:len(full)], full)
    index = int(sets["noisy"][0])
    after, drop = collateral(edited, units.changed(late), exclude=index)
    before = collateral.accuracies(collateral.before, exclude=index)
    hits = (full == data.y_train[collateral.train_idx])[40:][sets["noisy"] != index]
    assert after["noisy"] == pytest.approx(float(hits.float().mean())) and len(hits) == 39
    assert drop == pytest.approx({k: before[k] - after[k] for k in after})


def test_a_record_with_no_units_is_an_error(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    nothing = FlipResult([], True, 3)
    with pytest.raises(ValueError, match="0 units"):
        neuron_flipping.make_record(data, 0, "clean", units, nothing, {}, {}, 0.5, 0.0, "batched")
    record = neuron_flipping.make_record(data, 0, "clean", units, FlipResult([5], True, 3), {}, {}, 0.5, 1.0, "batched")
    assert record["n_units"] == 1 and record["units"] == [units.describe(5)] and record["search"] == "batched"
    assert record["margin"] == 0.5


def test_batchnorm_pass_overwrites_running_statistics_only(tiny_trained):
    cfg, model, data, run = tiny_trained
    m = copy.deepcopy(model)
    refresh_batchnorm(m, data, 64)
    assert not m.training
    for (name, a), b in zip(model.state_dict().items(), m.state_dict().values()):
        if "running" in name:
            assert not torch.equal(a, b), name
        elif "num_batches" not in name:
            assert torch.equal(a, b), name
    bn = m.layers.conv1.bn  # running = 0.9 * running + 0.1 * batch statistic, batch after batch
    expected = model.layers.conv1.bn.running_mean.clone()
    with torch.no_grad():
        for idx in torch.arange(data.n_train).split(64):
            h = model.layers.conv1.conv(data.batch(idx))
            expected = 0.9 * expected + 0.1 * h.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)


# ----------------------------------------------------------------------------- the script

def test_targets_per_forward(monkeypatch):
    slots = neuron_flipping.slots_for
    assert neuron_flipping.KNOBS["batch_targets"] == 0  # the default: auto
    assert slots(0, torch.device("cpu"), 10 ** 6, 2560) == 1 and slots(0, torch.device("mps"), 10 ** 6, 2560) == 1
    assert slots(0, torch.device("cuda"), 3 * 2 * 2560 + 5, 2560) == 3 and slots(0, torch.device("cuda:1"), 100, 2560) == 1
    assert slots(0, torch.device("cuda"), 10 ** 9, 2560) == neuron_flipping.MAX_SLOTS
    assert slots(4, torch.device("cpu"), 1, 2560) == 4  # asked for: as asked
    budget = neuron_flipping.graph_budget
    assert budget(2, torch.device("cpu")) == 2 * 2 ** 30 and budget(0, torch.device("cpu")) == 1.5 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80e9))
    assert budget(0, torch.device("cuda")) == 20e9 and budget(2, torch.device("cuda")) == 2 * 2 ** 30


def test_margins_and_matching(tiny_trained):
    cfg, model, data, run = tiny_trained
    margin = margins(model, data)
    with torch.no_grad():
        logits = model(data.batch(torch.arange(5)))
    label = data.y_train[:5]
    other = logits.clone()
    other[torch.arange(5), label] = -torch.inf
    assert torch.allclose(margin[:5], logits[torch.arange(5), label] - other.max(1).values, atol=1e-5)
    fits = predict(model, data, "train", amp=False) == data.y_train
    assert torch.equal(margin > 0, fits.cpu())
    m = torch.tensor([0.0, 5.0, 1.0, 2.0, 1.5, 1.0])
    assert nearest_on_margin(m, 1.2, [1, 2, 3, 4, 5], set()) == 2  # 1.0 at 2 and 5: the first in pool order
    assert nearest_on_margin(m, 1.2, [5, 4, 3, 2], set()) == 5
    assert nearest_on_margin(m, 1.2, [1, 2, 3, 4, 5], {2, 5}) == 4
    assert nearest_on_margin(m, 1.2, [2], {2}) is None


def test_plan_targets_matches_each_noisy_target_once():
    cfg = types.SimpleNamespace(n_examples=2, matched=True)
    order = {"noisy": [10, 11, 12], "clean": [20, 21, 22, 23]}
    margin = torch.zeros(30)
    margin[[10, 11, 12]] = torch.tensor([0.5, 0.6, 3.0])
    margin[[20, 21, 22, 23]] = torch.tensor([4.0, 0.55, 0.58, 9.0])
    chosen, todo = neuron_flipping.plan_targets(cfg, order, margin, {}, {})
    assert chosen == {"noisy": [], "clean": []} and todo == [(10, "noisy"), (20, "clean"), (11, "noisy"), (21, "clean")]
    done = {i: {} for i in (10, 20, 21)}
    chosen, todo = neuron_flipping.plan_targets(cfg, order, margin, done, {11: {}})  # 11 passed over
    assert chosen == {"noisy": [10], "clean": [20, 21]} and todo == [(12, "noisy")]
    done.update({12: {}})
    chosen, todo = neuron_flipping.plan_targets(cfg, order, margin, done, {11: {}})
    # noisy 10 (0.5) -> clean 21 (0.55, already searched as a clean target); noisy 12 (3.0) -> 20 (4.0)
    assert chosen == {"noisy": [10, 12], "clean": [20, 21], "clean_matched": [21, 20]} and todo == []
    chosen, todo = neuron_flipping.plan_targets(cfg, order, margin, done, {11: {}, 21: {}})
    # 21 passed over: clean takes 22; noisy 10 -> 22 (0.58, searched once for both kinds), noisy 12 -> 20
    assert chosen["clean"] == [20] and chosen["clean_matched"] == [20] and todo == [(22, "clean")]
    cfg.matched = False
    assert "clean_matched" not in neuron_flipping.plan_targets(cfg, order, margin, done, {11: {}})[0]


def test_result_files_keep_variants_apart():
    cfg = lambda **k: type("Cfg", (), {"unit": "channel", "bn_train": False, **k})
    assert neuron_flipping.results_file(cfg()) == "neuron_flipping.json"
    assert neuron_flipping.results_file(cfg(), ".partial.json") == "neuron_flipping.partial.json"
    assert neuron_flipping.results_file(cfg(unit="channel_out")) == "neuron_flipping_channel_out.json"
    assert neuron_flipping.results_file(cfg(bn_train=True), ".png") == "neuron_flipping_bntrain.png"
    assert neuron_flipping.results_file(cfg(objective="mean_loss", bn_train=True)) == "neuron_flipping_mean_loss_bntrain.json"
    names = {neuron_flipping.results_file(cfg(unit=u, bn_train=b)) for u in ("channel", "channel_out", "weight")
             for b in (False, True)}
    assert len(names) == 6


def test_flipped_predictions_are_real(tiny_trained, run_copy, monkeypatch, capsys):
    cfg, model, data, run = tiny_trained
    argv, run_dir = run_copy
    results = neuron_flipping.main(argv())
    assert "warning" not in capsys.readouterr().out  # the tiny run memorized its noisy examples
    assert results["search"] == "sequential" and {r["search"] for r in results["records"]} == {"sequential"}
    assert (run_dir / "neuron_flipping.json").is_file() and not (run_dir / "neuron_flipping.partial.json").exists()
    assert (run_dir / "neuron_flipping.png").is_file() and (run_dir / "neuron_flipping_examples.png").is_file()
    records = results["records"]
    assert [r["kind"] for r in records] == ["noisy", "clean", "clean_matched"] * 3
    assert len({r["index"] for r in records if r["kind"] != "clean_matched"}) == 6
    assert any(r["flipped"] for r in records)
    assert results["settings"]["n_eot"] == 2 and results["settings"]["bn_train"] is False
    assert results["settings"]["objective"] == "mean_logits"
    assert {"config", "settings", "groups", "baseline", "summary", "records"} <= set(results)
    margin = margins(model, data)
    for r in records:
        assert r["n_units"] == len(r["units"]) > 0
        assert r["margin"] == pytest.approx(float(margin[r["index"]])) and r["margin"] > 0
        edited = copy.deepcopy(model).eval()
        with torch.no_grad():
            for u in r["units"]:  # rebuilt from the JSON description alone
                for name in u["params"]:
                    edited.get_parameter(name)[tuple(u["index"])] = 0
        # the flip was judged on the last step's noised copies; the edit holds on those copies
        idx = torch.cat([torch.tensor([r["index"]]), reference_batch(data.n_train, r["index"], 15, 0)])
        x = data.batch(idx)
        inp = eot_inputs(x, 2, 0.01, generator(0, "neuron_flipping", "eot", r["index"], r["n_units"]))
        with torch.no_grad():
            assert target_prediction(torch.cat([edited(c) for c in inp.split(len(idx))]), len(idx)) == r["prediction"]
        assert (r["prediction"] != r["label"]) == r["flipped"]
        assert r["label"] == int(data.y_train[r["index"]]) and r["true_label"] == int(data.y_true[r["index"]])
        assert set(r["accuracy_after"]) == set(r["accuracy_drop"]) == {"clean", "noisy", "noisy_true", "test"}
        assert r["seconds"] > 0
    # each margin-matched target: a clean example, matched to the noisy target beside it, and no clean
    # candidate left (not matched before, not passed over) is nearer to that noisy target's margin
    noisy = [r for r in records if r["kind"] == "noisy"]
    matched = [r for r in records if r["kind"] == "clean_matched"]
    pool = [i for i in range(data.n_train) if not bool(data.noisy[i]) and float(margin[i]) > 0
            and i not in {p["index"] for p in results["passed_over"]}]
    taken = set()
    for n, m in zip(noisy, matched):
        assert m["matched_to"] == n["index"] and not bool(data.noisy[m["index"]]) and m["index"] not in taken
        best = min(abs(float(margin[i]) - n["margin"]) for i in pool if i not in taken)
        assert abs(m["margin"] - n["margin"]) == pytest.approx(best)
        taken.add(m["index"])
    s = results["summary"]
    assert s["noisy"]["n"] == s["clean"]["n"] == s["clean_matched"]["n"] == 3 and 0 <= s["noisy"]["flipped"] <= 1
    assert s["noisy"]["units_q1"] <= s["noisy"]["units_median"] <= s["noisy"]["units_q3"]

    # the batched search on the same run: the nine records are reused (it is not a setting), one more
    # target of each kind is searched, several in one forward
    calls, batched = [], neuron_flipping.flip_batched

    def counted(*args):
        calls.append(1)
        yield from batched(*args)
    monkeypatch.setattr(neuron_flipping, "flip_batched", counted)
    for plot in ("plot_summary", "plot_examples"):
        monkeypatch.setattr(neuron_flipping, plot, lambda *a: None)
    more = neuron_flipping.main(argv("--batch_targets=3", "--n_examples=4"))
    assert more["search"] == "batched" and more["records"][:9] == records and calls
    assert all(("matched_to" in r) == (r["kind"] == "clean_matched") for r in more["records"])
    new = [r for r in more["records"][9:] if r["index"] not in {q["index"] for q in records}]
    assert new and {r["search"] for r in new} == {"batched"}


def test_variants_write_their_own_files(run_copy, monkeypatch, capsys):
    argv, run_dir = run_copy
    monkeypatch.setattr(neuron_flipping.claims, "MEMORIZED", 1.01)  # as if the run had not memorized
    results = neuron_flipping.main(argv("--n_examples=1", "--unit=channel_out", "--bn_train=True", "--n_show=1",
                                        "--matched=False", "--objective=mean_loss"))
    assert "not memorized them, so what flipping them shows is inconclusive" in capsys.readouterr().out
    assert (run_dir / "neuron_flipping_channel_out_mean_loss_bntrain.json").is_file()
    assert (run_dir / "neuron_flipping_channel_out_mean_loss_bntrain.png").is_file()
    assert not (run_dir / "neuron_flipping.json").exists()
    assert results["settings"]["bn_train"] is True and results["settings"]["unit"] == "channel_out"
    assert results["settings"]["objective"] == "mean_loss" and [r["kind"] for r in results["records"]] == ["noisy", "clean"]
    assert {u["kind"] for r in results["records"] for u in r["units"]} <= {"channel_out", "element"}


def test_interrupted_run_resumes_without_duplicates(tiny_trained, run_copy, monkeypatch):
    make_argv, run_dir = run_copy
    argv = make_argv("--n_examples=2", "--matched=False")
    calls, original = [], neuron_flipping.flip_sequential
    for plot in ("plot_summary", "plot_examples"):  # figures are checked elsewhere; four runs here
        monkeypatch.setattr(neuron_flipping, plot, lambda *a: None)

    def flip_then_stop(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C after three examples
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(neuron_flipping, "flip_sequential", flip_then_stop)
    with pytest.raises(KeyboardInterrupt):
        neuron_flipping.main(argv)
    partial = read_json(run_dir / "neuron_flipping.partial.json")
    assert len(partial["records"]) + len(partial["passed_over"]) == 3 and not (run_dir / "neuron_flipping.json").exists()

    calls.clear()
    monkeypatch.setattr(neuron_flipping, "flip_sequential", lambda *a: (calls.append(1), original(*a))[1])
    resumed = neuron_flipping.main(argv)
    assert len(calls) == 4 - len(partial["records"]) + len(resumed["passed_over"]) - len(partial["passed_over"])
    assert len(resumed["records"]) == 4 and len({r["index"] for r in resumed["records"]}) == 4

    (run_dir / "neuron_flipping.json").unlink()
    calls.clear()
    fresh = neuron_flipping.main(argv)  # uninterrupted, from scratch
    assert len(calls) == 4 + len(fresh["passed_over"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(fresh["records"]) == strip(resumed["records"])

    # more examples later: the four done are reused, only the new ones are computed (the margin-matched
    # targets of a clean example already searched are not searched again)
    calls.clear()
    more = neuron_flipping.main(argv[:-1] + ["--n_examples=3", "--matched=True"])
    new = {r["index"] for r in more["records"]} - {r["index"] for r in fresh["records"]}
    assert len(calls) == len(new) + len(more["passed_over"]) - len(fresh["passed_over"])
    assert strip([r for r in more["records"] if r["kind"] != "clean_matched"][:4]) == strip(fresh["records"])
    assert [r["kind"] for r in more["records"]] == ["noisy", "clean", "clean_matched"] * 3


def test_bad_input_exits_2_with_one_line(run_copy):
    make_argv, run_dir = run_copy
    argv = make_argv("--n_examples=100000")
    before = sorted(p.name for p in run_dir.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / "neuron_flipping.py"), *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_examples=100000" in lines[0] and "--n_examples=" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    proc = subprocess.run([sys.executable, str(REPO / "neuron_flipping.py"), *make_argv("--objective=mean_grad")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "objective 'mean_grad'" in lines[0] and "mean_logits, mean_loss" in lines[0]
