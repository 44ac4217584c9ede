"""neuron_flipping.py: the criterion (objective, noise, units), the fast path against the reference loop
(any architecture), the records, the stop, resume, the result files."""
import copy
import math
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
from common.flipping import (LAMBDA, ROUNDOFF, Collateral, FlipResult, Flipper, Units, _reference_scores,
                             collateral_sets, eot_inputs, filter_tolerance, flip_sequential, objective, pick_targets,
                             reference_batch, refresh_batchnorm, step_copies, target_prediction, zeroed_copy)
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
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    ce = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)]
    # the target's (row 0) term times -|B|, then the mean over the batch
    assert float(objective(logits, y)) == pytest.approx((-3 * ce[0] + ce[1] + ce[2]) / 3, rel=1e-6)
    # two noised copies stacked copy-major: the mean of the copies' objectives
    other = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    ce2 = [math.log(2), math.log(1 + math.exp(3)), math.log(1 + math.exp(2))]
    expected = ((-3 * ce[0] + ce[1] + ce[2]) / 3 + (-3 * ce2[0] + ce2[1] + ce2[2]) / 3) / 2
    assert float(objective(torch.cat([logits, other]), y)) == pytest.approx(expected, rel=1e-6)
    # the flip is judged on the target's logits averaged over the copies: (2, 0) and (0, 0) -> class 0;
    # with a third copy (0, 5) the average is (2/3, 5/3) -> class 1
    assert target_prediction([logits, other]) == 0
    assert target_prediction([logits, other, torch.tensor([[0.0, 5.0], [0, 0], [0, 0]])]) == 1


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


# ----------------------------------------------------------------------------- the fast path and the reference

@pytest.mark.parametrize("unit, n_eot, ref, n", [("channel", 0, 15, 3), ("channel", 2, 15, 2), ("channel_out", 2, 15, 1),
                                                  ("weight", 0, 15, 1), ("channel", 5, 511, 1)])
def test_fast_path_gives_the_reference_sequences(tiny_trained, unit, n_eot, ref, n):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, unit)
    flipper = Flipper(model, units)
    lengths = []
    for index, kind in targets(model, data, n):
        x, y = batch(data, index, ref)
        expected = flip_sequential(model, units, x, y, 40, n_eot, 0.01, (0, index))
        assert flipper.flip(x, y, 40, n_eot, 0.01, (0, index)) == expected, (index, kind)
        lengths.append(len(expected.units))
    assert max(lengths) >= 2 and flipper.steps == sum(lengths)  # multi-step searches were compared


def test_near_ties_are_settled_with_the_references_own_scores(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    always = Flipper(model, units, tolerance=lambda conv, inp, g: torch.full((conv.out_channels,), 1e9))
    index = targets(model, data, 1)[1][0]  # a clean example: several units
    x, y = batch(data, index)
    ref = flip_sequential(model, units, x, y, 40, 2, 0.01, (0, index))
    assert always.flip(x, y, 40, 2, 0.01, (0, index)) == ref  # every step: every filter ambiguous
    n_convs = sum(e.kind == "channel" for e in units.entries)
    assert always.exact_steps == always.steps == len(ref.units) > 0 and always.exact_layers == n_convs * always.steps


@pytest.mark.parametrize("unit", ["channel", "channel_out"])
def test_fast_scores_against_the_reference_scores(tiny_trained, unit):
    """Parameter-gradient scores and the settled filter scores are bitwise the reference's; the fast
    filter scores are within their tolerance of it."""
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, unit)
    x, y = batch(data, 3, 63)
    copies = step_copies(x, 2, 0.01, (0, 3), 0)
    m = copy.deepcopy(model).eval().requires_grad_(True)
    _, expected = _reference_scores(m, units, copies, y)
    flipper = Flipper(model, units)
    with strict_fp32():
        scores, tols, kept = flipper._combine([flipper._copy_pass(c, y, None, 0, retain=False)[1] for c in copies])
    exact = tols == 0
    assert torch.equal(scores[exact], expected[exact])
    assert bool((tols[~exact] > 0).all()) and bool(((scores - expected).abs() <= tols)[~exact].all())
    for i in flipper.conv_entries:
        e = units.entries[i]
        assert torch.equal(flipper._exact_scores(i, kept), expected[e.offset:e.offset + e.count])
    assert (unit == "channel") == bool((~exact).any())  # channel_out needs no filter scores here


