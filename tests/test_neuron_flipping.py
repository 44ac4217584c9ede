"""neuron_flipping.py: the greedy search (reference and fast path agree), the records, the stop, resume."""
import copy
import shutil
import subprocess
import sys

import pytest
import torch

import neuron_flipping
from common.cli import UserError
from common.evaluation import predict
from common.flipping import (Collateral, Flipper, Units, collateral_sets, flip_sequential, pick_targets,
                             reference_batch, zeroed_copy)
from common.rng import generator
from common.runs import read_json
from conftest import REPO

SMALL = ["--n_examples=3", "--ref_batch=15", "--max_units=40", "--collateral_n=40", "--n_show=2"]


def batch(data, index, size=15, seed=0):
    idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, size, seed)])
    return data.batch(idx), data.labels(idx)


def targets(model, data, n):
    return pick_targets(data, predict(model, data, "train") == data.y_train, n, seed=0)


@pytest.fixture
def run_copy(tiny_trained, tmp_path):
    """(argv(*extra), run directory): the script on a private copy of the tiny finished run."""
    cfg, model, data, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)
    argv = lambda *extra: [f"--dataset={cfg.dataset}", f"--runs_dir={runs}", "--model=cnn", "--width=0.5",
                           "--epochs=20", "--batch_size=64", "--lr=0.05", "--device=cpu", *SMALL, *extra]
    return argv, runs / run.dir.name


@pytest.mark.parametrize("unit, n_eot, n", [("channel", 0, 3), ("channel", 2, 1), ("weight", 0, 1)])
def test_fast_path_gives_the_reference_sequences(tiny_trained, unit, n_eot, n):
    cfg, model, data, run = tiny_trained
    model.eval()
    units = Units(model, unit)
    flipper = Flipper(model, units)
    lengths = []
    for index, kind in targets(model, data, n):
        x, y = batch(data, index)
        ref = flip_sequential(model, units, x, y, 40, n_eot, 0.01, generator(0, "eot", index))
        fast = flipper.flip(x, y, 40, n_eot, 0.01, generator(0, "eot", index))
        assert fast == ref, (index, kind)
        lengths.append(len(ref.units))
    assert max(lengths) >= 2 and flipper.steps == sum(lengths)  # multi-step searches were compared


