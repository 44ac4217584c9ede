"""Example-tied dropout: the masks, the modes, the wiring, and a real short run of the script."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from common.cli import UserError
from common.dropout import (DROP_SCALINGS, MODES, ExampleTiedDropout, RandomChannelDrop, StandardDropout, drop_scaling,
                            etd_factory, etd_modules, hash32, mask_memory, matched_rate, mode, random_drop_factory,
                            set_mode)
from common.models import MODELS, build_model, group_keys, layer_groups
from conftest import REPO


def etd(channels=64, p_gen=0.4, p_mem=0.2, seed=0, layer="conv1", **kw):
    return ExampleTiedDropout(channels, p_gen, p_mem, seed, layer, **kw)


def forward_ones(m, index, shape=(8, 8)):
    """The module's multipliers: its output on an all-ones input, per (example, channel)."""
    m.index = None if index is None else torch.as_tensor(index)
    n = 1 if index is None else len(m.index)
    return m(torch.ones(n, m.channels, *shape))[:, :, 0, 0]


# ----------------------------------------------------------------------------- masks

def test_hash_is_exact_32_bit_arithmetic():
    """The int64 implementation equals the same mixer in Python's unbounded integers (no overflow)."""
    def ref(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)
    xs = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF]
    assert hash32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert len(set(hash32(torch.arange(100000)).tolist())) == 100000  # a bijection


def test_same_index_same_mask_across_batches_epochs_and_rebuilds():
    m = etd()
    m.train()
    a = forward_ones(m, [3, 7, 9, 4000])
    b = forward_ones(m, [7])                       # another batch, another position
    c = forward_ones(m, [4000, 9, 3, 7])           # another order ("next epoch")
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], c[2]) and torch.equal(a[3], c[0])
    rebuilt = etd()                                # a fresh module from the same (seed, layer): same masks
    rebuilt.train()
    assert torch.equal(forward_ones(rebuilt, [3, 7, 9, 4000]), a)
    m.eval(), set_mode(m, "tied")
    assert torch.equal(forward_ones(m, [3, 7, 9, 4000]), a)  # tied evaluation = the training masks


def test_different_indices_layers_seeds_give_different_masks():
    m = etd(channels=256)
    masks = m.memorization_mask(torch.arange(4000))
    assert masks.shape == (4000, 256 - 102)
    assert len({bytes(r.numpy()) for r in masks.to(torch.uint8)}) == 4000   # every example its own subset
    assert abs(float(masks.float().mean()) - 0.2) < 0.005                    # each channel kept with p_mem
    per_channel = masks.float().mean(0)
    assert float(per_channel.min()) > 0.15 and float(per_channel.max()) < 0.25  # no channel favoured
    other_layer = etd(channels=256, layer="conv2").memorization_mask(torch.arange(4000))
    other_seed = etd(channels=256, seed=1).memorization_mask(torch.arange(4000))
    for other in (other_layer, other_seed):  # independent: agreement ~ p^2 + (1-p)^2 = 0.68
        assert abs(float((other == masks).float().mean()) - 0.68) < 0.01


def test_generalization_channels_always_on_and_modes():
    m = etd(channels=50, p_gen=0.3, p_mem=0.25)
    assert m.n_gen == 15 and etd(channels=100, p_gen=0.29).n_gen == 29  # floor, robust to 0.29 * 100 = 28.999..
    idx = torch.arange(1000)
    m.train()
    train = forward_ones(m, idx)
    assert bool((train[:, :15] == 1).all())
    assert set(train[:, 15:].unique().tolist()) == {0.0, 1.0}
    m.eval()
    with mode(m, "keep"):
        keep = forward_ones(m, None)[0]
    assert bool((keep[:15] == 1).all()) and torch.allclose(keep[15:], torch.full((35,), 0.25))
    with mode(m, "drop"):  # the default: the authors' rescaling of the generalization channels
        drop = forward_ones(m, None)[0]
        with drop_scaling(m, False):
            unscaled = forward_ones(m, None)[0]
    assert torch.allclose(drop[:15], torch.full((15,), (0.3 + 0.25) / 0.3)) and bool((drop[15:] == 0).all())
    assert bool((unscaled[:15] == 1).all()) and bool((unscaled[15:] == 0).all())  # exactly the memorization channels
    plain = etd(channels=50, p_gen=0.3, p_mem=0.25, drop_rescale=False)
    plain.eval(), set_mode(plain, "drop")
    assert torch.equal(forward_ones(plain, None)[0], unscaled)
    assert m.mode == "keep" and m.drop_rescale is True  # the context managers restored them