@pytest.mark.parametrize("shape", [dict(), dict(stride=2, padding=2, kernel_size=5), dict(groups=4, padding=1),
                                   dict(dilation=2, padding=3), dict(padding=1, padding_mode="reflect"),
                                   dict(padding="same", padding_mode="circular"),
                                   dict(groups=8, stride=(2, 1), kernel_size=(3, 5), padding=(0, 2))])
def test_filter_tolerance_bounds_the_rounding_of_a_filter_score(shape):
    """The tolerance's S' (squares summed over each group's channels, then over the kernel window) is the
    Cauchy-Schwarz bound ||W_c|| sum |g| ||input patch|| -- computed here in float64 as a convolution of
    in^2 with ones over the group's channels -- a little above it (its fp32 rounding), and that bound is
    above S = sum |w * in * g|."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 16, **{"kernel_size": 3, **shape})
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    x = F.relu(torch.randn(3, 8, 11, 13, generator=gen)).contiguous(memory_format=torch.channels_last)
    g = torch.randn(conv(x).shape, generator=gen).contiguous(memory_format=torch.channels_last)
    tol = filter_tolerance(conv, x, g).double()
    c64, x64, g64 = copy.deepcopy(conv).double(), x.double(), g.double()
    ones = torch.ones((conv.groups, conv.in_channels // conv.groups) + conv.kernel_size, dtype=torch.float64)
    patch = c64._conv_forward(x64.square(), ones, None).sqrt()  # (N, groups, H', W')
    patch = patch.repeat_interleave(conv.out_channels // conv.groups, dim=1)
    bound = c64.weight.flatten(1).norm(dim=1) * (g64.abs() * patch).sum((0, 2, 3))
    s = (g64.abs() * c64._conv_forward(x64.abs(), c64.weight.abs(), None)).sum((0, 2, 3))
    assert bool((bound >= s).all())
    short = LAMBDA * math.sqrt(conv.weight[0].numel() * g.numel() // g.shape[1]) * ROUNDOFF
    ratio = tol / (2 * short * bound)
    assert bool((ratio >= 1).all()) and bool((ratio <= 1 + 5 * short).all())


def test_one_flipper_across_copy_counts(tiny_trained):
    """A Flipper keeps a step's conv inputs and gradients until the next step's copies replace them (released
    one by one) and releases them when a search ends: searches with different numbers of copies, one after
    the other on one Flipper, keep the reference's answers."""
    cfg, model, data, run = tiny_trained
    units = units_of(model, data, "channel")
    flipper = Flipper(model, units)
    (a, _), (b, _) = targets(model, data, 1)
    for index, n_eot in ((a, 2), (b, 0), (a, 3), (b, 2)):
        x, y = batch(data, index)
        assert flipper.flip(x, y, 40, n_eot, 0.01, (0, index)) == flip_sequential(model, units, x, y, 40, n_eot, 0.01,
                                                                                  (0, index)), (index, n_eot)
        assert flipper.held == []
    assert flipper.steps >= 4


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


