"""Neuron flipping: the fewest units whose zeroing flips a training example's prediction (PROTOCOLS 4).

A *unit* is what one greedy step zeroes. unit="channel": a conv filter (the whole W[c] of a 4-D
weight) is one unit and every other parameter (BatchNorm / LayerNorm affine, linear weights, biases)
one unit per element -- the authors' criterion. unit="weight": every parameter element.

For a target t inside its batch (t first, then its reference examples):
    L = mean_j CE_j with the target's term multiplied by -|batch|  =  -CE_t + sum_{j != t} CE_j / |batch|
The score of a unit is w * dL/dw (summed over the filter for a channel unit): the first-order decrease
of L when the unit is zeroed. Greedy: zero the best unit not yet zeroed, recompute, until the target's
prediction differs from its training label, or `max_units` units are zeroed (then: not flipped).

Two implementations, same answers:
- `flip_sequential`: the authors' loop written plainly (a forward and a full backward of the whole
  batch per zeroed unit). The reference for the tests and the benchmark baseline.
- `Flipper`: the same decisions with less work. (1) A filter's score needs no weight gradient:
  sum_w w * dL/dw = sum over examples and positions of out_c * dL/dout_c (the conv output channel is
  linear in its filter), so the backward skips the weight-gradient convolutions, the costliest part
  of a CPU backward. (2) Zeroing a unit changes nothing before its layer: the forward restarts from
  the cached input of the top-level layer that holds it, on the kept autograd graph of the unchanged
  prefix. The forward runs the same kernels on the same tensors as the reference, so the logits, the
  flip check and every score but the filter scores are bitwise the reference's. Filter scores are
  summed in another order, so each carries a rounding tolerance (`rtol` times its sum of |terms|);
  when the best unit is not ahead of every rival by more than their tolerances, that step's choice
  comes from the reference computation itself (`Flipper.exact_steps` counts them; rare).
  Equality holds for the same device and thread count (kernels round differently across them).

Both run in eval mode (BatchNorm uses its running statistics, so examples do not interact), in fp32,
on any model of the zoo: the units are derived from `layer_groups`.
"""
import bisect
import copy
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import UserError
from .precision import autocast
from .models import layer_groups
from .rng import generator

UNITS = ("channel", "weight")


# ----------------------------------------------------------------------------- units

@dataclass
class Entry:
    """One parameter's block of units: units offset .. offset + count - 1."""
    group: str     # layer group, e.g. "res1.0"
    param: str     # parameter name inside the group, e.g. "conv.weight"
    name: str      # full parameter name in the model, e.g. "layers.res1.0.conv.weight"
    channel: bool  # one unit per output channel (a conv filter), else one per element
    shape: tuple
    offset: int
    count: int


class Units:
    """The candidate units of a model in a fixed order: layer groups input to output, parameters in
    module order, then channel / element (row-major) order. A unit is an int in [0, len(units))."""

    def __init__(self, model, unit="channel"):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        self.unit, self.entries, offset = unit, [], 0
        for group, module in layer_groups(model):
            for pname, p in module.named_parameters():
                channel = unit == "channel" and p.ndim == 4
                count = p.shape[0] if channel else p.numel()
                name = f"layers.{group}.{pname}"
                self.entries.append(Entry(group, pname, name, channel, tuple(p.shape), offset, count))
                offset += count
        self.n = offset
        self.offsets = [e.offset for e in self.entries]
        top = [name for name, _ in model.layers.named_children()]
        self.top_layers = [top.index(e.group.split(".")[0]) for e in self.entries]  # position in model.layers
        covered = sum(torch.Size(e.shape).numel() for e in self.entries)
        assert covered == sum(p.numel() for p in model.parameters()), "a parameter lies outside every layer group"

    def __len__(self):
        return self.n

    def entry_index(self, u):
        return bisect.bisect_right(self.offsets, u) - 1

    def top_layer(self, u):
        """Position in model.layers of the top-level layer that holds unit u."""
        return self.top_layers[self.entry_index(u)]

    def locate(self, u):
        """(entry, index into the parameter: (c,) for a filter, the element's indices otherwise)."""
        e = self.entries[self.entry_index(u)]
        local = u - e.offset
        if e.channel:
            return e, (local,)
        index = []
        for dim in reversed(e.shape):
            index.append(local % dim)
            local //= dim
        return e, tuple(reversed(index))

    def describe(self, u):
        """JSON-able: layer group, parameter, kind and index (the channel of a filter)."""
        e, index = self.locate(u)
        return {"group": e.group, "param": e.param, "kind": "channel" if e.channel else "element", "index": list(index)}

    @torch.no_grad()
    def zero_(self, model, u):
        e, index = self.locate(u)
        model.get_parameter(e.name)[index] = 0

    def scores(self, model, grads):
        """w * dL/dw per unit (summed over each filter), in unit order; grads in entry order."""
        out = []
        for e, g in zip(self.entries, grads):
            s = model.get_parameter(e.name).detach() * g
            out.append(s.sum(dim=tuple(range(1, s.ndim))) if e.channel else s.flatten())
        return torch.cat(out)


