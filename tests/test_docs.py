"""The docs match the code: the README's claims table is the one its claims.json generates, every knob
default a docs page states is the script's, and every command the docs show names files and knobs that
exist (parsed and validated the way the script itself would, without running the experiment)."""
import ast
import functools
import importlib
import re
import shlex
import subprocess
import sys

import pytest

from common import config, report
from common.cli import UserError
from common.runs import read_json

from conftest import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "docs" / "experiments").glob("*.md")])
SCRIPTS = {p.stem for p in REPO.glob("*.py")}
# Paths the docs use for the reader's own files (their data, their checkpoints); no command creates them.
READERS_OWN = {"my_data.npz", "my_ckpts", "my_ckpts/", "mypackage.nets"}


def test_readme_claims_block_is_generated_from_its_claims_json():
    text = (REPO / "README.md").read_text()
    source = report.readme_source(text)
    assert source, "README.md has no generated claims block"
    block = report.readme_block(source, REPO)
    assert block in text, (f"README.md's claims table differs from {source}: run "
                           f"python reproduce.py --readme={source}")
    assert text.count(report.README_END) == 1


def test_a_readme_row_never_mixes_two_runs():
    """The generated block names one report (one run: one model, one machine) and holds only its rows."""
    text = (REPO / "README.md").read_text()
    source = report.readme_source(text)
    block = text[text.index(report.README_BEGIN.split("{path}")[0]):text.index(report.README_END)]
    import json
    rows = json.loads((REPO / source).read_text())
    body = [r for r in block.splitlines() if r.startswith("| ") and not r.startswith("| #")]
    assert len(body) == len(rows)
    assert block.count("](") == 1  # one report linked