def test_ambiguous_steps_fall_back_to_the_reference(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = Units(model.eval(), "channel")
    always = Flipper(model, units, rtol=1e3)  # every filter score "within rounding": every step asks the reference
    index = targets(model, data, 1)[1][0]  # a clean example: several units
    x, y = batch(data, index)
    ref = flip_sequential(model, units, x, y, 40)
    assert always.flip(x, y, 40) == ref and always.exact_steps == always.steps == len(ref.units) > 0


def test_units_cover_every_parameter_once(tiny_trained):
    cfg, model, data, run = tiny_trained
    channel, weight = Units(model, "channel"), Units(model, "weight")
    assert len(weight) == sum(p.numel() for p in model.parameters())
    filters = [p for p in model.parameters() if p.ndim == 4]
    assert len(channel) == len(weight) - sum(p.numel() - p.shape[0] for p in filters)  # one unit per filter
    first_bn = next(e for e in channel.entries if not e.channel)
    assert channel.describe(first_bn.offset) == {"group": "conv1", "param": "bn.weight", "kind": "element",
                                                 "index": [0]}
    assert channel.describe(1) == {"group": "conv1", "param": "conv.weight", "kind": "channel", "index": [1]}
    m = copy.deepcopy(model)
    channel.zero_(m, 1)
    assert float(m.layers.conv1.conv.weight[1].detach().abs().sum()) == 0
    assert float(m.layers.conv1.conv.weight[0].detach().abs().sum()) > 0


def test_max_units_stops_the_search(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = Units(model.eval(), "channel")
    for index, kind in targets(model, data, 3):
        x, y = batch(data, index)
        full = flip_sequential(model, units, x, y, 40)
        if len(full.units) >= 2:
            capped = Flipper(model, units).flip(x, y, 1)
            assert capped.units == full.units[:1] and not capped.flipped and capped.prediction == int(y[0])
            return
    pytest.fail("no target needed two or more units: the cap was never exercised")


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


def test_collateral_runs_edits_from_their_first_changed_layer(tiny_trained):
    cfg, model, data, run = tiny_trained
    units = Units(model.eval(), "channel")
    sets = collateral_sets(data, 40, seed=0)
    assert [len(sets[k]) for k in ("clean", "noisy", "test")] == [40, 40, 40]
    assert bool(data.noisy[sets["noisy"]].all()) and not bool(data.noisy[sets["clean"]].any())
    collateral = Collateral(model, data, sets)
    assert collateral.cache  # some layers' outputs are cached
    head = next(e for e in units.entries if e.group == "head")
    late = [head.offset, head.offset + 3]  # an edit of the head only
    edited = zeroed_copy(model, units, late)
    first = units.top_layer(late[0])
    assert first == len(model.layers) - 1 and first - 1 in collateral.cache
    full = predict(edited, data, "train", collateral.train_idx)
    assert torch.equal(collateral.predict(edited, first)[:len(full)], full)
    assert torch.equal(collateral.predict(edited, 0)[:len(full)], full)
    index = int(sets["noisy"][0])
    after, drop = collateral(edited, first, exclude=index)
    before = collateral.accuracies(collateral.before, exclude=index)
    hits = (full == data.y_train[collateral.train_idx])[40:][sets["noisy"] != index]
    assert after["noisy"] == pytest.approx(float(hits.float().mean())) and len(hits) == 39
    assert drop == pytest.approx({k: before[k] - after[k] for k in after})


def test_flipped_predictions_are_real(tiny_trained, run_copy):
    cfg, model, data, run = tiny_trained
    argv, run_dir = run_copy
    results = neuron_flipping.main(argv())
    assert (run_dir / "neuron_flipping.json").is_file() and not (run_dir / "neuron_flipping.partial.json").exists()
    assert (run_dir / "neuron_flipping.png").is_file() and (run_dir / "neuron_flipping_examples.png").is_file()
    records = results["records"]
    assert [r["kind"] for r in records] == ["noisy", "clean"] * 3 and len({r["index"] for r in records}) == 6
    assert any(r["flipped"] for r in records)
    for r in records:
        edited = copy.deepcopy(model).eval()
        with torch.no_grad():
            for u in r["units"]:  # rebuilt from the JSON description alone
                edited.get_parameter(f"layers.{u['group']}.{u['param']}")[tuple(u["index"])] = 0
        pred = int(predict(edited, data, "train", torch.tensor([r["index"]]))[0])
        assert pred == r["prediction"]
        assert (pred != r["label"]) == r["flipped"]
        assert r["label"] == int(data.y_train[r["index"]]) and r["true_label"] == int(data.y_true[r["index"]])
        assert set(r["accuracy_after"]) == set(r["accuracy_drop"]) == {"clean", "noisy", "noisy_true", "test"}
    s = results["summary"]
    assert s["noisy"]["n"] == s["clean"]["n"] == 3 and 0 <= s["noisy"]["flipped"] <= 1
    assert s["noisy"]["units_q1"] <= s["noisy"]["units_median"] <= s["noisy"]["units_q3"]


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
    assert len(partial["records"]) == 3 and not (run_dir / "neuron_flipping.json").exists()

    calls.clear()
    monkeypatch.setattr(Flipper, "flip", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    resumed = neuron_flipping.main(argv)
    assert len(calls) == 1  # only the example left
    assert len(resumed["records"]) == 4 and len({r["index"] for r in resumed["records"]}) == 4

    (run_dir / "neuron_flipping.json").unlink()
    calls.clear()
    fresh = neuron_flipping.main(argv)  # uninterrupted, from scratch
    assert len(calls) == 4
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(fresh["records"]) == strip(resumed["records"])

    # more examples later: the six done are reused, only the new ones are computed
    calls.clear()
    more = neuron_flipping.main(argv + ["--n_examples=3"])
    assert len(calls) == 2 and strip(more["records"][:4]) == strip(fresh["records"])


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