def zeroed_copy(model, units, zeroed):
    """A copy of `model` (eval mode) with the units `zeroed` set to zero."""
    m = copy.deepcopy(model).eval()
    for u in zeroed:
        units.zero_(m, u)
    return m


# ----------------------------------------------------------------------------- one greedy search

def objective(logits, y):
    """Mean over the batch of the cross-entropy, the target's (row 0) term multiplied by -len(batch)."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    weight = torch.ones_like(ce)
    weight[0] = -len(ce)
    return (ce * weight).mean()


def eot_inputs(x, n_eot, eot_noise, gen):
    """The input the gradient is taken on: x (n_eot = 0), or n_eot Gaussian-noised copies of the batch,
    stacked copy-major; each copy of an example gets noise of norm eot_noise * the example's norm."""
    if n_eot == 0:
        return x
    z = torch.randn((n_eot,) + tuple(x.shape), generator=gen).to(x.device)
    scale = eot_noise * x.flatten(1).norm(dim=1) / z.flatten(2).norm(dim=2).clamp_min(1e-12)
    noisy = x.unsqueeze(0) + z * scale[:, :, None, None, None]
    return noisy.flatten(0, 1).contiguous(memory_format=torch.channels_last)


def eot_logits(logits, n_eot):
    """Logits averaged over the noised copies."""
    return logits if n_eot == 0 else logits.view(n_eot, -1, logits.shape[-1]).mean(0)


@dataclass
class FlipResult:
    units: list        # the zeroed units, in order
    flipped: bool      # the prediction left the training label within max_units
    prediction: int    # the target's prediction at the end


def _prediction(model, x, logits, n_eot):
    """The target's prediction on its clean input (its own forward when the gradient used noised copies)."""
    if n_eot == 0:
        return int(logits[0].argmax())
    with torch.no_grad():
        return int(model(x[:1])[0].argmax())


def _best(scores, zeroed):
    """The best unit not yet zeroed (the first one on exact ties, as torch.argmax)."""
    if zeroed:
        scores = scores.index_fill(0, torch.tensor(zeroed, device=scores.device), -torch.inf)
    return int(scores.argmax())


def _reference_scores(model, units, inp, y, n_eot):
    """One step of the reference: forward, full backward, scores. Returns (logits, scores)."""
    logits = model(inp)
    grads = torch.autograd.grad(objective(eot_logits(logits, n_eot), y),
                                [model.get_parameter(e.name) for e in units.entries])
    return logits, units.scores(model, grads)