def test_drop_scalings_on_a_hand_checked_input():
    """4 channels, p_gen 0.5: channels 0-1 generalization, 2-3 memorization; rescaled factor (0.5 + 0.25) / 0.5 = 1.5."""
    m = etd(channels=4, p_gen=0.5, p_mem=0.25)
    m.eval()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])[:, :, None, None]
    out = {}
    for name in ("keep", "drop"):
        with mode(m, name):
            out[name] = m(x).flatten().tolist()
            with drop_scaling(m, False):
                out[name + " unscaled"] = m(x).flatten().tolist()
    assert out["drop"] == [1.5, 3.0, 0.0, 0.0]             # the authors': generalization x 1.5, memorization x 0
    assert out["drop unscaled"] == [1.0, 2.0, 0.0, 0.0]    # the method's description: generalization as they are
    assert out["keep"] == out["keep unscaled"] == [1.0, 2.0, 0.75, 1.0]  # keep mode: no rescaling either way
    assert list(DROP_SCALINGS.items()) == [("rescaled", True), ("unscaled", False)]  # the authors' first


def test_tokens_share_the_mask_and_spatial_positions_too():
    m = etd(channels=32, layer="block1.mlp", channel_dim=-1)
    m.train()
    m.index = torch.tensor([5, 6])
    out = m(torch.ones(2, 17, 32))
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert not torch.equal(out[0], out[1])
    conv = etd(channels=32)
    conv.train()
    conv.index = torch.tensor([5, 6])
    out = conv(torch.ones(2, 32, 6, 6))
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))


def test_tied_without_index_is_a_clear_error():
    m = etd()
    m.train()
    with pytest.raises(UserError, match="needs the examples' training indices.*'keep' or 'drop'"):
        forward_ones(m, None)
    m.eval(), set_mode(m, "tied")
    with pytest.raises(UserError, match="tied"):
        forward_ones(m, None)
    with pytest.raises(ValueError, match="unknown example-tied dropout mode"):
        set_mode(m, "test")
    with pytest.raises(ValueError, match=r"must both be in \(0, 1\)"):
        etd(p_gen=1.0)


def test_standard_dropout_rate_and_eval_identity():
    assert math.isclose(matched_rate(0.4, 0.2), 0.48)
    d = StandardDropout(0.48)
    x = torch.ones(64, 32, 8, 8)
    d.train()
    y = d(x)
    assert abs(float((y == 0).float().mean()) - 0.48) < 0.01 and abs(float(y.mean()) - 1) < 0.03
    d.eval()
    assert torch.equal(d(x), x)


# ----------------------------------------------------------------------------- wiring

@pytest.mark.parametrize("name", MODELS)
def test_wiring_leaves_weights_keys_and_groups_unchanged(name):
    plain = build_model(name, 3, 10, 32, width=0.25, seed=3)
    model = build_model(name, 3, 10, 32, width=0.25, seed=3, dropout=etd_factory(0.4, 0.2, seed=3))
    mods = etd_modules(model)
    expected = {"resnet9": 8, "resnet18": 2, "cnn": 3, "resnet50": 4, "vit": 6}[name]
    assert len(mods) == expected and len({m.layer for m in mods}) == expected
    assert all(not list(m.parameters()) and not list(m.buffers()) for m in mods)
    sp, sm = plain.state_dict(), model.state_dict()
    assert list(sp) == list(sm) and all(torch.equal(sp[k], sm[k]) for k in sp)  # same init, same keys
    assert group_keys(plain) == group_keys(model)
    assert [n for n, _ in layer_groups(plain)] == [n for n, _ in layer_groups(model)]
    x, idx = torch.randn(4, 3, 32, 32), torch.arange(4)
    model.train()
    model(x, index=idx).sum().backward()
    model.eval()
    outs = {}
    for m in MODES:
        set_mode(model, m)
        outs[m] = model(x, index=idx)
    assert not torch.allclose(outs["keep"], outs["drop"])
    set_mode(model, "tied")
    with pytest.raises(UserError):
        model(x)  # no index


