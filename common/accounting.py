"""Gradient accounting: split every minibatch gradient exactly into its clean part and its noisy part.

    loss = mean_i l_i = (1/B) sum_{clean i} l_i + (1/B) sum_{noisy i} l_i      (B = batch size)

`GradientAccountant.backward(losses, idx)` is the training loop's backward hook. It leaves in `.grad`
exactly what plain training leaves there and, on the side, adds this step's total gradient and its
clean part to per-parameter sums on the training device (noisy = total - clean). `end_epoch()`
reduces the epoch's sums to a few scalars per layer group (the only copy to the host), returns them
for the epoch's metrics row and starts the next epoch's sums from zero.

The rest turns metrics rows into the experiment's tables: per-epoch, per-group norms (raw and per
example), the memorization phase, and its summary.
"""
import math

import torch

from . import distributed
from .models import group_params

KEY = "grad_accounting"  # the key of the accounting numbers inside a metrics row


def _add(buffers, grads):
    """buffers[i] += grads[i] (a parameter no path reached has grad None: nothing to add)."""
    pairs = [(b, g) for b, g in zip(buffers, grads) if g is not None]
    if pairs:
        torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])


class GradientAccountant:
    """Per-group sums over an epoch of the total gradient and of its clean part, kept on the device.

    `noisy`: the boolean noise mask of the training set (data.noisy), on the training device.
    `skip_pure`: skip the second backward for batches with no noisy or no clean example. Deciding
    that needs the batch's noisy count on the host; free on the CPU, a per-step synchronization on
    an accelerator, so by default only on the CPU (elsewhere the second backward of such a batch
    simply returns the total, resp. zeros)."""

    def __init__(self, model, noisy, skip_pure=None):
        groups = group_params(model)
        self.groups = list(groups)
        self.params, self.slices = [], []
        for params in groups.values():
            mine = [p for p in params if p.requires_grad]
            self.slices.append(list(range(len(self.params), len(self.params) + len(mine))))
            self.params += mine
        self.sizes = [sum(self.params[i].numel() for i in s) for s in self.slices]
        self.noisy = noisy
        self.skip_pure = noisy.device.type == "cpu" if skip_pure is None else skip_pure
        self.total = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.clean = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.n_noisy = torch.zeros((), dtype=torch.long, device=noisy.device)
        self.n_seen = 0

    def backward(self, losses, idx):
        """Backward hook of common.training.train_epoch: `losses` per example, `idx` their indices."""
        noisy = self.noisy[idx]
        b = losses.shape[0]
        self.n_noisy += noisy.sum()
        self.n_seen += b
        pure = None
        if self.skip_pure and not distributed.active():  # under torchrun every rank runs both backward passes
            # (synced BatchNorm communicates in each; whether a rank's slice is pure differs by rank)
            k = int(noisy.sum())
            pure = "clean" if k == 0 else "noisy" if k == b else None
        # The full backward FIRST, exactly as plain training does it: `.grad` is then bit for bit the
        # plain gradient and the optimizer step is unchanged. (Backwarding the clean part and then the
        # noisy part into `.grad` would leave g_clean + g_noisy there, which in floating point is not
        # bitwise the gradient of the whole loss, so the trajectory would drift from plain training.)
        losses.mean().backward(retain_graph=pure is None)
        grads = [p.grad for p in self.params]
        _add(self.total, grads)
        if pure == "clean":  # the whole gradient is clean; the noisy part is zero
            _add(self.clean, grads)
        elif pure is None:
            # The clean part through the retained graph: autograd.grad returns it without touching
            # `.grad`. Second and last backward; noisy = total - clean at the end of the epoch.
            weights = (~noisy).to(losses.dtype)
            clean = torch.autograd.grad((losses * weights).sum() / b, self.params, allow_unused=True)
            _add(self.clean, clean)

    @torch.no_grad()
    def end_epoch(self, epoch=None):
        """This epoch's accounting {KEY: {...}} (norms per group, counts, cosine); resets the sums."""
        # float64 for the reductions where the device has it (MPS has not)
        dtype = torch.float32 if self.noisy.device.type == "mps" else torch.float64
        if distributed.active():  # each rank summed its shares of every batch: together, a single process's sums
            for b in self.total + self.clean:
                distributed.all_reduce_sum_(b)
            distributed.all_reduce_sum_(self.n_noisy)
            self.n_seen = int(distributed.all_reduce_sum_(torch.tensor(self.n_seen, device=self.noisy.device)))
        stats = []
        for s in self.slices:
            if not s:  # a group without trainable parameters
                stats.append(torch.zeros(4, dtype=dtype, device=self.noisy.device))
                continue
            t = torch.cat([self.total[i].flatten() for i in s]).to(dtype)
            c = torch.cat([self.clean[i].flatten() for i in s]).to(dtype)
            n = t - c
            stats.append(torch.stack([t @ t, c @ c, n @ n, c @ n]))
        stats = torch.stack(stats).cpu().tolist()  # the epoch's only copy to the host: 4 numbers per group
        n_noisy = int(self.n_noisy)
        out = {"groups": self.groups, "n_clean": self.n_seen - n_noisy, "n_noisy": n_noisy,
               "norm_total": [], "norm_clean": [], "norm_noisy": [], "cosine": []}
        for tt, cc, nn_, cn in stats:
            nt, nc, nn_ = math.sqrt(tt), math.sqrt(cc), math.sqrt(nn_)
            out["norm_total"].append(nt)
            out["norm_clean"].append(nc)
            out["norm_noisy"].append(nn_)
            out["cosine"].append(max(-1.0, min(1.0, cn / (nc * nn_))) if nc > 0 and nn_ > 0 else None)
        for b in self.total + self.clean:
            b.zero_()
        self.n_noisy.zero_()
        self.n_seen = 0
        return {KEY: out}