def flip_sequential(model, units, x, y, max_units, n_eot=0, eot_noise=0.01, gen=None):
    """The authors' greedy loop, plainly. x, y: the batch, target first. Returns a FlipResult."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    inp = eot_inputs(x, n_eot, eot_noise, gen)
    zeroed = []
    while True:
        logits = m(inp)
        prediction = _prediction(m, x, logits, n_eot)
        if prediction != int(y[0]) or len(zeroed) >= max_units:
            return FlipResult(zeroed, prediction != int(y[0]), prediction)
        grads = torch.autograd.grad(objective(eot_logits(logits, n_eot), y),
                                    [m.get_parameter(e.name) for e in units.entries])
        u = _best(units.scores(m, grads), zeroed)
        units.zero_(m, u)
        zeroed.append(u)


class Flipper:
    """flip_sequential's decisions with less work (see the module docstring). Reusable across targets."""

    def __init__(self, model, units, rtol=1e-4):
        self.units, self.rtol = units, rtol
        self.model = copy.deepcopy(model).eval()
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.exact = copy.deepcopy(model).eval()  # for an ambiguous step: the reference computation
        for p in self.exact.parameters():
            p.requires_grad_(True)
        self.layers = list(self.model.layers.children())
        self.params = {}  # entry index -> parameter, for the entries scored from their gradient
        self.convs = {}   # entry index -> conv module, for the filters (scored from the conv output)
        for i, e in enumerate(units.entries):
            p = self.model.get_parameter(e.name)
            p.requires_grad_(not e.channel)
            if not e.channel:
                self.params[i] = p
                continue
            module_name, pname = e.name.rsplit(".", 1)
            module = self.model.get_submodule(module_name)
            if not isinstance(module, nn.Conv2d) or pname != "weight":
                raise TypeError(f"channel units are conv filters; {e.name} is not a Conv2d weight")
            self.convs[i] = module
            module.register_forward_hook(self._keep_output)
        self.capture, self.outs = False, {}
        self.steps = self.exact_steps = 0

    def _keep_output(self, module, inputs, out):
        if self.capture:
            if not out.requires_grad:  # the first conv: nothing before it needs a gradient
                out.requires_grad_(True)
            self.outs[module] = out

    def _scores(self, loss):
        """(scores, tolerances) in unit order; the tolerance is 0 where the score is bitwise the reference's."""
        convs = list(self.convs.items())
        grads = torch.autograd.grad(loss, list(self.params.values()) + [self.outs[m] for _, m in convs],
                                    retain_graph=True)  # keep the prefix graph for the next step
        scores, tols = [None] * len(self.units.entries), [None] * len(self.units.entries)
        for (i, p), g in zip(self.params.items(), grads):
            scores[i] = (p.detach() * g).flatten()
            tols[i] = torch.zeros_like(scores[i])
        for (i, m), g in zip(convs, grads[len(self.params):]):
            out = self.outs[m].detach()
            terms = (out - m.bias.detach()[:, None, None] if m.bias is not None else out) * g
            scores[i] = terms.sum(dim=(0, 2, 3))
            tols[i] = self.rtol * terms.abs_().sum(dim=(0, 2, 3))
        return torch.cat(scores), torch.cat(tols)

    def _ambiguous(self, scores, tols, u, zeroed):
        """Could rounding put another unit ahead of u? (Only where a tolerance is involved: exact ties
        among exact scores are broken by unit order in both implementations.)"""
        rival = scores + tols >= scores[u] - tols[u]
        rival[u] = False
        if zeroed:
            rival[torch.tensor(zeroed, device=rival.device)] = False
        return bool((rival & ((tols > 0) | (tols[u] > 0))).any())

    def flip(self, x, y, max_units, n_eot=0, eot_noise=0.01, gen=None):
        """Same arguments and answer as flip_sequential on the model given at construction."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.original[n])
        inp = eot_inputs(x, n_eot, eot_noise, gen)
        cache, start, zeroed = [None] * len(self.layers), 0, []
        try:
            while True:
                self.capture = True
                h = inp if start == 0 else cache[start - 1]
                for i in range(start, len(self.layers)):
                    h = cache[i] = self.layers[i](h)
                self.capture = False
                prediction = _prediction(self.model, x, h, n_eot)
                if prediction != int(y[0]) or len(zeroed) >= max_units:
                    return FlipResult(zeroed, prediction != int(y[0]), prediction)
                scores, tols = self._scores(objective(eot_logits(h, n_eot), y))
                u = _best(scores, zeroed)
                self.steps += 1
                if self._ambiguous(scores, tols, u, zeroed):
                    self.exact.load_state_dict(self.model.state_dict())
                    u = _best(_reference_scores(self.exact, self.units, inp, y, n_eot)[1], zeroed)
                    self.exact_steps += 1
                self.units.zero_(self.model, u)
                zeroed.append(u)
                start = self.units.top_layer(u)  # the layers before it are unchanged
        finally:
            self.capture, self.outs = False, {}


# ----------------------------------------------------------------------------- the experiment's choices

def pick_targets(data, fits, n, seed):
    """n distinct noisy and n distinct clean training examples that the model fits (predicts with their
    training label), seeded; interleaved noisy, clean, noisy, ... so a partial run is balanced. The
    choice for n is a prefix of the choice for a larger n. Returns [(index, "noisy" | "clean")]."""
    picks = {}
    for kind, mask in (("noisy", data.noisy), ("clean", ~data.noisy)):
        pool = torch.nonzero((mask & fits).cpu()).flatten()
        if len(pool) < n:
            raise UserError(f"n_examples={n}, but only {len(pool)} {kind} training examples are predicted with "
                            f"their training label; pass --n_examples={len(pool)} or less")
        picks[kind] = pool[torch.randperm(len(pool), generator=generator(seed, "neuron_flipping", kind))[:n]].tolist()
    return [(i, kind) for pair in zip(picks["noisy"], picks["clean"]) for i, kind in zip(pair, ("noisy", "clean"))]


def reference_batch(n_train, target, size, seed):
    """`size` distinct other training examples for `target`, fixed by (seed, target); never the target."""
    if size > n_train - 1:
        raise UserError(f"ref_batch={size}, but there are only {n_train - 1} other training examples; "
                        f"pass --ref_batch={n_train - 1} or less")
    others = torch.randperm(n_train - 1, generator=generator(seed, "neuron_flipping", "reference", target))[:size]
    return others + (others >= target).long()  # skip the target's own index


def collateral_sets(data, n, seed):
    """Fixed seeded evaluation sets for the collateral damage: n clean and n noisy training examples and
    n test examples (fewer where fewer exist; n = 0: all of them)."""
    sets = {}
    for kind, mask in (("clean", ~data.noisy.cpu()), ("noisy", data.noisy.cpu())):
        pool = torch.nonzero(mask).flatten()
        order = torch.randperm(len(pool), generator=generator(seed, "neuron_flipping", "eval", kind))
        sets[kind] = torch.sort(pool[order[:n or None]]).values
    order = torch.randperm(len(data.x_test), generator=generator(seed, "neuron_flipping", "eval", "test"))
    sets["test"] = torch.sort(order[:n or None]).values
    return sets


class Collateral:
    """What an edit costs the other examples: accuracy on fixed evaluation sets (clean, noisy w.r.t.
    the noisy label, noisy_true w.r.t. the true label, test) after the edit, and the drop from before
    it, the edited example itself left out. An edit changes nothing before the top-level layer of its
    first zeroed unit, so the unedited model's layer outputs on the evaluation sets are cached once
    (the last layers first, within `budget` bytes) and an edited model runs only from there."""

    def __init__(self, model, data, sets, budget=512 * 2 ** 20, batch_size=1024, amp=True):
        self.data, self.sets, self.batch_size, self.amp = data, sets, batch_size, amp
        self.train_idx = torch.cat([sets["clean"], sets["noisy"]]).to(data.device)
        self.test_idx = sets["test"].to(data.device)
        self.n_clean = len(sets["clean"])
        layers = list(model.eval().layers.children())
        n = len(self.train_idx) + len(self.test_idx)
        with torch.no_grad():
            h, sizes = next(self._inputs())[:1], []  # bytes per example of each layer's output
            for layer in layers:
                h = layer(h)
                sizes.append(h.numel() * h.element_size() * n)
            self.cache, used = {}, 0  # layer position k -> the output of layer k, in chunks
            for k in reversed(range(len(layers))):
                if used + sizes[k] > budget:
                    break
                used, self.cache[k] = used + sizes[k], []
            preds = []
            for h in self._inputs():
                with autocast(data.device, amp):
                    for k, layer in enumerate(layers):
                        h = layer(h)
                        if k in self.cache:
                            self.cache[k].append(h)
                preds.append(h.argmax(1))
        self.before = torch.cat(preds)

    def _inputs(self):
        for split, idx in (("train", self.train_idx), ("test", self.test_idx)):
            for chunk in idx.split(self.batch_size):
                yield self.data.batch(chunk, split)

    def predict(self, model, first_layer=0):
        """Predictions of `model` on the sets; it equals the unedited model before layer `first_layer`."""
        start = max([k + 1 for k in self.cache if k < first_layer], default=0)
        chunks = self.cache[start - 1] if start else self._inputs()
        layers = list(model.eval().layers.children())[start:]
        preds = []
        with torch.no_grad():
            for h in chunks:
                with autocast(self.data.device, self.amp):
                    for layer in layers:
                        h = layer(h)
                preds.append(h.argmax(1))
        return torch.cat(preds)

    def accuracies(self, pred, exclude=None):
        """{clean, noisy, noisy_true, test} accuracy of predictions on the sets, training example `exclude` left out."""
        keep = self.train_idx != (-1 if exclude is None else exclude)
        n_train = len(self.train_idx)
        hit = (pred[:n_train] == self.data.y_train[self.train_idx]) & keep
        true_hit = (pred[:n_train] == self.data.y_true[self.train_idx]) & keep
        clean, noisy = slice(0, self.n_clean), slice(self.n_clean, n_train)

        def rate(hits, where):
            n = int(keep[where].sum())
            return float(hits[where].sum()) / n if n else float("nan")
        test = pred[n_train:] == self.data.y_test[self.test_idx]
        return {"clean": rate(hit, clean), "noisy": rate(hit, noisy), "noisy_true": rate(true_hit, noisy),
                "test": float(test.float().mean()) if len(test) else float("nan")}

    def __call__(self, model, first_layer=0, exclude=None):
        """(accuracies after the edit, drop from before it), the edited training example `exclude` left out."""
        after = self.accuracies(self.predict(model, first_layer), exclude)
        before = self.accuracies(self.before, exclude)
        return after, {k: before[k] - after[k] for k in after}


def summarize(records, baseline, max_units):
    """Per kind (noisy, clean): counts (not flipped counted as max_units: a lower bound), fraction
    flipped, layer groups of the zeroed units, and mean accuracy drop on the evaluation sets."""
    out = {}
    for kind in ("noisy", "clean"):
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            continue
        counts = sorted(r["n_units"] if r["flipped"] else max_units for r in rs)
        q = statistics.quantiles(counts, n=4, method="inclusive") if len(counts) > 1 else counts * 3
        groups = {}
        for r in rs:
            for unit in r["units"]:
                groups[unit["group"]] = groups.get(unit["group"], 0) + 1
        total = sum(groups.values())
        flipped = [r for r in rs if r["flipped"]]
        out[kind] = {
            "n": len(rs), "flipped": len(flipped) / len(rs),
            "units_mean": statistics.fmean(counts), "units_median": statistics.median(counts),
            "units_q1": q[0], "units_q3": q[2], "units_min": counts[0], "units_max": counts[-1],
            "to_true_label": (sum(r["prediction"] == r["true_label"] for r in flipped) / len(flipped))
            if flipped and kind == "noisy" else None,  # a flipped noisy example back at its true label
            "groups_per_example": statistics.fmean(len({u["group"] for u in r["units"]}) for r in rs),
            "group_fraction": {g: c / total for g, c in groups.items()} if total else {},
            "accuracy_drop": {k: statistics.fmean(r["accuracy_drop"][k] for r in rs) for k in baseline},
        }
    return out
