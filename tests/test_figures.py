"""Figures, checked mechanically from small results: no text outside the canvas (plots.STRICT, in
conftest), no legend over the data, ticks of a count axis at the data's integer values, a subtitle
that names exactly the seeds shown and a spread ("mean ± std") only where there are several seeds."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common import plots, report

from conftest import REPO, TINY

COMMITTED = REPO / "docs" / "results" / "fashion_h100"  # real results, committed: accounting and rewinding


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the report saves, checked and kept as (path name, suptitle, figure)."""
    seen = []
    save = plots.save

    def check(fig, path):
        assert plots.legends_over_data(fig) == [], f"{Path(path).name}: legend over the data"
        seen.append((Path(path).name, fig._suptitle.get_text(), fig))
        return save(fig, path)
    monkeypatch.setattr(report, "save", check)
    return seen


def _cfg(**kw):
    return SimpleNamespace(**{**TINY, "model": "resnet9", "width": 0.25, **kw})


def _seeds_ok(suptitle, seeds):
    one = len(seeds) == 1
    assert (f"seed {seeds[0]} " if one else f"seeds {', '.join(map(str, seeds))} ") in suptitle.replace("\n", " ")
    assert ("±" in suptitle or "over" in suptitle and "seeds" in suptitle.split("over")[-1]) != one, suptitle


def test_subtitle_names_the_seeds_and_the_width_only_where_it_applies():
    assert "seed 0 (data = model seed)" in plots.subtitle(_cfg(seeds=[0])) and plots.spread(_cfg(seeds=[0])) == ""
    assert "seeds 0, 1, 2" in plots.subtitle(_cfg(seeds=[0, 1, 2]))
    assert plots.spread(_cfg(seeds=[0, 1, 2])) == " (mean ± std over 3 seeds)"
    assert "x0.25" in plots.subtitle(_cfg()) and "x0.25" not in plots.subtitle(_cfg(model="torchvision:resnet18"))


def test_count_axis_ticks_sit_at_the_data_integers(tmp_path):
    fig, axes = plots.figure("counts", _cfg())
    ax = axes[0, 0]
    counts = np.array([2, 2, 2, 3, 3, 4, 7])
    ax.step(counts, np.arange(1, 8), where="post")
    ax.set_xscale("log")
    ticks = plots.integer_ticks(ax, counts)
    fig.canvas.draw()
    assert ticks == [2, 3, 4, 7] and [t.get_text() for t in ax.get_xticklabels()] == ["2", "3", "4", "7"]
    many = plots.integer_ticks(ax, range(1, 101), keep=[3])  # many values: 1-2-5 series, min, max, the medians
    assert many == [1, 2, 3, 5, 10, 20, 50, 100]
    plots.save(fig, tmp_path / "counts.png")


def test_a_legend_over_the_data_is_found():
    fig, axes = plots.figure("legend", _cfg())
    ax = axes[0, 0]
    ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50), marker=".", label="rising")
    ax.legend(loc="upper right")
    assert plots.legends_over_data(fig)
    ax.legend(loc="upper left")
    assert plots.legends_over_data(fig) == []
    plots.plt.close(fig)


@pytest.mark.parametrize("seeds", [[0, 1]])  # one seed: the flipping figure below (these take seconds)
def test_report_figures_of_accounting_and_rewinding(tmp_path, drawn, seeds):
    res = {exp: [json.loads((COMMITTED / f"{exp}.json").read_text())] * len(seeds)
           for exp in ("gradient_accounting", "layer_rewinding")}
    cfg = _cfg(seeds=seeds, dataset="fashion_mnist", width=1.0, epochs=50)
    for exp, fn in (("gradient_accounting", report.accounting), ("layer_rewinding", report.rewinding)):
        fn(res[exp], cfg, tmp_path, {})
    assert [d[0] for d in drawn] == ["gradient_accounting.png", "layer_rewinding.png"]
    for _, suptitle, fig in drawn:
        _seeds_ok(suptitle, seeds)
        assert not any(ax.get_lines() and len(ax.get_lines()[0].get_xdata()) > 2 and ax.get_lines()[0].get_linestyle()
                       not in ("None", "", " ") for ax in fig.axes), "a line joins the layer groups"


