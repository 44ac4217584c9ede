"""The sanity invariants a reader assumes, in fp32 and under bf16 autocast (a CUDA run's code path, run
on the CPU): rewinding to the final epoch is the final model; retraining a group with nothing reset and
a zero learning rate keeps the final model; dropping zero units changes nothing."""
import copy
from types import SimpleNamespace

import pytest
import torch

import layer_retraining
from common.dropout import ExampleTiedDropout
from common.evaluation import accuracies
from common.flipping import Collateral, Units, collateral_sets, flip_sequential, zeroed_copy
from common.models import group_keys, layer_groups
from common.rewinding import Rewinder, batchnorms, load_rewind_states, rewind_keys, rewind_sweep

ACC = ("clean", "noisy", "noisy_true", "train", "test")


@pytest.fixture(params=["fp32", "bf16"])
def amp_path(request):
    """Each test twice: fp32, and with amp autocasting on the CPU (cpu_bf16)."""
    if request.param == "bf16":
        request.getfixturevalue("cpu_bf16")
    return request.param


@pytest.mark.parametrize("bn_stats", ["final", "checkpoint"])
def test_rewinding_to_the_final_epoch_is_the_final_model(tiny_trained, amp_path, bn_stats):
    cfg, model, data, run = tiny_trained
    epochs = [0, cfg.epochs]  # initialization first: the final epoch's rewind must not compute with its weights
    keys = rewind_keys(model, bn_stats)
    rewinder = Rewinder(model, load_rewind_states(run, epochs, keys, model, data.device), keys)
    final = accuracies(model, data, amp=True)
    acc = rewind_sweep(model, data, rewinder, epochs, amp=True)
    for group in keys:
        assert acc[group][cfg.epochs] == final, group
        assert acc[group][0] != final, group  # the rewind to initialization changed something


def test_retraining_with_nothing_reset_keeps_the_final_model(tiny_trained, amp_path):
    """Reset to the final weights, trained at lr 0 with the frozen BatchNorm held: right after the reset
    it is the final model, no parameter moves, and a group without BatchNorm keeps every prediction
    (a group with BatchNorm re-estimates its own statistics on the clean examples: nearly the same)."""
    cfg, trained, data, run = tiny_trained
    model = copy.deepcopy(trained)
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    final = accuracies(model, data, amp=True)
    rcfg = SimpleNamespace(**{**layer_retraining.KNOBS, **vars(cfg), "amp": True, "retrain_epochs": 1,
                              "retrain_lr": 0.0, "frozen_bn": "eval"})
    plain = [name for name, module in layer_groups(model) if not batchnorms(module)]
    assert plain == ["head"]
    for name in group_keys(model):
        model.load_state_dict(final_state)
        rows = layer_retraining.retrain_group(model, data, name, final_state, rcfg)
        assert {k: rows[0][k] for k in ACC} == final, name
        params = dict(model.named_parameters())
        assert all(torch.equal(p, final_state[k]) for k, p in params.items()), name
        if name in plain:
            assert {k: rows[-1][k] for k in ACC} == final, name
        else:
            assert all(abs(rows[-1][k] - final[k]) <= 0.05 for k in ACC), (name, rows[-1], final)


def test_zeroing_no_units_changes_nothing(tiny_trained):
    """Flipping's edit of an empty set of units: the same model, the same predictions, no collateral;
    the greedy search with a budget of 0 units zeroes nothing."""
    cfg, model, data, run = tiny_trained
    units = Units(model, "channel")
    edited = zeroed_copy(model, units, [])
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in edited.state_dict().items())
    collateral = Collateral(model, data, collateral_sets(data, 0, seed=0))
    assert torch.equal(collateral.predict(edited), collateral.before)  # whole forwards, nothing cached reused
    after, drop = collateral(edited, units.changed([]))
    assert set(drop.values()) == {0.0}
    idx = torch.arange(8)
    result = flip_sequential(model, units, data.batch(idx), data.labels(idx), max_units=0)
    assert result.units == [] and not result.flipped and result.prediction == int(data.labels(idx)[0])


def test_example_tied_dropout_with_nothing_to_drop_changes_nothing():
    """Where the memorization channels carry nothing, every mode (tied, keep, and drop without the
    authors' rescaling of the generalization channels) passes the input through."""
    x = torch.randn(4, 10, 3, 3, generator=torch.Generator().manual_seed(0))
    m = ExampleTiedDropout(10, p_gen=0.5, p_mem=0.3, seed=0, layer="conv1", drop_rescale=False).eval()
    x[:, m.n_gen:] = 0
    m.index = torch.arange(4)
    for mode in ("tied", "keep", "drop"):
        m.mode = mode
        assert torch.equal(m(x), x), mode
    assert not torch.equal(m(torch.ones_like(x)), torch.ones_like(x))  # the memorization channels are dropped
