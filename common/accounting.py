"""Gradient accounting: split every minibatch gradient exactly into its clean part and its noisy part.

    loss = mean_i l_i = (1/B) sum_{clean i} l_i + (1/B) sum_{noisy i} l_i      (B = batch size)

With a control group (a seeded random subset of the clean examples, as large as the noisy set) the
clean part is split once more: clean = clean-rest + control, so total = clean-rest + control + noisy.
The control is what any 10% of the data would contribute: the noisy part is judged against it.
A second, loss-matched control is chosen anew before every epoch (loss_matched_mask): the clean
examples whose loss at the start of the epoch is nearest the noisy ones' (one per noisy example,
without replacement, as far as there are clean examples). It tells "mislabeled examples carry a
large gradient" apart from "high-loss examples carry a large gradient".

`GradientAccountant.backward(losses, idx)` is the training loop's backward hook. It leaves in `.grad`
exactly what plain training leaves there and, on the side, adds this step's total gradient, its
clean part, its control part and its loss-matched part to per-parameter sums on the training device
(noisy = total - clean, clean-rest = clean - control). `end_epoch()` reduces the epoch's sums to a few scalars per layer
group (the only copy to the host), returns them for the epoch's metrics row and starts the next
epoch's sums from zero.

With `atypical` (memorized=both: the memorized set holds mislabeled and atypical clean examples) the
noisy part is split once more, by one more backward per step that has atypical examples: noisy =
mislabeled + atypical, so total = typical clean + mislabeled + atypical. Each kind's share of the
total is its projection on it, <part, total> / |total|^2: the shares of the three kinds add up to 1,
the mislabeled and atypical shares to the (lumped) noisy share. Without it nothing changes: the
default (memorized=noisy) numbers and keys are those of before the split existed.

The rest turns metrics rows into the experiment's tables: per-epoch, per-group norms (raw and per
example), the memorization phase, and its summary.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .models import group_params
from .precision import autocast
from .rng import generator

KEY = "grad_accounting"  # the key of the accounting numbers inside a metrics row
# With the atypical split (memorized=both): the dot products end_epoch computes per group (a = atypical
# part, ml = mislabeled part = noisy - atypical, c = clean (typical) part, t = total, n = noisy) and the
# per-group lists it reports from them.
SPLIT_DOTS = ("a.a", "ml.ml", "a.ml", "c.a", "c.ml", "t.a", "t.ml", "t.c", "t.n")
SPLIT_KEYS = ("norm_mislabeled", "norm_atypical", "cosine_mislabeled_atypical", "cosine_clean_mislabeled",
              "cosine_clean_atypical", "share_clean", "share_mislabeled", "share_atypical", "share_noisy")
KIND_ACCURACIES = ("typical", "mislabeled", "atypical")  # metrics-row accuracies of each kind (memorized != noisy)


def _add(buffers, grads):
    """buffers[i] += grads[i] (a parameter no path reached has grad None: nothing to add)."""
    pairs = [(b, g) for b, g in zip(buffers, grads) if g is not None]
    if pairs:
        torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])


def control_mask(noisy, seed):
    """The control group: a seeded random subset of the clean examples as large as the noisy set
    (boolean mask on noisy's device)."""
    clean = torch.nonzero(~noisy.cpu()).flatten()
    k = min(int(noisy.sum()), len(clean))
    pick = clean[torch.randperm(len(clean), generator=generator(seed, "accounting_control"))[:k]]
    mask = torch.zeros(len(noisy), dtype=torch.bool)
    mask[pick] = True
    return mask.to(noisy.device)


@torch.no_grad()
def example_losses(model, data, amp=True, batch_size=1024):
    """Per-example cross-entropy of every training example (its training label), in eval mode (training
    mode restored after): nothing of the model changes, so training continues exactly as without it.
    Under torchrun every rank computes its slice and gets all of them."""
    was_training = model.training
    model.eval()
    idx = torch.arange(data.n_train, device=data.device)
    lo, hi = distributed.shard_bounds(len(idx)) if distributed.active() else (0, len(idx))
    out = []
    for start in range(lo, hi, batch_size):
        i = idx[start:min(start + batch_size, hi)]
        with autocast(data.device, amp):
            logits = model(data.batch(i), index=i)
        out.append(F.cross_entropy(logits.float(), data.labels(i), reduction="none"))
    model.train(was_training)
    mine = torch.cat(out) if out else torch.zeros(0, device=data.device)
    return distributed.all_gather_cat(mine, len(idx)) if distributed.active() else mine


def loss_matched_mask(losses, noisy):
    """The loss-matched control: for each noisy example, hardest first, the clean example of nearest loss
    not taken yet (a tie goes to the higher loss: the control then errs on the hard side). As many as
    the noisy examples, or every clean one if there are fewer. Returns (mask on noisy's device, info:
    mean losses of the noisy / matched / all clean examples and the mean absolute loss gap of the pairs)."""
    loss = losses.detach().double().cpu().numpy()
    nz = noisy.cpu().numpy()
    noisy_idx, clean_idx = np.flatnonzero(nz), np.flatnonzero(~nz)
    order = clean_idx[np.argsort(loss[clean_idx], kind="stable")]
    sorted_loss = loss[order]
    n = len(order)
    # free neighbours by union-find: right[i] = the first free position >= i (n: none), left[i + 1] = the
    # last free position <= i (-1: none); taking position j links it to its neighbours
    right, left = list(range(n + 1)), list(range(-1, n))

    def find(parent, i, shift=0):
        root = i
        while parent[root + shift] != root:
            root = parent[root + shift]
        while parent[i + shift] != root:
            parent[i + shift], i = root, parent[i + shift]
        return root

    pairs = []
    for i in sorted(noisy_idx, key=lambda i: (-loss[i], i))[:n]:
        pos = int(np.searchsorted(sorted_loss, loss[i]))
        r, lf = find(right, min(pos, n)), find(left, pos - 1, 1)
        j = r if lf < 0 or (r < n and sorted_loss[r] - loss[i] <= loss[i] - sorted_loss[lf]) else lf
        right[j], left[j + 1] = j + 1, j - 1
        pairs.append((i, order[j]))
    mask = torch.zeros(len(nz), dtype=torch.bool)
    mask[[j for _, j in pairs]] = True
    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    info = {"n_matched": len(pairs), "loss_noisy": mean(loss[noisy_idx]),
            "loss_matched": mean([loss[j] for _, j in pairs]), "loss_clean": mean(loss[clean_idx]),
            "loss_gap": mean([abs(loss[i] - loss[j]) for i, j in pairs])}
    return mask.to(noisy.device), info


class GradientAccountant:
    """Per-group sums over an epoch of the total gradient, of its clean part and (with `control`) of
    its control part, kept on the device.

    `noisy`: the boolean noise mask of the training set (data.noisy), on the training device.
    `control`: None, or the boolean mask of the control group (control_mask), on the same device:
    one more backward per step that has control examples.
    `matched`: account a loss-matched control too; its mask is set before each epoch by
    `match(mask, info)` (loss_matched_mask): one more backward per step that has matched examples.
    `atypical`: None, or the boolean mask of the atypical clean examples inside `noisy` (memorized=both):
    one more backward per step that has atypical examples; the noisy part is then reported split into
    mislabeled (noisy and not atypical) and atypical.
    `skip_pure`: skip a backward whose part is empty or the whole batch (no noisy or no clean
    example; no control example). Deciding that needs counts on the host; free on the CPU, a
    per-step synchronization on an accelerator, so by default only on the CPU (elsewhere such a
    backward simply returns zeros, resp. the total)."""

    def __init__(self, model, noisy, control=None, skip_pure=None, matched=False, atypical=None):
        groups = group_params(model)
        self.groups = list(groups)
        self.params, self.slices = [], []
        for params in groups.values():
            mine = [p for p in params if p.requires_grad]
            self.slices.append(list(range(len(self.params), len(self.params) + len(mine))))
            self.params += mine
        self.sizes = [sum(self.params[i].numel() for i in s) for s in self.slices]
        self.noisy, self.control = noisy, control
        if control is not None and bool((control & noisy).any()):
            raise ValueError("the control group must hold clean examples only")
        if atypical is not None and bool((atypical & ~noisy).any()):
            raise ValueError("the atypical examples must lie inside the memorized set (noisy)")
        self.atypical = atypical
        self.skip_pure = noisy.device.type == "cpu" if skip_pure is None else skip_pure
        zeros = lambda: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]  # noqa: E731
        self.total, self.clean = zeros(), zeros()
        self.ctrl = zeros() if control is not None else []
        self.matched, self.match_info = (torch.zeros_like(noisy) if matched else None), {}
        self.mtch = zeros() if matched else []
        self.atyp = zeros() if atypical is not None else []
        self.n_atypical = torch.zeros((), dtype=torch.long, device=noisy.device)
        self.n_noisy = torch.zeros((), dtype=torch.long, device=noisy.device)
        self.n_control = torch.zeros((), dtype=torch.long, device=noisy.device)
        self.n_matched = torch.zeros((), dtype=torch.long, device=noisy.device)
        self.n_seen = 0

    def match(self, mask, info):
        """The loss-matched control of the coming epoch (loss_matched_mask's mask and info)."""
        if self.matched is None:
            raise ValueError("this accountant was made without matched=True")
        if bool((mask & self.noisy).any()):
            raise ValueError("the loss-matched control must hold clean examples only")
        self.matched, self.match_info = mask, info

    def backward(self, losses, idx):
        """Backward hook of common.training.train_epoch: `losses` per example, `idx` their indices."""
        noisy = self.noisy[idx]
        ctrl = self.control[idx] if self.control is not None else None
        mtch = self.matched[idx] if self.matched is not None else None
        atyp = self.atypical[idx] if self.atypical is not None else None
        b = losses.shape[0]
        self.n_noisy += noisy.sum()
        if ctrl is not None:
            self.n_control += ctrl.sum()
        if mtch is not None:
            self.n_matched += mtch.sum()
        if atyp is not None:
            self.n_atypical += atyp.sum()
        self.n_seen += b
        # Which parts need a backward of their own: "all" (the part is the whole batch: its gradient
        # is the total), "none" (empty: zero), "mixed" (a backward through the retained graph).
        parts = [(self.clean, ~noisy), (self.ctrl, ctrl), (self.mtch, mtch), (self.atyp, atyp)]
        kinds = ["mixed" if mask is not None else "none" for _, mask in parts]
        if self.skip_pure and not distributed.active():  # under torchrun every rank runs every backward
            # (synced BatchNorm communicates in each; whether a rank's slice is pure differs by rank)
            for k, (_, mask) in enumerate(parts):
                if mask is not None:
                    c = int(mask.sum())
                    kinds[k] = "all" if c == b else "none" if c == 0 else "mixed"
        mixed = [(buffers, mask) for kind, (buffers, mask) in zip(kinds, parts) if kind == "mixed"]
        # The full backward FIRST, exactly as plain training does it: `.grad` is then bit for bit the
        # plain gradient and the optimizer step is unchanged. (Backwarding the clean part and then the
        # noisy part into `.grad` would leave g_clean + g_noisy there, which in floating point is not
        # bitwise the gradient of the whole loss, so the trajectory would drift from plain training.)
        losses.mean().backward(retain_graph=bool(mixed))
        grads = [p.grad for p in self.params]
        _add(self.total, grads)
        for kind, (buffers, _) in zip(kinds, parts):
            if kind == "all":
                _add(buffers, grads)
        # The mixed parts through the retained graph: autograd.grad returns them without touching
        # `.grad`; noisy = total - clean, clean-rest = clean - control and mislabeled = noisy - atypical
        # at the end of the epoch.
        for i, (buffers, mask) in enumerate(mixed):
            part = torch.autograd.grad((losses * mask.to(losses.dtype)).sum() / b, self.params, allow_unused=True,
                                       retain_graph=i < len(mixed) - 1)
            _add(buffers, part)

    @torch.no_grad()
    def end_epoch(self, epoch=None):
        """This epoch's accounting {KEY: {...}} (norms per group, counts, cosines); resets the sums."""
        # float64 for the reductions where the device has it (MPS has not)
        dtype = torch.float32 if self.noisy.device.type == "mps" else torch.float64
        device = self.noisy.device
        if distributed.active():  # each rank summed its shares of every batch: together, a single process's sums
            for b in self.total + self.clean + self.ctrl + self.mtch + self.atyp:
                distributed.all_reduce_sum_(b)
            distributed.all_reduce_sum_(self.n_noisy)
            distributed.all_reduce_sum_(self.n_control)
            distributed.all_reduce_sum_(self.n_matched)
            distributed.all_reduce_sum_(self.n_atypical)
            self.n_seen = int(distributed.all_reduce_sum_(torch.tensor(self.n_seen, device=device)))
        control, matched, split = self.control is not None, self.matched is not None, self.atypical is not None
        width = 4 + 4 * control + 4 * matched + len(SPLIT_DOTS) * split
        at_matched, at_split = 4 + 4 * control, 4 + 4 * control + 4 * matched  # their numbers' place in a row
        stats = []
        for s in self.slices:
            if not s:  # a group without trainable parameters
                stats.append(torch.zeros(width, dtype=dtype, device=device))
                continue
            t = torch.cat([self.total[i].flatten() for i in s]).to(dtype)
            c = torch.cat([self.clean[i].flatten() for i in s]).to(dtype)
            n = t - c
            row = [t @ t, c @ c, n @ n, c @ n]
            if control:
                k = torch.cat([self.ctrl[i].flatten() for i in s]).to(dtype)
                r = c - k  # clean-rest
                row += [k @ k, r @ r, r @ n, k @ r]
            if matched:
                m = torch.cat([self.mtch[i].flatten() for i in s]).to(dtype)
                o = c - m  # the clean examples outside the loss-matched control
                row += [m @ m, o @ o, m @ n, m @ o]
            if split:
                a = torch.cat([self.atyp[i].flatten() for i in s]).to(dtype)
                ml = n - a  # mislabeled = noisy - atypical
                row += [a @ a, ml @ ml, a @ ml, c @ a, c @ ml, t @ a, t @ ml, t @ c, t @ n]  # SPLIT_DOTS
            stats.append(torch.stack(row))
        stats = torch.stack(stats).cpu().tolist()  # the epoch's only copy to the host: a few numbers per group
        n_noisy = int(self.n_noisy)
        out = {"groups": self.groups, "n_clean": self.n_seen - n_noisy, "n_noisy": n_noisy,
               "norm_total": [], "norm_clean": [], "norm_noisy": [], "cosine": []}
        if control:
            out.update({"n_control": int(self.n_control), "norm_control": [], "norm_clean_rest": [],
                        "cosine_rest_noisy": [], "cosine_control_rest": []})
        if matched:
            out.update({"n_matched": int(self.n_matched), "matching": self.match_info, "norm_matched": [],
                        "norm_clean_unmatched": [], "cosine_matched_noisy": [], "cosine_matched_unmatched": []})
        if split:
            n_atypical = int(self.n_atypical)
            out.update({"n_mislabeled": n_noisy - n_atypical, "n_atypical": n_atypical,
                        **{k: [] for k in SPLIT_KEYS}})
        for row in stats:
            tt, cc, nn_, cn = row[:4]
            nt, nc, nn_ = math.sqrt(tt), math.sqrt(cc), math.sqrt(nn_)
            out["norm_total"].append(nt)
            out["norm_clean"].append(nc)
            out["norm_noisy"].append(nn_)
            out["cosine"].append(_cosine(cn, nc, nn_))
            if control:
                kk, rr, rn, kr = row[4:8]
                nk, nr = math.sqrt(kk), math.sqrt(rr)
                out["norm_control"].append(nk)
                out["norm_clean_rest"].append(nr)
                out["cosine_rest_noisy"].append(_cosine(rn, nr, nn_))
                out["cosine_control_rest"].append(_cosine(kr, nk, nr))
            if matched:
                mm, oo, mn, mo = row[at_matched:at_matched + 4]
                nm, no = math.sqrt(mm), math.sqrt(oo)
                out["norm_matched"].append(nm)
                out["norm_clean_unmatched"].append(no)
                out["cosine_matched_noisy"].append(_cosine(mn, nm, nn_))
                out["cosine_matched_unmatched"].append(_cosine(mo, nm, no))
            if split:
                aa, ll, al, ca, cl, ta, tl, tc, tn = row[at_split:at_split + len(SPLIT_DOTS)]
                na, nl = math.sqrt(aa), math.sqrt(ll)
                for key, v in (("norm_mislabeled", nl), ("norm_atypical", na),
                               ("cosine_mislabeled_atypical", _cosine(al, nl, na)),
                               ("cosine_clean_mislabeled", _cosine(cl, nc, nl)),
                               ("cosine_clean_atypical", _cosine(ca, nc, na)),
                               ("share_clean", _share(tc, tt)), ("share_mislabeled", _share(tl, tt)),
                               ("share_atypical", _share(ta, tt)), ("share_noisy", _share(tn, tt))):
                    out[key].append(v)
        for b in self.total + self.clean + self.ctrl + self.mtch + self.atyp:
            b.zero_()
        self.n_noisy.zero_()
        self.n_control.zero_()
        self.n_matched.zero_()
        self.n_atypical.zero_()
        self.n_seen = 0
        return {KEY: out}