def _flip_run(seed, noisy_units, clean_units, groups=("conv1", "conv2", "head")):
    rec = [{"kind": kind, "index": i, "n_units": n, "flipped": n < 100, "margin": 1.0 + n,
            "units": [{"group": groups[j % len(groups)]} for j in range(n)],
            "accuracy_drop": {"clean": 0.01, "noisy": 0.02, "test": 0.01 * n}}
           for kind, units in (("noisy", noisy_units), ("clean", clean_units)) for i, n in enumerate(units)]
    return {"config": {"seed": seed}, "groups": list(groups), "records": rec,
            "settings": {"unit": "channel", "max_units": 100}}


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_report_flipping_figure_ticks_at_the_unit_counts(tmp_path, drawn, seeds):
    noisy, clean = [1, 2, 2, 2, 3, 2, 1, 2], [3, 3, 4, 5, 3, 2, 6, 3]
    res = [_flip_run(s, noisy, clean) for s in seeds]
    variants = {"unit: channel, BatchNorm re-estimated (train pass)": [_flip_run(s, noisy, clean) for s in seeds],
                "unit: channel_out": [_flip_run(s, noisy, clean) for s in seeds]}  # long legend entries
    report.flipping(res, _cfg(seeds=seeds), tmp_path, variants)
    (_, suptitle, fig), = drawn
    assert f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" in suptitle
    ticks = [int(t) for t in fig.axes[0].get_xticks()]
    assert ticks == sorted(set(noisy + clean))  # every tick at a count the data take, each count a tick


def test_save_says_where_it_wrote_and_percentages_print_one_way(tmp_path, capsys):
    fig, _ = plots.figure("saved", _cfg())
    path = plots.save(fig, tmp_path / "saved.png")
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    assert (plots.pct(0.9731), plots.pct(None, 4), plots.points(-0.068)) == ("97.3%", "   -", "-6.8 points")


# ----------------------------------------------------------------------------- every script's figures
# Each figure type the scripts draw, from a small result (committed or synthetic). plots.save checks each
# one under plots.STRICT (conftest): no text outside the canvas, no legend over the data.

DEFAULT = REPO / "docs" / "results" / "default" / "seed0"  # committed: accounting and rewinding at the defaults


def _script_cfg(module, **kw):
    """A script's own defaults (its KNOBS parsed with no arguments), as its figures see them."""
    from common import config
    return SimpleNamespace(**{**vars(config.parse(module.KNOBS, [])), **kw})


def _curve(epochs, noisy_from=0.1, noisy_to=1.0):
    """Metrics rows rising as a run memorizes: clean and test high, noisy from `noisy_from` to `noisy_to`."""
    return [{"epoch": e, "clean": 0.8 + 0.2 * e / epochs, "noisy": noisy_from + (noisy_to - noisy_from) * e / epochs,
             "noisy_true": 0.8 * (1 - e / epochs) + 0.05, "test": 0.85 + 0.1 * e / epochs} for e in range(epochs + 1)]


def _saved(tmp_path, *names):
    for name in names:
        assert (tmp_path / name).is_file(), name


def test_gradient_accounting_figures(tmp_path):
    import gradient_accounting as ga
    r = json.loads((DEFAULT / "gradient_accounting.json").read_text())
    cfg = _script_cfg(ga)
    table, phase = r["epochs"], r["memorization_phase"]
    ga.plot_norms(table, "norm_", "norms", "norm of the epoch's gradient sum", cfg, tmp_path / "norms.png")
    ga.plot_norms(table, "per_example_", "per example", "norm / examples", cfg, tmp_path / "per_example.png")
    ga.plot_cosine(table, phase, cfg, tmp_path / "cosine.png")
    ga.plot_accuracy(_curve(cfg.epochs)[1:], phase, cfg, tmp_path / "accuracy.png")
    _saved(tmp_path, "norms.png", "per_example.png", "cosine.png", "accuracy.png")


