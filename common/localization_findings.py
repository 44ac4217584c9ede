"""What the localization comparison's per-target records show beyond its statistics: how the learned
masks stopped, and what the oracle's curve leaves out. docs/experiments/localization_methods.md quotes the
block `findings_section` renders (a test checks it against the committed records):

    python -m common.localization_findings docs/results/localization_methods/seed*/localization_methods.json

Read-only over the records: nothing here makes a number an experiment stores."""
from pathlib import Path

from common import cli
from common.cli import UserError
from common.localization import LABELS, MASKS, ORACLE
from common.runs import read_json


def _records(result):
    return result["plain"]["records"] + ((result.get("etd") or {}).get("records") or [])


def flat_at_cap(mask, tol):
    """True when a mask ran to its cap with the loss half of the stopping rule met at the end (the last
    window's mean loss fell by at most `tol` of the one before): what kept it going was the other half,
    the top-K set changing."""
    t = mask["trace"]
    return not mask["converged"] and len(t) >= 2 and t[-2] - t[-1] <= tol * abs(t[-2])


def findings(results):
    """{masks: {method: {n, converged, flat_at_cap}}, oracle: {kind: {n, all_flipped, flipped_at_k,
    own_channels_mean}}, held_out_before: {model: {kind: accuracy, mean over seeds}}, max_k, mask_max_steps,
    mask_tol} over the records of every seed's result."""
    settings = results[0]["settings"]
    tol = settings["mask_tol"]
    masks, oracle = {}, {}
    for r in results:
        for t in _records(r):
            for m, o in t["methods"].items():
                if m in MASKS:
                    c = masks.setdefault(m, {"n": 0, "converged": 0, "flat_at_cap": 0})
                    c["n"] += 1
                    c["converged"] += bool(o["mask"]["converged"])
                    c["flat_at_cap"] += flat_at_cap(o["mask"], tol)
            if t["model"] == "etd" and ORACLE in t["methods"]:
                c = oracle.setdefault(t["kind"], {"n": 0, "all_flipped": 0, "flipped_at_k": 0, "own": []})
                c["n"] += 1
                c["all_flipped"] += bool(t["oracle_all_flipped"])
                c["flipped_at_k"] += bool(t["methods"][ORACLE]["flipped"][-1])
                c["own"].append(t["own_channels"])
    for c in oracle.values():
        own = c.pop("own")
        c["own_channels_mean"] = sum(own) / len(own)
    before = [r["etd"]["held_out_before"] for r in results if r.get("etd")]
    held_out = {model: {kind: sum(b[model][kind] for b in before) / len(before) for kind in before[0][model]}
                for model in before[0]} if before else {}
    return {"masks": {m: masks[m] for m in MASKS if m in masks}, "oracle": oracle, "held_out_before": held_out,
            "max_k": settings["max_k"], "mask_max_steps": settings["mask_max_steps"], "mask_tol": tol}


def findings_section(paths):
    """The docs' block of findings, from the seeds' localization_methods.json files."""
    results = [read_json(p) for p in paths]
    for p, r in zip(paths, results):
        if not (isinstance(r, dict) and {"settings", "plain"} <= r.keys()):
            raise UserError(f"{p} is not a seed's localization_methods.json (no settings or plain-model records): "
                            f"give the files localization_methods.py writes")
    f = findings(results)
    lines = [f"How the learned masks stopped (stopping rule: the window's mean loss fell by at most "
             f"{f['mask_tol']:.0%} and the top {f['max_k']} units are the same set; cap {f['mask_max_steps']} steps): "
             + "; ".join(f"{LABELS[m]}: {c['converged']}/{c['n']} by the rule, {c['flat_at_cap']} at the cap with a "
                         f"flat loss (the top {f['max_k']} set still changing), "
                         f"{c['n'] - c['converged'] - c['flat_at_cap']} at the cap with the loss still falling"
                         for m, c in f["masks"].items()) + "."]
    if f["oracle"]:
        lines.append(f"Oracle on the ETD model: " + "; ".join(
            f"{kind} targets: every own channel zeroed flips {c['all_flipped']}/{c['n']}, its top {f['max_k']} "
            f"units flip {c['flipped_at_k']}/{c['n']} (own channels per target: {c['own_channels_mean']:.1f} "
            f"on average)" for kind, c in sorted(f["oracle"].items(), key=lambda kv: kv[0] != "noisy")) + ".")
    if f["held_out_before"]:
        names = {"etd": "the ETD model", "etd_base": "baseline (a), the plain weights with the masks pinned"}
        lines.append("Held-out training examples' accuracy before any unit is zeroed (tied: each its own mask; mean "
                     "over seeds): " + "; ".join(f"{names.get(m, m)}: " + ", ".join(
                         f"{kind} {acc:.1%}" for kind, acc in accs.items()) for m, accs in f["held_out_before"].items()) + ".")
    return "\n".join(lines)


def main(argv):
    if not argv:
        raise UserError("no records given: python -m common.localization_findings SEED.json [SEED.json ...] "
                        "(each seed's localization_methods.json)")
    missing = [p for p in argv if not Path(p).is_file()]
    if missing:
        raise UserError(f"no file {missing[0]}: give each seed's localization_methods.json")
    print(findings_section(argv))


if __name__ == "__main__":
    cli.run(main)