def test_non_sequential_model_runs_whole_forwards_with_the_same_answers(tiny_trained):
    cfg, model, data, run = tiny_trained
    net = SkipNet(copy.deepcopy(model)).eval()
    assert stages(net) is None
    fits = predict(net, data, "train", amp=False) == data.y_train
    picks = pick_targets(data, fits, 1, seed=0)
    for unit, n_eot in (("channel", 0), ("channel_out", 2)):
        units = Units(net, unit, sample=data.batch(torch.tensor([0])))
        flipper, lengths = Flipper(net, units), []
        for index, kind in picks:
            x, y = batch(data, index)
            expected = flip_sequential(net, units, x, y, 30, n_eot, 0.01, (0, index))
            assert flipper.flip(x, y, 30, n_eot, 0.01, (0, index)) == expected
            lengths.append(len(expected.units))
        assert max(lengths) >= 2
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
            capped = Flipper(model, units).flip(x, y, 1, 2, 0.01, (0, index))
            assert capped.units == full.units[:1] and not capped.flipped and capped.prediction == int(y[0])
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
        neuron_flipping.make_record(data, 0, "clean", units, nothing, {}, {}, 0, 0.0, "fast")
    record = neuron_flipping.make_record(data, 0, "clean", units, FlipResult([5], True, 3), {}, {}, 0, 1.0, "fast")
    assert record["n_units"] == 1 and record["units"] == [units.describe(5)] and record["search"] == "fast"


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

def test_fast_knob_auto_is_the_fast_path_on_a_cpu_only():
    use_fast = neuron_flipping.use_fast
    assert neuron_flipping.KNOBS["fast"] is None  # the default: auto
    for auto in (None, "auto"):
        assert use_fast(auto, torch.device("cpu")) is True
        assert use_fast(auto, torch.device("cuda")) is False and use_fast(auto, torch.device("cuda:1")) is False
        assert use_fast(auto, torch.device("mps")) is False
    assert use_fast(True, torch.device("cuda")) is True and use_fast(False, torch.device("cpu")) is False
    parse = lambda *argv: config.parse(neuron_flipping.KNOBS, argv).fast
    assert parse() is None and parse("--fast=auto") == "auto"
    assert parse("--fast=True") is True and parse("--fast=False") is False
    for bad in ("--fast=yes", "--fast=1", "--fast=0", "--fast=[True]"):
        with pytest.raises(UserError, match="fast="):
            parse(bad)


def test_result_files_keep_variants_apart():
    cfg = lambda **k: type("Cfg", (), {"unit": "channel", "bn_train": False, **k})
    assert neuron_flipping.results_file(cfg()) == "neuron_flipping.json"
    assert neuron_flipping.results_file(cfg(), ".partial.json") == "neuron_flipping.partial.json"
    assert neuron_flipping.results_file(cfg(unit="channel_out")) == "neuron_flipping_channel_out.json"
    assert neuron_flipping.results_file(cfg(bn_train=True), ".png") == "neuron_flipping_bntrain.png"
    names = {neuron_flipping.results_file(cfg(unit=u, bn_train=b)) for u in ("channel", "channel_out", "weight")
             for b in (False, True)}
    assert len(names) == 6