def _share(dot, tt):
    """A part's share of the total: <part, total> / |total|^2 (None if the total is zero)."""
    return dot / tt if tt > 0 else None


def _cosine(dot, norm_a, norm_b):
    """Cosine from a dot product and two norms (None if one vector is zero)."""
    return max(-1.0, min(1.0, dot / (norm_a * norm_b))) if norm_a > 0 and norm_b > 0 else None


# ----------------------------------------------------------------------------- from metrics rows

def accounted_prefix(rows, control=False, matched=False, split=False):
    """The last epoch k such that epochs 1..k all have accounting in their metrics rows (with the
    control group's part if `control`, the loss-matched control's if `matched`, the atypical split's
    if `split`); 0 if none."""
    need = ("norm_control",) * control + ("norm_matched",) * matched + ("norm_atypical",) * split
    have = {r["epoch"] for r in rows if KEY in r and all(k in r[KEY] for k in need)}
    k = 0
    while k + 1 in have:
        k += 1
    return k


def _per_example(norm, count):
    return norm / count if count else None


def _finite(v):
    return None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN (e.g. noisy acc at noise 0)


def epoch_table(rows):
    """One entry per accounted epoch: accuracies, example counts and, per group, the norms of the
    total / clean / noisy sums (and, with a control group, control / clean-rest), the same per
    example (divided by the number of examples of that kind seen in the epoch) and the cosines:
    clean/noisy, and with a control clean-rest/noisy and control/clean-rest."""
    table = []
    for r in sorted((r for r in rows if KEY in r), key=lambda r: r["epoch"]):
        a = r[KEY]
        n_clean, n_noisy, n_control = a["n_clean"], a["n_noisy"], a.get("n_control")
        groups = {}
        for i, g in enumerate(a["groups"]):
            groups[g] = {"norm_total": a["norm_total"][i], "norm_clean": a["norm_clean"][i],
                         "norm_noisy": a["norm_noisy"][i],
                         "per_example_total": _per_example(a["norm_total"][i], n_clean + n_noisy),
                         "per_example_clean": _per_example(a["norm_clean"][i], n_clean),
                         "per_example_noisy": _per_example(a["norm_noisy"][i], n_noisy),
                         "cosine": a["cosine"][i]}
            if n_control is not None:
                groups[g].update({
                    "norm_control": a["norm_control"][i], "norm_clean_rest": a["norm_clean_rest"][i],
                    "per_example_control": _per_example(a["norm_control"][i], n_control),
                    "per_example_clean_rest": _per_example(a["norm_clean_rest"][i], n_clean - n_control),
                    "cosine_rest_noisy": a["cosine_rest_noisy"][i],
                    "cosine_control_rest": a["cosine_control_rest"][i]})
            if "norm_matched" in a:
                groups[g].update({
                    "norm_matched": a["norm_matched"][i], "norm_clean_unmatched": a["norm_clean_unmatched"][i],
                    "per_example_matched": _per_example(a["norm_matched"][i], a["n_matched"]),
                    "cosine_matched_noisy": a["cosine_matched_noisy"][i],
                    "cosine_matched_unmatched": a["cosine_matched_unmatched"][i]})
            if "norm_atypical" in a:
                groups[g].update({k: a[k][i] for k in SPLIT_KEYS})
                groups[g].update({"per_example_mislabeled": _per_example(a["norm_mislabeled"][i], a["n_mislabeled"]),
                                  "per_example_atypical": _per_example(a["norm_atypical"][i], a["n_atypical"])})
        kinds = {k: _finite(r[k]) for k in KIND_ACCURACIES if k in r}  # accuracy per kind (memorized != noisy)
        split = {"n_mislabeled": a["n_mislabeled"], "n_atypical": a["n_atypical"]} if "norm_atypical" in a else {}
        table.append({"epoch": r["epoch"], **{k: _finite(r.get(k)) for k in ("clean", "noisy", "noisy_true", "test", "loss")},
                      **kinds, "n_clean": n_clean, "n_noisy": n_noisy, **split,
                      **({"n_control": n_control} if n_control is not None else {}),
                      **({"n_matched": a["n_matched"], "matching": a["matching"]} if "norm_matched" in a else {}),
                      "groups": groups})
    return table