def test_the_readme_step_refuses_a_missing_claims_file(tmp_path):
    out = subprocess.run([sys.executable, "reproduce.py", "--readme=docs/results/nothing.json"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "nothing.json" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _knob_tables():
    """(page, script, knob, default text) for every row of a "| knob | default | meaning |" table."""
    for page in DOCS:
        script = page.stem if page.stem in SCRIPTS else None
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.replace(" ", "") != "|knob|default|meaning|" or script is None:
                continue
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
                names = [n.strip("` ") for n in cells[0].split(",")]
                if cells[1].endswith(".py's"):  # "example_tied_dropout.py's": the same defaults as there
                    yield from ((page.name, script, n, ("same", cells[1][:-5])) for n in names)
                    continue
                values = _split(cells[1]) if len(names) > 1 else [cells[1]]
                assert len(values) == len(names), f"{page.name}: {row}"
                yield from ((page.name, script, n, v) for n, v in zip(names, values))


def _split(text):
    """'0.1, 0.02' -> ['0.1', '0.02'] (commas outside brackets)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def _doc_value(text):
    """A default as the docs write it: `None`, 0.01, `"auto"`, `final`, None (auto)."""
    text = text.strip().strip("`")
    for candidate in (text, text.split(" ")[0]):
        try:
            return ast.literal_eval(candidate)
        except (ValueError, SyntaxError):
            pass
    return text


KNOB_ROWS = list(_knob_tables())


def test_knob_tables_exist():
    assert len({script for _, script, _, _ in KNOB_ROWS}) >= 6


@pytest.mark.parametrize("page,script,knob,default", KNOB_ROWS, ids=[f"{r[1]}.{r[2]}" for r in KNOB_ROWS])
def test_knob_defaults_in_the_docs_are_the_code_defaults(page, script, knob, default):
    knobs = importlib.import_module(script).KNOBS
    assert knob in knobs, f"{page} documents --{knob}, which {script}.py does not have"
    if isinstance(default, tuple):  # "the same as that script's"
        other = importlib.import_module(default[1].removesuffix(".py")).KNOBS
        assert knobs[knob] == other[knob], f"{page}: --{knob} default differs from {default[1]}'s"
        return
    code, doc = knobs[knob], _doc_value(default)
    assert doc == code or (isinstance(code, str) and str(doc) == code), \
        f"{page}: --{knob} default {default!r}, {script}.py: {code!r}"


# ----------------------------------------------------------------------------- the commands the docs show

def _commands(text):
    """`python ...` commands of the fenced bash blocks: continuation lines joined, comments dropped, shell
    variables set in the block (M="...") expanded."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            for part in re.split(r";\s*(?=python )", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if len(words) == 1 and "=" in words[0] and words[0].split("=")[0].isidentifier():
                    env[words[0].split("=")[0]] = words[0].split("=", 1)[1]
                    continue
                words = [w for x in words for w in (shlex.split(env[x[1:]]) if x.startswith("$") and x[1:] in env
                                                      else [x])]
                if words and words[0] == "python":
                    yield words[1:]


def _inline_commands(text):
    """`python ...` code spans of the prose (outside fenced blocks), e.g. the command a results paragraph
    cites; a span with a placeholder (<script>, =R, =MODE, script.py) is a pattern, not a command."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    for span in re.findall(r"`(python [^`]+)`", prose):
        words = shlex.split(span)[1:]
        if "<" in span or re.search(r"=[A-Z]+\b", span) or words[:1] == ["script.py"]:
            continue
        yield words


COMMANDS = [(page.relative_to(REPO).as_posix(), cmd) for page in DOCS
            for cmd in [*_commands(page.read_text()), *_inline_commands(page.read_text())]]


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40 and {c[0] for c in COMMANDS} >= {"README.md", "docs/own_model.md"}


def _check_files(page, args):
    for a in args:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        for path in re.findall(r"(?:npz:)?([\w./-]+\.(?:py|npz))", value):
            name = path.split(":")[0]
            created = "tiny512.npz" if name == "tiny512.npz" else None  # written by the page's first command
            assert name in READERS_OWN or created or (REPO / name).exists(), f"{page}: {a}: no file {name}"


@pytest.mark.parametrize("page,cmd", COMMANDS, ids=[f"{p}:{' '.join(c)[:60]}" for p, c in COMMANDS])
def test_every_command_in_the_docs_names_existing_files_and_knobs(page, cmd):
    if cmd[0] == "-c":  # inline Python: it must at least compile
        compile(cmd[1], page, "exec")
        return
    if cmd[0] == "-m":
        if cmd[1] == "common.localization_findings":  # reads the seeds' records: every one named must exist
            assert all((REPO / a).is_file() and a.endswith(".json") for a in cmd[2:]), f"{page}: {' '.join(cmd)}"
            return
        assert cmd[1] in ("pytest", "torch.distributed.run"), f"{page}: python -m {cmd[1]}"
        return
    script, args = cmd[0], [a.strip("[]") if a.startswith("[--") else a for a in cmd[1:]]  # [--optional]
    assert (REPO / script).is_file(), f"{page}: python {script}: no such script"
    _check_files(page, args)
    name = script[:-3].replace("/", ".")
    module = importlib.import_module(name)
    if not hasattr(module, "KNOBS"):
        return
    if name == "reproduce" or name == "sweep":  # their other keys go to the experiments' scripts
        own = [a for a in args if not a.startswith("--") or a[2:].split("=")[0] in module.KNOBS]
        rest = [a[2:].split("=")[0] for a in args if a.startswith("--") and a[2:].split("=")[0] not in module.KNOBS]
        known = set().union(*(importlib.import_module(e).KNOBS for e in ("gradient_accounting", "layer_rewinding",
                                                                        "layer_retraining", "neuron_flipping",
                                                                        "example_tied_dropout")))
        assert set(rest) <= known, f"{page}: {' '.join(cmd)}: unknown keys {set(rest) - known}"
        args = own
    parse = getattr(module, "parse_args", None) or (lambda argv: config.parse(module.KNOBS, argv))  # its own, if any
    try:
        parse([a for a in args if a not in ("--help", "-h")])
    except UserError as e:
        if any(n in str(e) for n in READERS_OWN | {"tiny512.npz"}):  # the reader's own files, not ours
            return
        raise AssertionError(f"{page}: python {' '.join(cmd)}: {e}")


def test_the_inline_python_of_the_docs_runs(tmp_path):
    """The `python -c` commands (e.g. own_model.md's tiny512.npz) really run, in a scratch directory."""
    import os
    inline = [(page, cmd[1]) for page, cmd in COMMANDS if cmd[0] == "-c"]
    assert inline
    for page, code in inline:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert out.returncode == 0, f"{page}: {code[:60]}: {out.stderr[-300:]}"
    if (tmp_path / "tiny512.npz").exists():  # the data it writes loads as a dataset
        from types import SimpleNamespace
        from common.data import load_data
        data = load_data(SimpleNamespace(dataset=f"npz:{tmp_path / 'tiny512.npz'}", seed=0, noise=0.1))
        assert len(data.y_train) == 512 and data.num_classes == 10


def test_a_default_stated_in_prose_names_its_knob_and_is_the_codes():
    """"the default `knob` is value" (or "... `knob` ...; the default is value" in one sentence) anywhere in
    the docs: the knob is named and the value is the code's."""
    knobs = {}
    for s in sorted(SCRIPTS):
        module = importlib.import_module(s) if (REPO / f"{s}.py").read_text().find("KNOBS") >= 0 else None
        for k, v in getattr(module, "KNOBS", {}).items():
            knobs.setdefault(k, v)
    found = 0
    for page in DOCS:
        text = page.read_text().replace("\n", " ")
        for m in re.finditer(r"default(?: `([a-z_]+)`)? is `?([^`\s;,)]+?)`?[.;,)\s]", text):
            sentence = text[max(text.rfind(". ", 0, m.start()), 0):m.end()]
            names = [m[1]] if m[1] else [n for n in re.findall(r"`(?:--)?([a-z_]+)(?:=[^`]*)?`", sentence) if n in knobs]
            where = f"{page.name}: {sentence.strip()[-120:]!r}"
            assert names, f"{where}: name the knob whose default this is"
            assert _doc_value(m[2]) in (knobs[names[-1]], str(knobs[names[-1]])), \
                f"{where}: the code's default of {names[-1]} is {knobs[names[-1]]!r}"
            found += 1
    assert found >= 2


# Small settings that keep an experiment's run to seconds on the tiny run (they override the page's).
# gradient_accounting and example_tied_dropout train whole runs (30-40 s here): their commands are checked
# by the parse above only.
SMALL = {"layer_rewinding": {"rewind_epochs": [0, 19]}, "layer_retraining": {"retrain_epochs": 1},
         "neuron_flipping": {"n_examples": 1, "max_units": 5, "ref_batch": 15, "n_eot": 1, "collateral_n": 50}}


def _runnable(page, cmd):
    """An experiment page's command that reuses the trained run (no identity key, no preset): it can run
    on the tiny run at a small size."""
    script = cmd[0].removesuffix(".py")
    identity = set(config.identity_keys())
    return (script in SMALL and page == f"docs/experiments/{script}.md"
            and not any(a.endswith(".py") or a[2:].split("=")[0] in identity | {"runs_dir"} for a in cmd[1:]))


RUNNABLE = {}
for _page, _cmd in COMMANDS:  # per experiment page, the runnable command that sets the most knobs
    if _runnable(_page, _cmd) and len(_cmd) > len(RUNNABLE.get(_page, [])):
        RUNNABLE[_page] = _cmd


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_a_command_of_each_experiment_page_runs_on_the_tiny_run(page, tiny_trained, tiny_argv, tmp_path):
    import shutil
    cmd = RUNNABLE[page]
    script = cmd[0].removesuffix(".py")
    _, _, _, run = tiny_trained
    runs = tmp_path / "runs"
    shutil.copytree(run.dir, runs / run.dir.name)  # the shared run stays untouched
    small = [f"--{k}={v}" for k, v in SMALL[script].items()]  # last: the page's knobs, at a small size
    importlib.import_module(script).main(tiny_argv(runs_dir=runs) + list(cmd[1:]) + small)
    assert any((runs / run.dir.name).glob(f"{script}*.json")), f"{page}: python {' '.join(cmd)} wrote no results"


def test_the_gpu_seeds_section_quotes_its_committed_logs():
    """docs/benchmarks.md's lent-GPU section quotes lines of docs/results/gpu_2026-12-04/ and derives the
    seconds per localization target from the last progress line quoted."""
    import re
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    text = (repo / "docs" / "benchmarks.md").read_text()
    section = text[text.index("## Seeds on a lent GPU"):].replace("\n", " ")
    logs = repo / "docs" / "results" / "gpu_2026-12-04"
    default = (logs / "default.log").read_text()
    progress = [line for line in (logs / "localization.log").read_text().splitlines() if line.startswith("plain model:")]
    quoted = re.search(r"`(error: seed 0: [^`]*)`", section).group(1)
    assert default.startswith(quoted) and quoted.endswith("changed)")
    assert f"`{progress[-1]}`" in section
    n, minutes, seconds = map(int, re.search(r"(\d+)/\d+ .* (\d+):(\d+) elapsed", progress[-1]).groups())
    assert f"which is {(60 * minutes + seconds) / n:.0f} s per target" in section


def test_the_fast_preset_time_and_verdicts_are_those_of_its_committed_report():
    """README and benchmarks quote make reproduce-fast's wall time from its report's invocations, and its
    verdicts are the default reproduction's on every row both reports have."""
    results = REPO / "docs" / "results"
    words = report._wall_words(read_json(results / "mnist_5k_fast_cpu" / "report.json")["invocations"])
    assert "min of wall time" in words
    for page in (REPO / "README.md", REPO / "docs" / "benchmarks.md"):
        assert words in " ".join(page.read_text().split()), page
    verdicts = lambda name: {(c["number"], c["variant"]): c["verdict"] for c in read_json(results / name / "claims.json")}
    fast, default = verdicts("mnist_5k_fast_cpu"), verdicts("default")
    assert len(fast) >= 5 and all(default[k] == v for k, v in fast.items())


@functools.lru_cache(maxsize=1)
def _localization_committed():
    """The committed comparison and the seeds' records it was made from (read once: ~50 MB)."""
    out = read_json(REPO / "docs" / "experiments" / "localization_methods.json")
    return out, [read_json(REPO / p) for p in out["inputs"]]


def test_the_localization_page_quotes_its_committed_comparison_and_findings():
    """docs/experiments/localization_methods.md holds, verbatim, the block `measured_section` renders from
    the committed comparison and the block common.localization_findings renders from the seeds' records;
    the comparison is of >= 3 seeds of >= 50 targets of each kind, its inputs are the committed records, and
    its counts and point estimates are those the records give (recomputed; the CIs' resampling aside)."""
    import localization_methods
    from common.localization import compare
    from common.localization_findings import findings_section
    page = " ".join((REPO / "docs" / "experiments" / "localization_methods.md").read_text().split())
    out, res = _localization_committed()
    assert " ".join(localization_methods.measured_section(out).split()) in page
    inputs = [REPO / p for p in out["inputs"]]
    assert len(inputs) >= 3 and all(p.is_file() and p.is_relative_to(REPO / "docs" / "results") for p in inputs)
    assert " ".join(findings_section(inputs).split()) in page  # the command's own reading of the files
    assert all(n >= 50 for t in out["targets"] for n in t.values()) and len(set(out["seeds"])) >= 3
    assert [r["config"]["seed"] for r in res] == out["seeds"]
    n = {t["plain/noisy"] for t in out["targets"]} | {t["plain/clean"] for t in out["targets"]}
    words = {11: "eleven"}[len([m for m in out["comparison"] if m != "oracle"])]  # the README's pointer
    readme = " ".join((REPO / "README.md").read_text().split())
    assert len(n) == 1 and f"({words} methods on the same targets, {len(out['seeds'])} seeds x {n.pop()} noisy and" in readme
    again = compare(res, resamples=20)
    assert again.keys() == out["comparison"].keys()
    for m, stats in again.items():
        for key, v in stats.items():
            w = out["comparison"][m][key]
            assert (v is None) == (w is None), (m, key)
            if v is not None:
                assert v["n"] == w["n"] and (v["value"] == w["value"] or v["value"] != v["value"] and w["value"] != w["value"]), (m, key)


def test_the_localization_conclusions_follow_from_the_committed_comparison():
    """Every statement of the localization page's "What these numbers say", checked against the committed
    comparison (docs/experiments/localization_methods.json) and the seeds' records it was made from."""
    from common.localization_findings import findings
    out, res = _localization_committed()
    c = {m: {k: v for k, v in s.items() if v} for m, s in out["comparison"].items()}
    val = lambda m, k: c[m][k]["value"]  # noqa: E731
    lo = lambda m, k: c[m][k]["ci"][0]  # noqa: E731
    hi = lambda m, k: c[m][k]["ci"][1]  # noqa: E731
    methods = [m for m in c if m != "oracle"]
    f = findings(res)
    # flipping: four methods with a median of <= 2 units, within a few hundredths; the margins over greedy
    fast = ["greedy", "zeroout", "hardconcrete", "slimming"]
    assert {m for m in methods if val(m, "median_k") <= 2} == set(fast)
    assert max(val(m, "auc") for m in fast) - min(val(m, "auc") for m in fast) < 0.05
    assert lo("slimming", "auc_vs_greedy") > 0 and lo("zeroout", "auc_vs_greedy") <= 0 <= hi("zeroout", "auc_vs_greedy")
    assert hi("hardconcrete", "auc_vs_greedy") <= 0
    for m in ("oneshot", "ig"):
        assert hi(m, "auc_vs_greedy") < 0 and val(m, "median_k") == val("greedy", "median_k") + 1
    assert all(val(m, "median_k") >= 5 for m in ("ig_act", "keep_hc", "keep_slim"))
    assert lo("activation", "auc") <= hi("random", "auc")
    # what a flip costs
    for key in ("collateral_at_flip", "held_out_at_flip"):
        assert min(methods, key=lambda m: val(m, key)) == "slimming"
    assert hi("slimming", "held_out_at_flip") < lo("greedy", "held_out_at_flip")
    # against the known answer
    assert round(max(val(m, "ap_minus_a") for m in methods), 2) <= 0.05
    assert round(max(val(m, "ap_minus_b") for m in methods), 2) <= 0.07
    assert max(val(m, "ap_minus_a") for m in methods) < val("random", "ap")
    assert all(hi(m, "ap_minus_a") < 0 for m in ("keep_hc", "keep_slim"))
    assert all(hi(m, "precision5_minus_a") < 0 for m in ("oneshot", "ig", "ig_act", "zeroout"))
    assert all(0.15 <= val("slimming", k) <= 0.25 and lo("slimming", k) > 0.1
               for k in ("precision5_minus_a", "precision5_minus_b"))
    assert max(val(m, "precision5_minus_a") for m in methods if m != "slimming") < 0.1
    assert all(acc < 0.2 for acc in f["held_out_before"]["etd_base"].values())
    assert all(acc > 0.9 for acc in f["held_out_before"]["etd"].values())
    # the oracle
    k, noisy, clean = out["settings"]["max_k"], f["oracle"]["noisy"], f["oracle"]["clean"]
    assert k / 3 < 0.25 * noisy["own_channels_mean"]
    assert val("oracle", "etd_auc") < min(val(m, "etd_auc") for m in methods if m not in ("random", "activation"))
    assert val("oracle", "etd_auc") - val("random", "etd_auc") < 0.05
    assert noisy["all_flipped"] >= 0.9 * noisy["n"] and clean["all_flipped"] <= 0.1 * clean["n"]
    assert val("oracle", "held_out_at_flip") == 0 and min(val(m, "held_out_at_flip") for m in methods) > 0.02
    # convergence
    masks = f["masks"]
    assert masks["hardconcrete"]["converged"] == masks["hardconcrete"]["n"]
    assert all(masks[m]["converged"] > 0.85 * masks[m]["n"] for m in ("keep_hc", "keep_slim"))
    assert masks["slimming"]["converged"] < 0.05 * masks["slimming"]["n"] < masks["slimming"]["flat_at_cap"] / 18
    assert out["settings"]["mask_max_steps"] == 1000
    # settings: the removal masks' largest penalty on every seed, AUC rising; the keep masks' vary
    for t in out["tuning"]:
        for m in ("hardconcrete", "slimming"):
            aucs = [a for _, a in sorted((float(p), a) for p, a in t[m]["auc"].items())]
            assert t[m]["chosen"] == max(float(p) for p in t[m]["auc"]) and aucs == sorted(aucs)
    assert out["settings"]["n_dev"] == 2
    assert all(len({t[m]["chosen"] for t in out["tuning"]}) > 1 for m in ("keep_hc", "keep_slim"))
    # compute
    fe = lambda m: val(m, "forward_equivalents")  # noqa: E731
    assert 1 / 30 < fe("oneshot") / fe("greedy") < 1 / 15 and -0.05 < val("oneshot", "auc_vs_greedy") < 0
    assert fe("zeroout") < fe("greedy") and 10 < fe("slimming") / fe("greedy") < 100