def test_layer_rewinding_figures(tmp_path):
    import layer_rewinding as lr
    from common import claims
    res = json.loads((DEFAULT / "layer_rewinding.json").read_text())
    cfg = _script_cfg(lr)
    lr.plot_by_depth(cfg, res, tmp_path / "depth.png")
    lr.plot_heatmaps(cfg, res, {c.values["mode"]: c for c in claims.rewinding(res)}, tmp_path / "heatmap.png")
    _saved(tmp_path, "depth.png", "heatmap.png")


def _retraining_result(groups=("conv1", "conv2", "res1.0", "head"), epochs=3):
    def entry(i):
        curve = _curve(epochs, noisy_from=0.05 + 0.3 * (i % 2), noisy_to=0.2 + 0.2 * i)
        return {"reset": curve[0], "final": curve[-1], "curve": curve, "epochs_trained": epochs,
                "control": {"final": {"noisy": 0.99}, "curve": [{**c, "noisy": 0.3 + 0.23 * c["epoch"]} for c in curve]}}
    return {"groups": {g: entry(i) for i, g in enumerate(groups)}, "final_model": {"noisy": 1.0, "clean": 1.0},
            "frozen_bn": "train", "ablation": {"frozen_bn": "eval", "groups": {g: entry(i + 1) for i, g in enumerate(groups)}}}


def test_layer_retraining_figures(tmp_path):
    import layer_retraining as lt
    res = _retraining_result()
    cfg = _script_cfg(lt)
    lt.plot_curves(res, cfg, tmp_path / "curves.png")
    lt.plot_final_noisy(res, cfg, tmp_path / "noisy.png")
    report.retraining([res, _retraining_result()], _cfg(seeds=[0, 1]), tmp_path, {})  # the report's figure
    _saved(tmp_path, "curves.png", "noisy.png", "layer_retraining.png")


def test_neuron_flipping_figures(tmp_path):
    import torch
    import neuron_flipping as nf
    from common.flipping import summarize
    run = _flip_run(0, [1, 2, 2, 2, 3, 2, 1, 100], [3, 3, 4, 5, 3, 2, 6, 100])  # one of each not flipped
    run["records"] += [{**r, "kind": "clean_matched"} for r in run["records"] if r["kind"] == "clean"]
    for r in run["records"]:
        r.update(label=1, true_label=2 if r["kind"] == "noisy" else 1, prediction=2)
    baseline = {"clean": 0.99, "noisy": 1.0, "test": 0.97}
    results = {**run, "summary": summarize(run["records"], baseline, 100)}
    cfg = _script_cfg(nf, n_show=2)
    nf.plot_summary(results, cfg, tmp_path / "summary.png")
    data = SimpleNamespace(x_train=torch.rand(20, 1, 28, 28), image_size=28)
    nf.plot_examples(results, data, cfg, tmp_path / "examples.png")
    _saved(tmp_path, "summary.png", "examples.png")


def test_example_tied_dropout_figures(tmp_path):
    import torch
    import example_tied_dropout as etd
    from common import dropout, plots
    cfg = _script_cfg(etd, epochs=4)
    acc = lambda clean, noisy, test: {"clean": clean, "noisy": noisy, "noisy_true": 1 - noisy, "test": test,  # noqa: E731
                                      "gap": None if test is None else clean - test}
    rows = [etd.row("no dropout", acc(1.0, 1.0, 0.97)), etd.row("standard dropout p=0.4", acc(0.99, 0.3, 0.96)),
            etd.row(f"example-tied dropout p_mem={cfg.p_mem:g}", acc(1.0, 1.0, None), "tied"),
            *[etd.row(f"example-tied dropout p_mem={cfg.p_mem:g}", acc(0.98, 0.03, 0.96), etd.drop_mode_label(s))
              for s in dropout.DROP_SCALINGS]]
    plots.save(etd.bar_chart(rows, cfg), tmp_path / "bars.png")
    metrics = [{**c, "tied": {"clean": c["clean"], "noisy": c["noisy"]},
                **{f"drop_{s}": {**c, "noisy": 0.05} for s in dropout.DROP_SCALINGS}} for c in _curve(4)]
    plots.save(etd.curves(metrics, 0.96, cfg), tmp_path / "curves.png")
    n = 12
    data = SimpleNamespace(x_train=torch.rand(n, 1, 28, 28), y_train=torch.arange(n) % 10, y_true=torch.arange(n) % 7)
    scalings = {s: {"clean_forgotten": [0, 3, 5], "noisy_still_memorized": [] if s == "rescaled" else [7]}
                for s in dropout.DROP_SCALINGS}
    plots.save(etd.plot_gallery(data, scalings, {s: torch.zeros(n, dtype=torch.long) for s in scalings}, cfg, 3),
               tmp_path / "gallery.png")
    drops = {pm: {s: acc(0.99, 0.02 + pm / 5, 0.96) for s in dropout.DROP_SCALINGS} for pm in (0.1, 0.2, 0.4)}
    plots.save(etd.plot_sweep(drops, {pm: {"noisy": 1.0} for pm in drops}, 0.96, cfg), tmp_path / "sweep.png")
    _saved(tmp_path, "bars.png", "curves.png", "gallery.png", "sweep.png")


