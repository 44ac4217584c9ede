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