def test_resnet18_authors_placement():
    """The authors' ETD model: ResNet-18 with example-tied dropout after layer2 and layer3 only, in drop
    mode the memorization channels of those two stages zeroed, the generalization ones x (p_gen + p_mem) / p_gen."""
    model = build_model("resnet18", 1, 10, 28, width=0.125, dropout=etd_factory(0.5, 0.2, 0))
    assert [(m.layer, m.channels, m.n_gen) for m in etd_modules(model)] == [("layer2", 16, 8), ("layer3", 32, 16)]
    names = [n for n, _ in model.layers.named_children()]
    assert names.index("layer2_drop") == names.index("layer2") + 1 and names.index("layer3_drop") == names.index("layer3") + 1
    seen = {}
    hooks = [model.layers.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.clone()))
             for n in ("layer2", "layer2_drop", "layer3", "layer3_drop")]
    model.eval()
    set_mode(model, "drop")
    model(torch.rand(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    for k, c in (("layer2", 8), ("layer3", 16)):
        assert torch.equal(seen[f"{k}_drop"][:, c:], torch.zeros_like(seen[f"{k}_drop"][:, c:]))
        assert torch.allclose(seen[f"{k}_drop"][:, :c], seen[k][:, :c] * 1.4)


def test_random_channel_drop_is_the_drops_count_at_random():
    """The negative control drops exactly as many channels as the drop mode (C - floor(p_gen C)), chosen at
    random per (seed, layer) -- not the memorization channels -- and scales the rest as the drop does."""
    m = RandomChannelDrop(64, 0.5, 0.2, seed=0, layer="layer2")
    out = m(torch.ones(3, 64, 4, 4))[:, :, 0, 0]
    assert torch.equal(out[0], out[2]) and int((out[0] > 0).sum()) == 32
    assert torch.allclose(out[0][out[0] > 0], torch.tensor(1.4)) and not out[0][out[0] <= 0].any()
    assert not torch.equal(out[0] > 0, torch.arange(64) < 32)  # not the generalization channels
    with drop_scaling(torch.nn.Sequential(m), False):
        assert set(m(torch.ones(1, 64, 1, 1)).flatten().tolist()) == {0.0, 1.0}
    assert m.drop_rescale is True
    same, other = RandomChannelDrop(64, 0.5, 0.2, 0, "layer2"), RandomChannelDrop(64, 0.5, 0.2, 0, "layer3")
    assert torch.equal(same.kept, m.kept) and not torch.equal(other.kept, m.kept)
    assert not torch.equal(RandomChannelDrop(64, 0.5, 0.2, 1, "layer2").kept, m.kept)
    plain = build_model("resnet18", 1, 10, 28, width=0.125)
    ctl = build_model("resnet18", 1, 10, 28, width=0.125, dropout=random_drop_factory(0.5, 0.2, 0))
    assert list(ctl.state_dict()) == list(plain.state_dict())  # loads the plain model's weights as they are
    ctl.load_state_dict(plain.state_dict())


def test_mask_memory_cifar10_full_width():
    model = build_model("resnet9", 3, 10, 32, width=1.0, dropout=etd_factory(0.4, 0.2, 0))
    rows = mask_memory(model, (3, 32, 32), 50_000)
    assert [r["layer"] for r in rows][:2] == ["conv1", "conv2"] and len(rows) == 8
    assert rows[0]["activation"] == [64, 32, 32] and rows[0]["stored_bytes"] == 0
    assert rows[0]["dense_float_bytes"] == 4 * 50_000 * 64 * 32 * 32  # the authors' table: 13.1 GB
    assert rows[0]["packed_bits_bytes"] == 50_000 * 8


# ----------------------------------------------------------------------------- the script

def test_short_run_drop_forgets_memorized_examples(tiny_trained, tmp_path, capsys):
    """A real measurement: the ETD model memorizes the noisy labels with its own channels (tied) and
    forgets them when the memorization channels are dropped; test accuracy stays far above chance.
    The drop mode is evaluated both ways (rescaled, the default, and not) from the same trained model."""
    import example_tied_dropout as script
    from common import claims
    assert script.drop_rescale is True  # the authors' rescaling is the default
    cfg, _, _, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)   # the shared run stays untouched
    argv = [f"--{k}={v}" for k, v in vars(cfg).items() if k in script.KNOBS] + \
        [f"--runs_dir={runs}", "--etd_epochs=12", "--gallery_size=4"]
    out = script.main(argv)
    printed = capsys.readouterr().out
    modes = out["etd"]["modes"]
    assert modes["tied"]["noisy"] >= 0.8, modes            # memorized, with each example's own channels
    assert modes["drop"]["noisy"] <= modes["tied"]["noisy"] - 0.5, modes  # ... and gone after the drop
    assert modes["drop"]["noisy"] < 0.3 and modes["drop"]["test"] > 0.6, modes
    assert modes["tied"]["test"] is None and modes["keep"]["test"] is not None
    saved = json.loads((runs / run.dir.name / "example_tied_dropout.json").read_text())
    assert [r["mode"] for r in saved["table"]] == ["-", "-", "-", "tied", "keep", "drop rescaled", "drop unscaled",
                                                   "drop rescaled", "drop unscaled"]
    assert saved["etd"]["places"] == ["conv1", "conv2", "conv3"]  # the zoo's own places (cnn)
    assert saved["table"][0]["noisy"] >= 0.95  # the plain run memorized them
    # both scalings, side by side; the earlier schema's keys hold the knob's (the authors' rescaled)
    both = saved["etd"]["drop_scalings"]
    assert list(both) == ["rescaled", "unscaled"] and saved["etd"]["drop_rescale"] is True
    assert both["rescaled"]["factor"] == pytest.approx((0.5 + 0.2) / 0.5) and both["unscaled"]["factor"] == 1.0
    assert both["rescaled"]["accuracy"] == modes["drop"] and both["unscaled"]["accuracy"] != modes["drop"]
    assert both["rescaled"]["clean_forgotten"] == saved["etd"]["clean_forgotten"]
    assert both["unscaled"]["accuracy"]["noisy"] < 0.3 and both["unscaled"]["accuracy"]["test"] > 0.6, both
    assert saved["sweep"]["0.2"]["drop_scalings"] == {s: v["accuracy"] for s, v in both.items()}
    for r, s in zip(saved["table"][5:], both):
        assert {c: r[c] for c in script.COLUMNS} == {c: both[s]["accuracy"][c] for c in script.COLUMNS}
    # the printed table and summary show both; so do the claims (one row per scaling)
    for s in both:
        assert f"drop {s}" in printed and f"after the drop, {s}" in printed
    assert "claim 5 [drop: rescaled (authors)]" in printed and "claim 5 [drop: not rescaled]" in printed
    assert [c.variant for c in claims.tied_dropout(saved)] == ["drop: rescaled (authors)", "drop: not rescaled"]
    assert [c.variant for c in claims.tied_dropout(saved, variant="cnn")] == ["cnn; drop: rescaled (authors)",
                                                                            "cnn; drop: not rescaled"]
    assert claims.tied_dropout(saved)[0].statistic.startswith("cnn x0.5, dropout after conv1, conv2, conv3: ")
    # per-example results (paired statistics in common/claims.py): right lengths, means = the table's accuracies
    per = saved["per_example"]
    n_test, n_noisy = len(per["test_correct"]["plain"]), len(per["noisy_drop_correct"])
    assert n_test == len(per["test_correct"]["drop"]) == 256 and n_noisy == len(per["noisy_index"]) == 51
    assert set(per["test_correct"]["plain"]) | set(per["test_correct"]["drop"]) | set(per["noisy_drop_correct"]) \
        <= {0, 1}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(per["test_correct"]["plain"]) == pytest.approx(saved["plain_test"], abs=1e-6)
    assert mean(per["test_correct"]["drop"]) == pytest.approx(modes["drop"]["test"], abs=1e-6)
    assert mean(per["noisy_drop_correct"]) == pytest.approx(modes["drop"]["noisy"], abs=1e-6)
    assert per["drop_scalings"]["rescaled"] == {"test_correct": per["test_correct"]["drop"],
                                                "noisy_drop_correct": per["noisy_drop_correct"]}
    for s, p in per["drop_scalings"].items():
        assert len(p["test_correct"]) == 256 and len(p["noisy_drop_correct"]) == 51
        assert mean(p["test_correct"]) == pytest.approx(both[s]["accuracy"]["test"], abs=1e-6)
        assert mean(p["noisy_drop_correct"]) == pytest.approx(both[s]["accuracy"]["noisy"], abs=1e-6)
    # the negative control: the plain model with as many random channels dropped, per scaling, mean of 3 draws
    ctl, ctl_per = saved["negative_control"], per["negative_control"]
    assert ctl["draws"] == 3 and list(ctl["drop_scalings"]) == list(ctl_per) == ["rescaled", "unscaled"]
    for s, r in zip(ctl_per, saved["table"][7:]):
        acc = ctl["drop_scalings"][s]
        assert r["model"] == "no dropout, random channels dropped (3 draws)" and r["mode"] == f"drop {s}"
        assert {c: r[c] for c in script.COLUMNS} == {c: acc[c] for c in script.COLUMNS}
        assert len(ctl_per[s]["noisy_correct"]) == 51 and len(ctl_per[s]["test_correct"]) == 256
        assert set(ctl_per[s]["noisy_correct"]) <= {0, 1 / 3, 2 / 3, 1}  # fractions of the 3 draws
        assert mean(ctl_per[s]["noisy_correct"]) == pytest.approx(acc["noisy"], abs=1e-6)
        assert mean(ctl_per[s]["test_correct"]) == pytest.approx(acc["test"], abs=1e-6)
    assert ctl["drop_scalings"]["rescaled"] != ctl["drop_scalings"]["unscaled"]
    assert "negative control" in printed
    assert all(c.previous and "negative control" in c.statistic for c in claims.tied_dropout(saved))
    assert "default_claim" not in saved  # the verdict is common/claims.py's
    for what in ("bars", "curves", "gallery"):
        assert (runs / run.dir.name / f"example_tied_dropout_{what}.png").stat().st_size > 10_000
    variant = runs / run.dir.name / "example_tied_dropout" / "etd_pgen0.5_pmem0.2_ep12"
    rows = [json.loads(line) for line in (variant / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(13)) and {"tied", "drop_rescaled", "drop_unscaled"} <= set(rows[-1])
    assert rows[-1]["drop_rescaled"] == both["rescaled"]["accuracy"]  # the last epoch is the evaluated model
    before = (variant / "checkpoints" / "epoch_012.pt").read_bytes()
    again = script.main(argv)  # reuses the trained variants: same numbers, checkpoints untouched
    assert again["table"] == out["table"]
    assert (variant / "checkpoints" / "epoch_012.pt").read_bytes() == before
    # drop_rescale is evaluation only: the same trained model, the "drop" keys now the unscaled drop
    other = script.main(argv + ["--drop_rescale=False"])
    assert (variant / "checkpoints" / "epoch_012.pt").read_bytes() == before
    assert other["etd"]["drop_scalings"] == out["etd"]["drop_scalings"] and other["table"] == out["table"]
    assert other["etd"]["modes"]["drop"] == both["unscaled"]["accuracy"] and other["etd"]["drop_rescale"] is False
    assert other["per_example"]["noisy_drop_correct"] == per["drop_scalings"]["unscaled"]["noisy_drop_correct"]


def test_dropout_after_list_on_the_command_line_and_in_a_config_file(tiny_argv, tmp_path):
    """`dropout_after` defaults to "auto" but takes a list (docs/own_model.md), from a config file and from
    --dropout_after=[...] (which wins); a bad list is one line, exit 2, nothing written."""
    import example_tied_dropout as script
    from common import config
    preset = tmp_path / "places.py"
    preset.write_text('dropout_after = ["conv*.relu"]\n')
    assert config.parse(script.KNOBS, [str(preset)]).dropout_after == ["conv*.relu"]
    assert config.parse(script.KNOBS, ["--dropout_after=auto"]).dropout_after == "auto"
    argv = tiny_argv(epochs=1) + ["--etd_epochs=1", "--gallery_size=1", "--control_draws=1"]
    res = subprocess.run([sys.executable, str(REPO / "example_tied_dropout.py"), *argv, str(preset),
                          "--dropout_after=['conv2.relu']"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(next((tmp_path / "runs").glob("*/example_tied_dropout.json")).read_text())
    assert out["config"]["dropout_after"] == ["conv2.relu"] and out["etd"]["places"] == ["conv2.relu"]
    etd_dir = next((tmp_path / "runs").glob("*/example_tied_dropout/etd_*"))
    assert etd_dir.name.endswith("after-conv2.relu")  # another placement: its own variant directory
    bad = subprocess.run([sys.executable, str(REPO / "example_tied_dropout.py"), "--dropout_after=[3]",
                          f"--runs_dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "dropout_after=[3] must be 'auto' or a list" in bad.stderr and not (tmp_path / "bad").exists()


def test_bad_knob_exits_2_with_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "example_tied_dropout.py"), "--p_gen=1.0", f"--runs_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "p_gen=1.0 is outside (0, 1)" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("arg, message", [("--p_mem=0", "p_mem=0.0 is outside (0, 1)"),
                                          ("--p_mem_sweep=[0.1,2]", "p_mem_sweep=[0.1, 2] must list values in (0, 1)"),
                                          ("--etd_epochs=-1", "etd_epochs=-1 is outside [0, inf)")])
def test_knob_validation(arg, message):
    import example_tied_dropout as script
    from common import config
    with pytest.raises(UserError) as e:
        config.parse(script.KNOBS, [arg])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_variants_default_to_the_plain_runs_epochs():
    """etd_epochs=0 gives the dropout variants the plain run's budget, so the comparison is like for like."""
    import example_tied_dropout as script
    from types import SimpleNamespace
    assert script.variant_epochs(SimpleNamespace(etd_epochs=0, epochs=20)) == 20
    assert script.variant_epochs(SimpleNamespace(etd_epochs=12, epochs=20)) == 12


def test_results_of_the_earlier_default_are_stale_for_reproduce(tmp_path):
    """A JSON written with drop_rescale=False (the earlier default) is re-run by reproduce.py under the new
    default (evaluation only: drop_rescale is no training key, so the trained models are reused)."""
    import example_tied_dropout as script
    import reproduce
    from common import config
    from common.runs import write_json
    argv = [f"--runs_dir={tmp_path}", "--device=cpu"]
    cfg = config.parse(script.KNOBS, argv)
    path = reproduce.results_path(script, cfg)
    saved = {**vars(cfg), **config.train_config(cfg)}
    write_json(path, {"config": saved})
    assert reproduce.is_done(script, argv) == (True, path)
    write_json(path, {"config": {**saved, "drop_rescale": False}})
    assert reproduce.is_done(script, argv)[0] is False
    assert reproduce.is_done(script, argv + ["--drop_rescale=False"])[0] is True
    assert "drop_rescale" not in config.train_config(cfg)  # not part of the trained run's identity