# ----------------------------------------------------------------------------- from metrics rows

def accounted_prefix(rows):
    """The last epoch k such that epochs 1..k all have accounting in their metrics rows (0 if none)."""
    have = {r["epoch"] for r in rows if KEY in r}
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
    total / clean / noisy sums, the same per example (divided by the number of examples of that
    kind seen in the epoch) and the clean/noisy cosine."""
    table = []
    for r in sorted((r for r in rows if KEY in r), key=lambda r: r["epoch"]):
        a = r[KEY]
        n_clean, n_noisy = a["n_clean"], a["n_noisy"]
        groups = {}
        for i, g in enumerate(a["groups"]):
            groups[g] = {"norm_total": a["norm_total"][i], "norm_clean": a["norm_clean"][i],
                         "norm_noisy": a["norm_noisy"][i],
                         "per_example_total": _per_example(a["norm_total"][i], n_clean + n_noisy),
                         "per_example_clean": _per_example(a["norm_clean"][i], n_clean),
                         "per_example_noisy": _per_example(a["norm_noisy"][i], n_noisy),
                         "cosine": a["cosine"][i]}
        table.append({"epoch": r["epoch"], **{k: _finite(r.get(k)) for k in ("clean", "noisy", "noisy_true", "test", "loss")},
                      "n_clean": n_clean, "n_noisy": n_noisy, "groups": groups})
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


def summarize(table, epochs):
    """Per group over `epochs` (the memorization phase): mean per-epoch noisy/clean norm ratio of
    the sums, the same per example, and the mean clean/noisy cosine."""
    rows = [t for t in table if t["epoch"] in set(epochs)]
    if not rows:
        return {}
    out = {}
    for g in rows[0]["groups"]:
        v = [t["groups"][g] for t in rows]
        out[g] = {
            "noisy_clean_ratio": _mean([x["norm_noisy"] / x["norm_clean"] if x["norm_clean"] else None for x in v]),
            "noisy_clean_ratio_per_example": _mean([x["per_example_noisy"] / x["per_example_clean"]
                                                    if x["per_example_noisy"] is not None and x["per_example_clean"]
                                                    else None for x in v]),
            "mean_cosine": _mean([x["cosine"] for x in v])}
    return out