def _localization_result(methods=("greedy", "oneshot", "hardconcrete"), k_max=5, seed=0):
    """A localization_methods.json, its summaries and comparison written directly (what the figures read)."""
    from common.localization import ORACLE
    ks = range(1, k_max + 1)
    rate = lambda m, scale: [min(1.0, scale * k / (k_max * (1 + methods.index(m) if m in methods else 1)))  # noqa: E731
                             for k in ks]
    plain = {m: {"noisy": {"flip_rate": rate(m, 1.0), "collateral_drop": {str(k): {"clean": 0.01 * k, "test": 0.012 * k}
                                                                              for k in (1, 3, 5)}},
                 "clean": {"flip_rate": rate(m, 0.3)}} for m in methods}
    etd = {m: {"noisy": {"flip_rate": rate(m, 1.0), "precision": rate(m, 0.9), "recall": rate(m, 0.5)}}
           for m in (*methods, ORACLE)}
    base = {m: {"noisy": {"precision": rate(m, 0.2)}} for m in (*methods, ORACLE)}
    stat = lambda v: {"value": v, "ci": [v - 0.1, v + 0.1], "n": 10}  # noqa: E731
    comparison = {m: {"auc": stat(0.6 - 0.1 * i), "ap_minus_a": stat(0.3 - 0.05 * i), "ap_minus_b": stat(0.2),
                      "held_out_at_flip": stat(0.01 * (i + 1)), "forward_equivalents": {"value": 10.0 ** (i + 1)}}
                  for i, m in enumerate((*methods, ORACLE))}
    mask = lambda i: {"trace": [1.0, 0.6, 0.4 - 0.05 * i, 0.35], "converged": i % 2 == 0, "steps": 40}  # noqa: E731
    records = [{"kind": "noisy", "methods": {m: {"mask": mask(i)} for m in methods}} for i in range(3)]
    return {"config": {"max_k": k_max, "n_examples": 3, "seed": seed}, "methods": list(methods),
            "collateral_k": [1, 3, 5], "summary": {"plain": plain, "etd": etd, "etd_base": base},
            "comparison": comparison, "plain": {"records": records}, "etd": {"records": records, "p_gen": 0.4,
                                                                            "p_mem": 0.1, "chance_precision": 0.1},
            "cost_seconds": {m: 0.5 for m in methods}}


def test_localization_methods_figures(tmp_path):
    import localization_methods as lm
    from common.localization import report_section
    res = _localization_result()
    cfg = _script_cfg(lm, n_examples=3, max_k=5)
    lm.plot_plain(res, cfg, tmp_path / "plain.png")
    lm.plot_etd(res, cfg, tmp_path / "etd.png")
    lm.plot_cost(res, cfg, tmp_path / "cost.png")
    lm.plot_convergence(res, cfg, tmp_path / "convergence.png")
    report_section([res, _localization_result(seed=1)], _cfg(seeds=[0, 1]), tmp_path / "report")  # the report's
    _saved(tmp_path, "plain.png", "etd.png", "cost.png", "convergence.png", "report/localization_methods.png")