def test_flipped_predictions_are_real(tiny_trained, run_copy, monkeypatch):
    cfg, model, data, run = tiny_trained
    argv, run_dir = run_copy
    results = neuron_flipping.main(argv())
    assert results["search"] == "fast" and {r["search"] for r in results["records"]} == {"fast"}  # auto on a CPU
    assert (run_dir / "neuron_flipping.json").is_file() and not (run_dir / "neuron_flipping.partial.json").exists()
    assert (run_dir / "neuron_flipping.png").is_file() and (run_dir / "neuron_flipping_examples.png").is_file()
    records = results["records"]
    assert [r["kind"] for r in records] == ["noisy", "clean"] * 3 and len({r["index"] for r in records}) == 6
    assert any(r["flipped"] for r in records)
    assert results["settings"]["n_eot"] == 2 and results["settings"]["bn_train"] is False
    assert {"config", "settings", "groups", "baseline", "summary", "records"} <= set(results)
    for r in records:
        assert r["n_units"] == len(r["units"]) > 0
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
            assert target_prediction([edited(c) for c in inp.split(len(idx))]) == r["prediction"]
        assert (r["prediction"] != r["label"]) == r["flipped"]
        assert r["label"] == int(data.y_train[r["index"]]) and r["true_label"] == int(data.y_true[r["index"]])
        assert set(r["accuracy_after"]) == set(r["accuracy_drop"]) == {"clean", "noisy", "noisy_true", "test"}
        assert r["seconds"] > 0
    s = results["summary"]
    assert s["noisy"]["n"] == s["clean"]["n"] == 3 and 0 <= s["noisy"]["flipped"] <= 1
    assert s["noisy"]["units_q1"] <= s["noisy"]["units_median"] <= s["noisy"]["units_q3"]

    # the plain loop on the same run: the six records are reused (`fast` is not a setting), one more
    # target of each kind is searched by the plain loop, every step its reference computation
    calls, plain = [], neuron_flipping.flip_sequential
    monkeypatch.setattr(neuron_flipping, "flip_sequential", lambda *a: (calls.append(1), plain(*a))[1])
    for plot in ("plot_summary", "plot_examples"):
        monkeypatch.setattr(neuron_flipping, plot, lambda *a: None)
    more = neuron_flipping.main(argv("--fast=False", "--n_examples=4"))
    assert more["search"] == "sequential" and more["records"][:6] == records
    assert len(calls) == 2 + len(more["passed_over"]) - len(results["passed_over"])
    assert [r["search"] for r in more["records"][6:]] == ["sequential"] * 2
    assert all(r["reference_steps"] == r["n_units"] for r in more["records"][6:])


def test_variants_write_their_own_files(run_copy):
    argv, run_dir = run_copy
    results = neuron_flipping.main(argv("--n_examples=1", "--unit=channel_out", "--bn_train=True", "--n_show=1"))
    assert (run_dir / "neuron_flipping_channel_out_bntrain.json").is_file()
    assert (run_dir / "neuron_flipping_channel_out_bntrain.png").is_file()
    assert not (run_dir / "neuron_flipping.json").exists()
    assert results["settings"]["bn_train"] is True and results["settings"]["unit"] == "channel_out"
    assert {u["kind"] for r in results["records"] for u in r["units"]} <= {"channel_out", "element"}


def test_interrupted_run_resumes_without_duplicates(tiny_trained, run_copy, monkeypatch):
    make_argv, run_dir = run_copy
    argv = make_argv("--n_examples=2")
    calls, original = [], Flipper.flip
    for plot in ("plot_summary", "plot_examples"):  # figures are checked elsewhere; four runs here
        monkeypatch.setattr(neuron_flipping, plot, lambda *a: None)

    def flip_then_stop(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C after three examples
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Flipper, "flip", flip_then_stop)
    with pytest.raises(KeyboardInterrupt):
        neuron_flipping.main(argv)
    partial = read_json(run_dir / "neuron_flipping.partial.json")
    assert len(partial["records"]) + len(partial["passed_over"]) == 3 and not (run_dir / "neuron_flipping.json").exists()

    calls.clear()
    monkeypatch.setattr(Flipper, "flip", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    resumed = neuron_flipping.main(argv)
    assert len(calls) == 4 - len(partial["records"]) + len(resumed["passed_over"]) - len(partial["passed_over"])
    assert len(resumed["records"]) == 4 and len({r["index"] for r in resumed["records"]}) == 4

    (run_dir / "neuron_flipping.json").unlink()
    calls.clear()
    fresh = neuron_flipping.main(argv)  # uninterrupted, from scratch
    assert len(calls) == 4 + len(fresh["passed_over"])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(fresh["records"]) == strip(resumed["records"])

    # more examples later: the four done are reused, only the new ones are computed
    calls.clear()
    more = neuron_flipping.main(argv + ["--n_examples=3"])
    assert len(calls) == 2 + len(more["passed_over"]) - len(fresh["passed_over"])
    assert strip(more["records"][:4]) == strip(fresh["records"])


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
    proc = subprocess.run([sys.executable, str(REPO / "neuron_flipping.py"), *make_argv("--fast=maybe")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "fast='maybe'" in lines[0] and "--fast=auto" in lines[0]