def memorization_phase(rows, threshold=0.9):
    """The epochs whose training took noisy-train accuracy (w.r.t. the noisy labels) from its last
    low to `threshold`: end = first epoch with noisy >= threshold (else the last epoch); low = the
    last epoch before `end` (epoch 0 = initialization included) where noisy accuracy is minimal;
    the phase is epochs low+1 .. end. Returns {epochs, low, end, reached, noisy_low, noisy_end}."""
    acc = {r["epoch"]: r.get("noisy") for r in rows}
    acc = {e: v for e, v in acc.items() if v is not None and not math.isnan(v)}
    if not any(e > 0 for e in acc):  # no trained epoch, or no noisy example (noise=0)
        return {"epochs": [], "low": None, "end": None, "reached": False, "noisy_low": None, "noisy_end": None}
    reached = [e for e in sorted(acc) if e > 0 and acc[e] >= threshold]
    end = reached[0] if reached else max(acc)
    before = [e for e in sorted(acc) if e < end]
    low = min(before, key=lambda e: (acc[e], -e)) if before else end - 1
    return {"epochs": list(range(low + 1, end + 1)), "low": low, "end": end, "reached": bool(reached),
            "noisy_low": acc.get(low), "noisy_end": acc[end]}


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(table, epochs):
    """Per group over `epochs` (the memorization phase): mean per-epoch noisy/clean norm ratio of
    the sums, the same per example, the mean clean/noisy cosine and, with a control group, the mean
    noisy/clean-rest and control/clean-rest norm ratios and cosines. Descriptive only: the claim's
    statistic and verdict are common.claims.accounting's."""
    rows = [t for t in table if t["epoch"] in set(epochs)]
    if not rows:
        return {}
    out = {}
    for g in rows[0]["groups"]:
        v = [t["groups"][g] for t in rows]
        out[g] = {
            "noisy_clean_ratio": _mean([_ratio(x["norm_noisy"], x["norm_clean"]) for x in v]),
            "noisy_clean_ratio_per_example": _mean([_ratio(x["per_example_noisy"], x["per_example_clean"]) for x in v]),
            "mean_cosine": _mean([x["cosine"] for x in v])}
        if "norm_control" in v[0]:
            out[g].update({
                "noisy_rest_ratio": _mean([_ratio(x["norm_noisy"], x["norm_clean_rest"]) for x in v]),
                "control_rest_ratio": _mean([_ratio(x["norm_control"], x["norm_clean_rest"]) for x in v]),
                "mean_cosine_rest_noisy": _mean([x["cosine_rest_noisy"] for x in v]),
                "mean_cosine_control_rest": _mean([x["cosine_control_rest"] for x in v])})
        if "norm_matched" in v[0]:
            out[g].update({
                "noisy_matched_ratio": _mean([_ratio(x["norm_noisy"], x["norm_matched"]) for x in v]),
                "mean_cosine_matched_unmatched": _mean([x["cosine_matched_unmatched"] for x in v])})
        if "norm_atypical" in v[0]:  # the atypical split (memorized=both): each kind of the memorized set
            for kind in ("mislabeled", "atypical"):
                out[g].update({
                    f"{kind}_clean_ratio": _mean([_ratio(x[f"norm_{kind}"], x["norm_clean"]) for x in v]),
                    f"{kind}_clean_ratio_per_example": _mean([_ratio(x[f"per_example_{kind}"], x["per_example_clean"])
                                                              for x in v]),
                    f"mean_cosine_clean_{kind}": _mean([x[f"cosine_clean_{kind}"] for x in v])})
            out[g].update({f"mean_share_{k}": _mean([x[f"share_{k}"] for x in v])
                           for k in ("clean", "mislabeled", "atypical", "noisy")})
    return out