def test_the_combined_cost_figure_names_the_seeds_it_combines(tmp_path, monkeypatch):
    """--combine draws the comparison over seeds: its subtitle names the inputs' seeds and configuration,
    not the combining command's defaults (seed 0, the script's dataset)."""
    import localization_methods as lm
    from common.runs import write_json
    paths = []
    for seed in (3, 5):
        res = _localization_result(seed=seed)
        res["config"] = {**vars(_script_cfg(lm)), "seed": seed, "model_seed": seed, "noise": 0.2, "epochs": 7}
        write_json(tmp_path / f"s{seed}.json", res)
        paths.append(str(tmp_path / f"s{seed}.json"))
    seen = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: seen.append(fig._suptitle.get_text()) or save(fig, path))
    res = _localization_result()
    lm.plot_tradeoff(res["comparison"], res["methods"], _script_cfg(lm, combine=paths), tmp_path / "cost.png")
    text = seen[-1].replace("\n", " ")
    assert "seeds 3, 5 (data = model seed)" in text and "20% label noise" in text and "7 epochs" in text, text
    lm.plot_tradeoff(res["comparison"], res["methods"], _script_cfg(lm), tmp_path / "one.png")  # one seed's run
    assert "seed 0, model seed 0" in seen[-1]
    _saved(tmp_path, "cost.png", "one.png")


def test_memorization_scores_draws_no_figure():
    """memorization_scores.py writes tables only: nothing to check here until it draws (then add it above)."""
    text = (REPO / "memorization_scores.py").read_text()
    assert "plots" not in text and "savefig" not in text


def test_the_flipping_section_judges_claim_6_only_where_there_are_atypical_targets(tmp_path, drawn):
    from common import claims
    plain = [_flip_run(s, [1, 2, 2, 1], [3, 4, 3, 5]) for s in (0, 1)]
    assert claims.ATYPICAL not in [c.number for c in report.flipping(plain, _cfg(seeds=[0, 1]), tmp_path, {})[2]]
    both = [_flip_run(s, [1, 2, 2, 1], [3, 4, 3, 5]) for s in (0, 1)]
    for r in both:  # memorized=both: atypical clean targets beside the mislabeled and typical ones
        r["records"] += [{**rec, "kind": "atypical", "index": 100 + rec["index"]} for rec in r["records"]
                         if rec["kind"] == "noisy"]
    judged = report.flipping(both, _cfg(seeds=[0, 1]), tmp_path, {})[2]
    six = [c for c in judged if c.number == claims.ATYPICAL]
    assert len(six) == 1 and six[0].values["n"]["atypical"] == 8


def test_the_committed_seed_figures_of_the_localization_page_are_those_its_record_draws(tmp_path, monkeypatch):
    """docs/experiments/localization_methods_seed2_{etd,convergence}.png: redrawn from the committed seed-2
    record, the figures pass the figure checks, have the committed copies' size within a few pixels, and
    the convergence panels state the record's own counts of masks stopped by the rule."""
    import matplotlib.image as mpimg
    import localization_methods as lm
    from common.localization import MASKS
    from common.runs import read_json
    res = read_json(REPO / "docs" / "results" / "localization_methods" / "seed2" / "localization_methods.json")
    cfg = SimpleNamespace(**res["config"])
    seen = {}
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: seen.setdefault(Path(path).name, [
        ax.get_title() for ax in fig.axes]) and save(fig, path))
    lm.plot_etd(res, cfg, tmp_path / "etd.png")
    lm.plot_convergence(res, cfg, tmp_path / "convergence.png")
    for name in ("etd", "convergence"):
        drawn = mpimg.imread(tmp_path / f"{name}.png").shape
        committed = mpimg.imread(REPO / "docs" / "experiments" / f"localization_methods_seed2_{name}.png").shape
        assert abs(drawn[0] - committed[0]) <= 10 and abs(drawn[1] - committed[1]) <= 10, name
    records = res["plain"]["records"] + res["etd"]["records"]
    for m in MASKS:
        n = sum(t["methods"][m]["mask"]["converged"] for t in records)
        assert any(f"{n}/{len(records)} converged" in title for title in seen["convergence.png"]), (m, n)
