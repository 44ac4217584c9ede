"""gradient_accounting.py: the exact clean/noisy split, the unchanged optimizer trajectory, the outputs."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gradient_accounting
from common.accounting import (KEY, GradientAccountant, accounted_prefix, control_mask, example_losses,
                               loss_matched_mask, memorization_phase)
from common.models import model_for
from common.runs import Run, load_tensors, read_jsonl, write_jsonl
from common.training import train_run
from conftest import REPO


def _losses(model, data, idx):
    model.zero_grad(set_to_none=True)
    return F.cross_entropy(model(data.batch(idx), index=idx), data.labels(idx), reduction="none")


def _part_grads(model, data, idx, weights):
    """An independent reference: the gradient of sum(weights * losses) / B by its own backward."""
    losses = _losses(model, data, idx)
    return torch.autograd.grad((losses * weights).sum() / len(idx), list(model.parameters()), allow_unused=True)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("skip_pure", [True, False])
def test_split_is_exact_and_grad_is_plain(make_cfg, mnist_small, skip_pure):
    """total = clean-rest + control + noisy, each part equal to its own backward; `.grad` (the
    optimizer's input) bit for bit plain training's."""
    cfg = make_cfg()
    model = model_for(cfg, mnist_small)
    noisy = mnist_small.noisy
    control = control_mask(noisy, cfg.seed)
    assert int(control.sum()) == int(noisy.sum()) and not (control & noisy).any()  # as large as the noisy set
    assert torch.equal(control, control_mask(noisy, cfg.seed)) and not torch.equal(control, control_mask(noisy, 1))
    mixed = torch.arange(64)
    assert 0 < int(noisy[mixed].sum()) < 64 and 0 < int(control[mixed].sum())
    # plain training's gradient, bit for bit
    _losses(model, mnist_small, mixed).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    acct = GradientAccountant(model, noisy, control=control, skip_pure=skip_pure)
    assert acct.params == list(model.parameters())  # every parameter is in some layer group
    acct.backward(_losses(model, mnist_small, mixed), mixed)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    clean_ref = _part_grads(model, mnist_small, mixed, (~noisy[mixed]).float())
    noisy_ref = _part_grads(model, mnist_small, mixed, noisy[mixed].float())
    control_ref = _part_grads(model, mnist_small, mixed, control[mixed].float())
    rest_ref = _part_grads(model, mnist_small, mixed, (~noisy[mixed] & ~control[mixed]).float())
    for t, c, k, g, cr, nr, kr, rr in zip(acct.total, acct.clean, acct.ctrl, plain, clean_ref, noisy_ref,
                                          control_ref, rest_ref):
        tol = dict(rtol=1e-3, atol=1e-3 * g.abs().max())
        assert torch.equal(t, g)
        assert torch.equal(c, cr) and torch.equal(k, kr)  # the same computations: bitwise
        assert torch.allclose(t - c, nr, **tol)
        assert torch.allclose(c - k, rr, **tol)
        assert torch.allclose(rr + kr + nr, g, **tol)    # the split is exact: clean-rest + control + noisy = total
        assert all(not torch.equal(x, torch.zeros_like(x)) for x in (c - k, k, t - c))
    # the epoch's numbers are the norms and cosines of those sums, per layer group
    out = acct.end_epoch(1)[KEY]
    assert out["n_noisy"] == int(noisy[mixed].sum()) and out["n_clean"] + out["n_noisy"] == 64
    assert out["n_control"] == int(control[mixed].sum())
    params = list(model.parameters())
    flat = lambda grads, ids: torch.cat([grads[i].flatten() for i in ids]).double()  # noqa: E731
    for gi, group in enumerate(acct.groups):
        ids = acct.slices[gi]
        c, n, k, r = (flat(x, ids) for x in (clean_ref, noisy_ref, control_ref, rest_ref))
        assert math.isclose(out["norm_clean"][gi], float(c.norm()), rel_tol=1e-6)
        assert math.isclose(out["norm_noisy"][gi], float(n.norm()), rel_tol=1e-3)
        assert math.isclose(out["norm_control"][gi], float(k.norm()), rel_tol=1e-6)
        assert math.isclose(out["norm_clean_rest"][gi], float(r.norm()), rel_tol=1e-3)
        assert math.isclose(out["norm_total"][gi], float(flat(plain, ids).norm()), rel_tol=1e-9)
        assert math.isclose(out["cosine"][gi], _cos(c, n), abs_tol=1e-3)
        assert math.isclose(out["cosine_rest_noisy"][gi], _cos(r, n), abs_tol=1e-3)
        assert math.isclose(out["cosine_control_rest"][gi], _cos(k, r), abs_tol=1e-3)
    assert sum(acct.sizes) == sum(p.numel() for p in params)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in acct.total + acct.clean + acct.ctrl)  # next epoch: zero
    assert int(acct.n_control) == 0


def test_loss_matching_by_hand():
    """Hardest noisy first, each takes the nearest free clean loss (a tie goes to the higher loss)."""
    losses = torch.tensor([5.0, 0.1, 4.9, 0.2, 3.0, 0.05, 6.0, 2.9, 0.0, 4.0])
    noisy = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    # 6.0 -> 4.9; 5.0 -> 4.0 (4.9 taken); 3.0 -> 2.9
    mask, info = loss_matched_mask(losses, noisy)
    assert torch.nonzero(mask).flatten().tolist() == [2, 7, 9]
    assert info["n_matched"] == 3 and math.isclose(info["loss_matched"], (4.9 + 4.0 + 2.9) / 3, rel_tol=1e-6)
    assert math.isclose(info["loss_gap"], (1.1 + 1.0 + 0.1) / 3, rel_tol=1e-5)
    assert math.isclose(info["loss_noisy"], 14 / 3, rel_tol=1e-6)
    tie, _ = loss_matched_mask(torch.tensor([1.0, 0.5, 1.5]), torch.tensor([1, 0, 0], dtype=torch.bool))
    assert tie.tolist() == [False, False, True]
    # fewer clean than noisy examples: every clean one, taken by the hardest noisy ones
    few, info = loss_matched_mask(torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([1, 1, 1, 0], dtype=torch.bool))
    assert few.tolist() == [False, False, False, True] and info["n_matched"] == 1


@pytest.mark.parametrize("skip_pure", [True, False])
def test_loss_matched_part_is_exact(make_cfg, mnist_small, skip_pure):
    """The loss-matched part equals its own backward; `.grad` stays plain; the per-example losses leave
    the model untouched (eval mode: BatchNorm statistics unchanged, training mode restored)."""
    cfg = make_cfg()
    model = model_for(cfg, mnist_small)
    noisy = mnist_small.noisy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = example_losses(model, mnist_small, amp=False)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert losses.shape == (mnist_small.n_train,)
    mask, info = loss_matched_mask(losses, noisy)
    assert int(mask.sum()) == int(noisy.sum()) == info["n_matched"] and not (mask & noisy).any()
    assert info["loss_gap"] < abs(info["loss_noisy"] - info["loss_clean"]) + 1e-9
    idx = torch.arange(64)
    _losses(model, mnist_small, idx).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    acct = GradientAccountant(model, noisy, control=control_mask(noisy, 0), skip_pure=skip_pure, matched=True)
    with pytest.raises(ValueError):
        acct.match(noisy, info)
    acct.match(mask, info)
    acct.backward(_losses(model, mnist_small, idx), idx)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    ref = _part_grads(model, mnist_small, idx, mask[idx].float())
    assert all(torch.equal(m, r) for m, r in zip(acct.mtch, ref))
    out = acct.end_epoch(1)[KEY]
    assert out["n_matched"] == int(mask[idx].sum()) > 0 and out["matching"] == info
    for gi in range(len(acct.groups)):
        m = torch.cat([ref[i].flatten() for i in acct.slices[gi]]).double()
        assert math.isclose(out["norm_matched"][gi], float(m.norm()), rel_tol=1e-6)
        assert -1 <= out["cosine_matched_unmatched"][gi] <= 1
    with pytest.raises(ValueError):
        GradientAccountant(model, noisy).match(mask, info)


@pytest.mark.parametrize("skip_pure", [True, False])
def test_control_only_and_control_free_batches(make_cfg, mnist_small, skip_pure):
    model = model_for(make_cfg(), mnist_small)
    noisy = mnist_small.noisy
    control = control_mask(noisy, 0)
    acct = GradientAccountant(model, noisy, control=control, skip_pure=skip_pure)
    only = torch.nonzero(control).flatten()[:16]
    free = torch.nonzero(~control & ~noisy).flatten()[:16]
    for idx, is_control in ((only, True), (free, False)):
        acct.backward(_losses(model, mnist_small, idx), idx)
        out = acct.end_epoch()[KEY]
        assert out["n_control"] == (16 if is_control else 0)
        part, zero = ("norm_control", "norm_clean_rest") if is_control else ("norm_clean_rest", "norm_control")
        for t, p, z in zip(out["norm_total"], out[part], out[zero]):
            assert t > 0 and math.isclose(p, t, rel_tol=1e-5) and z <= 1e-5 * t
    with pytest.raises(ValueError):
        GradientAccountant(model, noisy, control=noisy)


@pytest.mark.parametrize("skip_pure", [True, False])
def test_batches_without_noisy_or_clean_examples(make_cfg, mnist_small, skip_pure):
    model = model_for(make_cfg(), mnist_small)
    noisy = mnist_small.noisy
    acct = GradientAccountant(model, noisy, skip_pure=skip_pure)
    for idx in (mnist_small.clean_idx[:32], mnist_small.noisy_idx[:32]):
        acct.backward(_losses(model, mnist_small, idx), idx)
        out = acct.end_epoch()[KEY]
        assert all(math.isfinite(v) for k in ("norm_total", "norm_clean", "norm_noisy") for v in out[k])
        all_noisy = bool(noisy[idx].all())
        assert (out["n_clean"], out["n_noisy"]) == ((0, 32) if all_noisy else (32, 0))
        pure, zero = ("norm_noisy", "norm_clean") if all_noisy else ("norm_clean", "norm_noisy")
        for t, p, z in zip(out["norm_total"], out[pure], out[zero]):
            assert t > 0 and math.isclose(p, t, rel_tol=1e-5) and z <= 1e-5 * t
            if skip_pure:
                assert z == 0 and p == t
        if skip_pure:
            assert out["cosine"] == [None] * len(acct.groups)


def test_memorization_phase():
    rows = [{"epoch": e, "noisy": v} for e, v in enumerate([0.1, 0.02, 0.0, 0.0, 0.3, 0.95, 1.0])]
    assert memorization_phase(rows, 0.9) == {"epochs": [4, 5], "low": 3, "end": 5, "reached": True,
                                             "noisy_low": 0.0, "noisy_end": 0.95}
    phase = memorization_phase(rows[:5], 0.9)
    assert phase["epochs"] == [4] and not phase["reached"]
    assert memorization_phase([{"epoch": 0, "noisy": float("nan")}, {"epoch": 1, "noisy": float("nan")}])["epochs"] == []
    assert accounted_prefix([{"epoch": 0}, {"epoch": 1, KEY: {}}, {"epoch": 2, KEY: {}}, {"epoch": 3},
                             {"epoch": 4, KEY: {}}]) == 2
    with_control = {"norm_control": []}  # accounted without the control group: not accounted for the claim
    assert accounted_prefix([{"epoch": 1, KEY: with_control}, {"epoch": 2, KEY: {}}], control=True) == 1
    both = {"norm_control": [], "norm_matched": []}  # without the loss-matched control: re-accounted
    assert accounted_prefix([{"epoch": 1, KEY: both}, {"epoch": 2, KEY: with_control}], control=True, matched=True) == 1


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ckpt_equal(x, y):
    a, b = load_tensors(x), load_tensors(y)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    return _states_equal(a["model"], b["model"]) and opt_a.keys() == opt_b.keys() and \
        all(_states_equal(opt_a[k], opt_b[k]) for k in opt_a)


def test_accounts_a_plain_run_bit_identically(tiny_trained, tiny_argv, tmp_path):
    """A finished run trained without accounting is re-trained with it: every checkpoint is bitwise
    the plain one (same optimizer trajectory), then the outputs are complete."""
    cfg, _, data, plain = tiny_trained
    runs = tmp_path / "copy"
    shutil.copytree(plain.dir, runs / plain.dir.name)
    results = gradient_accounting.main(tiny_argv(runs_dir=runs))
    run = Run(cfg, directory=runs / plain.dir.name)
    for e in range(cfg.epochs + 1):
        assert _ckpt_equal(run.ckpt_path(e), plain.ckpt_path(e)), f"epoch {e} differs from plain training"
    saved = json.loads(run.path("gradient_accounting.json").read_text())
    assert saved == json.loads(json.dumps(results))
    text = json.dumps(results)  # the default (memorized=noisy): none of the atypical split's keys
    assert all(k not in text for k in ("n_atypical", "norm_mislabeled", "share_", '"atypical"', '"split"'))
    groups = results["groups"]
    assert groups == ["conv1", "conv2", "conv3", "head"]
    assert [t["epoch"] for t in results["epochs"]] == list(range(1, cfg.epochs + 1))
    metrics = {r["epoch"]: r for r in read_jsonl(run.path("metrics.jsonl"))}
    assert len(results["control"]) == 51 and not set(results["control"]) & set(data.noisy_idx.tolist())
    for t in results["epochs"]:
        assert set(t["groups"]) == set(groups)
        assert (t["n_clean"], t["n_noisy"], t["n_control"], t["n_matched"]) == (512 - 51, 51, 51, 51)
        m = t["matching"]
        assert m["n_matched"] == 51 and m["loss_gap"] >= 0
        assert t["noisy"] == metrics[t["epoch"]]["noisy"] and t["test"] == metrics[t["epoch"]]["test"]
        for g in t["groups"].values():
            assert -1 <= g["cosine"] <= 1 and g["norm_total"] > 0
            assert math.isclose(g["per_example_noisy"], g["norm_noisy"] / 51)
            assert math.isclose(g["per_example_control"], g["norm_control"] / 51)
            assert -1 <= g["cosine_rest_noisy"] <= 1 and -1 <= g["cosine_control_rest"] <= 1
            assert math.isclose(g["per_example_matched"], g["norm_matched"] / 51) and g["norm_matched"] > 0
            assert g["norm_clean"] <= (g["norm_clean_unmatched"] + g["norm_matched"]) * (1 + 1e-6)
            assert g["norm_clean"] <= (g["norm_clean_rest"] + g["norm_control"]) * (1 + 1e-6)
            # triangle inequality: the parts add up to the total
            assert g["norm_total"] <= (g["norm_clean"] + g["norm_noisy"]) * (1 + 1e-6)
    phase = results["memorization_phase"]
    assert phase["reached"] and phase["epochs"] and set(results["summary"]) == set(groups)
    assert all("control_rest_ratio" in s and s["noisy_matched_ratio"] > 0 for s in results["summary"].values())
    # the loss-matched control is harder than the clean average in the memorization phase
    assert all(t["matching"]["loss_matched"] > t["matching"]["loss_clean"] for t in results["epochs"]
               if t["epoch"] in phase["epochs"])
    for name in ("norms", "per_example", "cosine", "accuracy"):
        assert run.path(f"gradient_accounting_{name}.png").stat().st_size > 10_000

    # complete accounting: nothing is trained again, the outputs are rebuilt identically
    mtime = run.ckpt_path(cfg.epochs).stat().st_mtime_ns
    assert gradient_accounting.main(tiny_argv(runs_dir=runs)) == results
    assert run.ckpt_path(cfg.epochs).stat().st_mtime_ns == mtime

    # epochs 19.. trained later without accounting (e.g. by another script): only those are re-trained
    rows = read_jsonl(run.path("metrics.jsonl"))
    write_jsonl(run.path("metrics.jsonl"), [{k: v for k, v in r.items() if k != KEY or r["epoch"] <= 18} for r in rows])
    before = {e: run.ckpt_path(e).stat().st_mtime_ns for e in (18, 19)}
    again = gradient_accounting.main(tiny_argv(runs_dir=runs))
    assert run.ckpt_path(18).stat().st_mtime_ns == before[18] and run.ckpt_path(19).stat().st_mtime_ns != before[19]
    assert again == results  # bit-identical re-training gives the same numbers
    assert _ckpt_equal(run.ckpt_path(cfg.epochs), plain.ckpt_path(cfg.epochs))


def test_fresh_run_without_noise_matches_plain_training(tiny_argv, tiny_npz, tmp_path):
    """Trains from scratch with accounting; noise=0 means every batch is clean: no NaN anywhere."""
    argv = tiny_argv(runs_dir=tmp_path / "ours", noise=0.0, epochs=2)
    results = gradient_accounting.main(argv)
    cfg = gradient_accounting.config.parse(gradient_accounting.KNOBS, tiny_argv(runs_dir=tmp_path / "plain",
                                                                                 noise=0.0, epochs=2))
    _, _, plain = train_run(cfg, quiet=True)
    ours = Run(cfg, directory=tmp_path / "ours" / plain.dir.name)
    assert _ckpt_equal(ours.ckpt_path(2), plain.ckpt_path(2))
    text = ours.path("gradient_accounting.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    for t in results["epochs"]:
        assert t["n_noisy"] == 0
        for g in t["groups"].values():
            assert g["norm_noisy"] == 0 and g["cosine"] is None and g["per_example_noisy"] is None
            assert g["norm_control"] == 0 and g["cosine_control_rest"] is None and g["per_example_control"] is None
            assert g["norm_matched"] == 0 and g["per_example_matched"] is None
            assert g["norm_clean"] == g["norm_total"] > 0
    assert results["memorization_phase"]["epochs"] == [] and results["summary"] == {}


def test_bad_knob_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "gradient_accounting.py"), "--window=0",
                           f"--runs_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "window=0 is outside [1, inf)" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("skip_pure", [True, False])
def test_atypical_split_is_exact(make_cfg, mnist_small, skip_pure):
    """memorized=both: the atypical part equals its own backward, mislabeled = noisy - atypical, and the
    per-kind numbers add up to the lumped ones; `.grad` stays plain."""
    model = model_for(make_cfg(), mnist_small)
    atypical = torch.zeros_like(mnist_small.noisy)
    atypical[torch.nonzero(~mnist_small.noisy).flatten()[::9]] = True  # every 9th clean example: "atypical"
    noisy = mnist_small.noisy | atypical                              # the memorized set: both kinds
    idx = torch.arange(64)
    assert 0 < int(atypical[idx].sum()) < int(noisy[idx].sum())
    _losses(model, mnist_small, idx).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    acct = GradientAccountant(model, noisy, control=control_mask(noisy, 0), skip_pure=skip_pure, atypical=atypical)
    acct.backward(_losses(model, mnist_small, idx), idx)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    atyp_ref = _part_grads(model, mnist_small, idx, atypical[idx].float())
    mis_ref = _part_grads(model, mnist_small, idx, (noisy & ~atypical)[idx].float())
    assert all(torch.equal(a, r) for a, r in zip(acct.atyp, atyp_ref))
    out = acct.end_epoch(1)[KEY]
    assert (out["n_atypical"], out["n_mislabeled"]) == (int(atypical[idx].sum()), int((noisy & ~atypical)[idx].sum()))
    assert out["n_atypical"] + out["n_mislabeled"] == out["n_noisy"]
    for gi in range(len(acct.groups)):
        m = torch.cat([mis_ref[i].flatten() for i in acct.slices[gi]]).double()
        assert math.isclose(out["norm_mislabeled"][gi], float(m.norm()), rel_tol=1e-3)
        _adds_up({k: v[gi] for k, v in out.items() if isinstance(v, list) and len(v) == len(acct.groups)})
    assert all(torch.equal(b, torch.zeros_like(b)) for b in acct.atyp) and int(acct.n_atypical) == 0
    with pytest.raises(ValueError):  # atypical examples outside the memorized set
        GradientAccountant(model, mnist_small.noisy, atypical=atypical)


def _adds_up(g):
    """One group's numbers of one epoch: mislabeled + atypical = noisy (vectors, so for the norms
    |n|^2 = |m|^2 + |a|^2 + 2 cos |m| |a|), and the shares of the three kinds add up to 1."""
    m, a, n = g["norm_mislabeled"], g["norm_atypical"], g["norm_noisy"]
    cos = g["cosine_mislabeled_atypical"]
    assert math.isclose(n ** 2, m ** 2 + a ** 2 + 2 * (cos or 0) * m * a, rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(g["share_mislabeled"] + g["share_atypical"], g["share_noisy"], abs_tol=1e-9)
    assert math.isclose(g["share_clean"] + g["share_noisy"], 1, abs_tol=1e-9)


def test_both_reports_the_kinds_apart_and_trains_plainly(tiny_argv, tiny_npz, tmp_path, capsys):
    """memorized=both on the tiny run (1 epoch; a scores file marking every 8th image atypical): the JSON
    has per-kind entries (mislabeled, atypical, typical clean) that add up to the lumped ones, and the
    weights are bit for bit those of plain training."""
    import numpy as np

    from common import config
    from common.data import KINDS, scores_path
    from common.memorization import write_scores
    npz = tmp_path / "tiny.npz"
    shutil.copy(tiny_npz, npz)
    y = np.load(npz)["y_train"]
    write_scores(scores_path(f"npz:{npz}"), np.where(np.arange(len(y)) % 8 == 0, 0.2, 0.9), np.zeros(len(y)),
                 np.ones(len(y)), y, {"source": "test"})
    argv = lambda runs, **kw: [a for a in tiny_argv(runs_dir=runs, epochs=1, **kw)  # noqa: E731
                               if not a.startswith("--dataset")] + [f"--dataset=npz:{npz}"]
    results = gradient_accounting.main(argv(tmp_path / "ours", memorized="both"))
    printed = capsys.readouterr().out
    cfg = config.parse(gradient_accounting.KNOBS, argv(tmp_path / "plain", memorized="both"))
    _, data, plain = train_run(cfg, quiet=True)
    ours = Run(cfg, directory=tmp_path / "ours" / plain.dir.name)
    assert all(_ckpt_equal(ours.ckpt_path(e), plain.ckpt_path(e)) for e in (0, 1))
    assert json.loads(ours.path("gradient_accounting.json").read_text()) == json.loads(json.dumps(results))
    n_atyp = int((data.kind == KINDS.index("atypical")).sum())
    assert (results["n_mislabeled"], results["n_atypical"]) == (51, n_atyp) and n_atyp > 0
    assert results["n_mislabeled"] + results["n_atypical"] == results["n_noisy"]
    assert "share_*" in results["definitions"]
    (t,) = results["epochs"]
    assert t["n_mislabeled"] + t["n_atypical"] == t["n_noisy"] == 51 + n_atyp
    assert {"typical", "mislabeled", "atypical"} <= set(t)
    for g in t["groups"].values():
        _adds_up(g)
        assert math.isclose(g["per_example_atypical"], g["norm_atypical"] / n_atyp)
        assert math.isclose(g["per_example_mislabeled"], g["norm_mislabeled"] / 51)
        assert g["norm_atypical"] > 0 and g["norm_mislabeled"] > 0
    summary = results["summary"]
    assert summary and all({"mislabeled_clean_ratio", "atypical_clean_ratio", "mean_share_atypical",
                            "mean_cosine_clean_atypical"} <= set(s) for s in summary.values())
    assert "the noisy part by kind" in printed
    assert ours.path("gradient_accounting_norms.png").stat().st_size > 10_000
