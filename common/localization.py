"""Localization methods: which units of a model memorize a training example? Several methods rank the
same units (common.flipping.Units) for a target example inside its reference batch (target first);
the rankings are then judged by what zeroing their top k units does (docs/experiments/localization_methods.md).

Every method returns a ranking: a permutation of all units, the most responsible first. Methods that
score units rank by score, exact ties broken in a seeded random order (unit order would favour the
first layers wherever many scores tie, e.g. units that a mask never moved).

  greedy        the neuron-flipping search (common.flipping.Flipper): zero the best unit by w * dL/dw,
                recompute, ...; its zeroed units in order, continued past the flip to K units with the
                same rule; the rest by the scores after the K-th.
  oneshot       w * dL/dw of the flipping objective once, on the unedited model (greedy's first step).
  activation    UnitMem-style selectivity, forward passes only: a(u) = mean |activation| of the unit's
                signal for each example of the batch; score = (a_t - m) / (a_t + m), m the mean of a
                over the reference examples, a_t the target's (ActivationProbe says what a unit's
                signal is).
  ig            Integrated Gradients of the flipping objective along the path from a layer group's
                units zeroed (the baseline: what the metrics' zeroing does) to their trained values, one
                group at a time, the rest of the network as trained: score(u) = sum over u's weights of
                w * mean_s dL/dw at (s - 1/2) / m of the group's trained weights, s = 1..m. For a filter
                this scales its output channel from 0. Within a group the scores add up to L(trained) -
                L(group zeroed), up to the midpoint rule's error.
  hardconcrete  a learned removal mask: unit u's parameters times (1 - r_u), r_u ~ HardConcrete(log_alpha_u)
                (Louizos et al. 2018: beta 2/3, stretch (-0.1, 1.1)), Adam on log_alpha for a fixed number of
                steps (seeded noise) minimizing removal_loss + l0_penalty * E[number of removed units];
                the clamp to [0, 1] passes gradients straight through (with a plain clamp a gate sampled
                at 0 gets none, and in a few steps most units would never be scored). Rank: log_alpha.
  slimming      the same with a continuous removal mask r in [0, 1] (projected after each Adam step),
                from 0, penalty l1_penalty * sum |r| (Network Slimming's L1 on a unit scale). Rank: r.
  random        a seeded random permutation: the floor.

removal_loss = -log(1 - p_t(training label)) + mean over the references of their cross-entropy: remove
the target's training-label prediction, keep the references'. (The flipping objective's -CE_t is
unbounded: an optimiser would drive it to -inf and stop caring for the references.)

Ground truth: a model trained with example-tied dropout, evaluated tied (each example with its own
training mask: `pin_tied`), has its noisy examples' memorization in their own memorization channels,
which the dropout's hashing tells (`tied_channels`); `ChannelUnits` maps channels to the units that
write them (a conv filter and its BatchNorm scale and shift).
"""
import copy
import math
import statistics

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .cli import UserError
from .dropout import ExampleTiedDropout, StandardDropout, etd_modules
from .flipping import Flipper, objective, zeroed_copy
from .plots import figure, save
from .precision import strict_fp32
from .rng import generator

METHODS = ("greedy", "oneshot", "activation", "ig", "hardconcrete", "slimming", "random")
LABELS = {"greedy": "greedy zeroing (paper)", "oneshot": "one-shot w*dL/dw", "activation": "activation selectivity",
          "ig": "integrated gradients", "hardconcrete": "HardConcrete (L0) mask", "slimming": "slimming (L1) mask",
          "random": "random units"}
COLORS = {"greedy": "black", "oneshot": "tab:blue", "activation": "tab:orange", "ig": "tab:green",
          "hardconcrete": "tab:purple", "slimming": "tab:brown", "random": "tab:gray"}
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1   # HardConcrete temperature and stretch (Louizos et al. 2018)
HC_INIT = 0.01                          # initial probability that a HardConcrete removal gate is open


# ----------------------------------------------------------------------------- shared pieces

def rank(scores, gen):
    """Units by descending score (NaN last); exact ties in the seeded random order of `gen`."""
    perm = torch.randperm(len(scores), generator=gen).to(scores.device)
    s = scores[perm].float().nan_to_num(nan=-math.inf)
    return perm[torch.sort(s, descending=True, stable=True).indices].cpu()


def removal_loss(logits, y):
    """-log(1 - p(training label)) of the target (row 0) + mean cross-entropy of the references."""
    z = logits.float()
    others = z[0].index_fill(0, y[:1], -math.inf)
    target = torch.logsumexp(z[0], 0) - torch.logsumexp(others, 0)
    return target + (F.cross_entropy(z[1:], y[1:]) if len(z) > 1 else 0)


def masked_params(params, units, keep):
    """{name: parameter * keep} with one multiplier per unit, broadcast over everything a unit zeroes
    (a filter, or a channel's parameters)."""
    out = {}
    for e in units.entries:
        k = keep[e.offset:e.offset + e.count]
        for name in e.names:
            p = params[name]
            out[name] = p * (k.view(p.shape) if e.kind == "element" else k.view(-1, *[1] * (p.ndim - 1)))
    return out


def _params(model, units):
    """{name: detached parameter} for every parameter the units zero, in units.grad_names order."""
    return {n: model.get_parameter(n).detach() for n in units.grad_names}


def _grads(loss, inputs):
    """d loss / d inputs; zeros for an input the loss does not use."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _frozen(model):
    """A copy in eval mode whose parameters need no gradient (methods take gradients of what they choose)."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# ----------------------------------------------------------------------------- activation selectivity

CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid,
               nn.Identity, nn.Dropout, ExampleTiedDropout, StandardDropout)


def _channel_means(t):
    """(B, C): mean |t| per example and channel; channels on dim 1 of NCHW (or (B, C)), last dim of tokens."""
    t = t.detach().float().abs()
    if t.ndim == 2:
        return t
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.flatten(1, -2).mean(1)


class ActivationProbe:
    """Per example and unit, the mean |activation| of the signal the unit is part of (forward passes only):

    - a conv filter, or a 1-D parameter (BatchNorm / LayerNorm scale or shift, bias) of length C: channel c
      of the output of the last channel-wise module (BatchNorm, activation, dropout) that directly follows
      its module in the same Sequential, else of its module's output: for a conv + BN + ReLU (+ dropout)
      block the channel the next layer reads;
    - an element w[k, j] of a Linear weight: |w[k, j]| * mean |x_j|, the signal on that edge (x: the layer's input);
    - anything else (e.g. position embeddings): |w|, the same for every example.
    In weight units, every element of a filter shares its channel's signal."""

    def __init__(self, model, units):
        self.model, self.units = model, units
        self.plan, probes, inputs = [], set(), set()
        for e in units.entries:
            module, p = model.get_submodule(e.module), model.get_parameter(e.names[0])
            local = torch.arange(e.count, device=p.device)
            if e.kind == "element" and isinstance(module, nn.Linear) and e.names[0].endswith(".weight"):
                self.plan.append(("edge", e.module, local % p.shape[1]))
                inputs.add(e.module)
            elif e.kind != "element" or p.ndim in (1, 4):
                channel = local if e.kind != "element" or p.ndim == 1 else local // (p.numel() // p.shape[0])
                probe = self._probe(e.module)
                self.plan.append(("channel", probe, channel))
                probes.add(probe)
            else:
                self.plan.append(("constant", None, None))
        self.hooks = [model.get_submodule(n).register_forward_hook(self._keeper(n, "out")) for n in sorted(probes)]
        self.hooks += [model.get_submodule(n).register_forward_hook(self._keeper(n, "in")) for n in sorted(inputs)]
        self.acts = None

    def _probe(self, module_name):
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        if not isinstance(parent, nn.Sequential):
            return module_name
        names = [n for n, _ in parent.named_children()]
        i = names.index(child)
        while i + 1 < len(names) and isinstance(parent[i + 1], CHANNELWISE + (PinnedMask,)):
            i += 1
        return f"{parent_name}.{names[i]}"

    def _keeper(self, name, where):
        def hook(module, inputs, out):
            if self.acts is not None:
                self.acts[name, where] = _channel_means(inputs[0] if where == "in" else out)
        return hook

    @torch.no_grad()
    def activations(self, x):
        """(B, n_units) mean |signal| of every unit for every example of x."""
        self.acts = {}
        try:
            self.model(x)
            acts = self.acts
        finally:
            self.acts = None
        cols = []
        for e, (kind, name, index) in zip(self.units.entries, self.plan):
            w = self.model.get_parameter(e.names[0]).detach().float().abs()
            if kind == "edge":
                cols.append(acts[name, "in"][:, index] * w.flatten()[None])
            elif kind == "channel" and int(index.max()) < acts[name, "out"].shape[1]:
                cols.append(acts[name, "out"][:, index])
            else:  # no per-example signal
                c = w.flatten() if e.kind == "element" else w.flatten(1).sum(1)
                cols.append(c[None].expand(len(x), -1))
        return torch.cat(cols, dim=1)

    def selectivity(self, x):
        """(a_t - m) / (a_t + m) per unit: a_t the target's (row 0) activation, m the references' mean."""
        a = self.activations(x)
        t, m = a[0], a[1:].mean(0)
        return (t - m) / (t + m + 1e-12)


# ----------------------------------------------------------------------------- gradient and mask methods

def oneshot_scores(model, units, x, y):
    """w * dL/dw of the flipping objective per unit, once (the greedy search's first scores)."""
    params = {n: p.requires_grad_() for n, p in _params(model, units).items()}
    grads = _grads(objective(functional_call(model, params, (x,)), y), list(params.values()))
    return units.scores(model, grads)


def ig_scores(model, units, x, y, steps):
    """Integrated Gradients per unit, one layer group at a time (module docstring)."""
    trained, mean_grad, groups = _params(model, units), {}, {}
    for e in units.entries:
        groups.setdefault(e.group, []).extend(e.names)
    for names in groups.values():
        total = {n: torch.zeros_like(trained[n]) for n in names}
        for s in range(steps):
            alpha = (s + 0.5) / steps
            scaled = {n: (alpha * trained[n]).requires_grad_() for n in names}
            g = _grads(objective(functional_call(model, scaled, (x,)), y), list(scaled.values()))
            for n, gi in zip(names, g):
                total[n] += gi
        mean_grad.update({n: t / steps for n, t in total.items()})
    return units.scores(model, [mean_grad[n] for n in units.grad_names])


def mask_scores(model, units, x, y, kind, steps, lr, penalty, gen):
    """A removal mask learned for the target (module docstring): log_alpha (hardconcrete) or r (slimming)."""
    params = _params(model, units)
    device = x.device
    hard = kind == "hardconcrete"
    init = math.log(HC_INIT / (1 - HC_INIT)) + BETA * math.log(-GAMMA / ZETA) if hard else 0.0
    theta = torch.full((len(units),), init, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        if hard:
            u = torch.rand(len(units), generator=gen).clamp(1e-6, 1 - 1e-6).to(device)
            r = torch.sigmoid((u.log() - (-u).log1p() + theta) / BETA) * (ZETA - GAMMA) + GAMMA
            r = r + (r.clamp(0, 1) - r).detach()  # the clamped value, the stretched sample's gradient
            reg = torch.sigmoid(theta - BETA * math.log(-GAMMA / ZETA)).sum()  # E[open gates]
        else:
            r, reg = theta, theta.abs().sum()
        loss = removal_loss(functional_call(model, masked_params(params, units, 1 - r), (x,)), y) + penalty * reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not hard:
            with torch.no_grad():
                theta.clamp_(0, 1)
    return theta.detach()


def greedy_ranking(flipper, model, units, x, y, k_max, gen):
    """The flipping search's zeroed units (Flipper, until the flip), continued with the same rule to k_max
    units; then the rest by the scores after the last. Returns (ranking, units zeroed at the flip or None)."""
    result = flipper.flip(x, y, k_max)
    order = list(result.units)
    m = zeroed_copy(model, units, order)
    params = [m.get_parameter(n).requires_grad_() for n in units.grad_names]
    while True:
        scores = units.scores(m, _grads(objective(m(x), y), params))
        if order:
            scores[torch.tensor(order, device=scores.device)] = -math.inf
        if len(order) >= k_max:
            break
        u = int(scores.argmax())  # the first on exact ties, as the search itself
        units.zero_(m, u)
        order.append(u)
    chosen = torch.tensor(order, dtype=torch.long)
    rest = rank(scores, gen)
    rest = rest[~torch.isin(rest, chosen)]
    return torch.cat([chosen, rest]), (len(result.units) if result.flipped else None)


class Localizer:
    """Rankings of a model's units for targets by every method (reusable across targets of one model).

    x, y: the batch, target first, then its reference examples; `index` seeds the random pieces."""

    def __init__(self, model, units, seed, max_k, ig_steps, mask_steps, hc_lr, slim_lr, l0_penalty, l1_penalty):
        self.model, self.units, self.seed = _frozen(model), units, seed
        self.max_k, self.ig_steps, self.mask_steps = max_k, ig_steps, mask_steps
        self.lr = {"hardconcrete": hc_lr, "slimming": slim_lr}
        self.penalty = {"hardconcrete": l0_penalty, "slimming": l1_penalty}
        self._flipper = self._probe = None

    def gen(self, *tags):
        return generator(self.seed, "localization", *tags)

    def rank(self, method, x, y, index):
        """(ranking: a CPU LongTensor permutation of the units, extra JSON-able facts); strict fp32."""
        with strict_fp32():
            return self._rank(method, x, y, index)

    def _rank(self, method, x, y, index):
        ties = self.gen("ties", method, index)
        if method == "greedy":
            self._flipper = self._flipper or Flipper(self.model, self.units)
            ranking, flip_at = greedy_ranking(self._flipper, self.model, self.units, x, y, self.max_k, ties)
            return ranking, {"flip_at": flip_at}
        if method == "oneshot":
            return rank(oneshot_scores(self.model, self.units, x, y), ties), {}
        if method == "activation":
            self._probe = self._probe or ActivationProbe(self.model, self.units)
            return rank(self._probe.selectivity(x), ties), {}
        if method == "ig":
            return rank(ig_scores(self.model, self.units, x, y, self.ig_steps), ties), {}
        if method in ("hardconcrete", "slimming"):
            theta = mask_scores(self.model, self.units, x, y, method, self.mask_steps, self.lr[method],
                                self.penalty[method], self.gen(method, index))
            return rank(theta, ties), {}
        if method == "random":
            return torch.randperm(len(self.units), generator=self.gen("random", index)), {}
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- what zeroing the top k does

@torch.no_grad()
def topk_predictions(model, units, ranking, x, k_max):
    """The target's (x[:1]) prediction with its top k units zeroed, k = 1..k_max (fp32, eval mode)."""
    m = copy.deepcopy(model).eval()
    out = []
    with strict_fp32():
        for u in ranking[:k_max].tolist():
            units.zero_(m, u)
            out.append(int(m(x[:1])[0].argmax()))
    return out


@torch.no_grad()
def topk_batch(model, units, ranking, x, y, k_max):
    """With the top k units zeroed, k = 1..k_max: (the target's (row 0) predictions, the fraction of the
    reference examples (rows 1..) still predicted with their label) -- collateral inside the batch, for a
    model that needs its batch (a pinned example-tied dropout model); fp32, eval mode."""
    m = copy.deepcopy(model).eval()
    preds, kept = [], []
    with strict_fp32():
        for u in ranking[:k_max].tolist():
            units.zero_(m, u)
            p = m(x).argmax(1)
            preds.append(int(p[0]))
            kept.append(float((p[1:] == y[1:]).float().mean()) if len(y) > 1 else float("nan"))
    return preds, kept


def collateral_curve(model, units, ranking, collateral, ks, exclude):
    """{k: accuracies after zeroing the top k units} on the collateral sets (common.flipping.Collateral),
    the target `exclude` left out."""
    m = copy.deepcopy(model).eval()
    out = {}
    for k, u in enumerate(ranking[:max(ks, default=0)].tolist(), start=1):
        units.zero_(m, u)
        if k in ks:
            out[k] = collateral.accuracies(collateral.predict(m, units.changed(ranking[:k].tolist())), exclude)
    return out


# ----------------------------------------------------------------------------- the ETD ground truth

class PinnedMask(nn.Module):
    """Example-tied dropout frozen to the training masks of one batch: tied evaluation that needs no
    example indices. A shorter input is the batch's first rows (the target first)."""

    def __init__(self, mask, channel_dim):
        super().__init__()
        self.mask, self.channel_dim = mask, channel_dim  # a plain attribute: no state_dict entry

    def forward(self, x):
        if x.shape[0] > len(self.mask):
            raise ValueError(f"a pinned mask of {len(self.mask)} examples got a batch of {x.shape[0]}")
        m = self.mask[:x.shape[0]].to(x.dtype)
        shape = [m.shape[0]] + [1] * (x.ndim - 1)
        shape[1 if self.channel_dim == 1 else -1] = m.shape[1]
        return x * m.view(shape)


def pin_tied(model, index):
    """A copy of an example-tied-dropout model whose dropout applies each example's own training mask
    to the batch of training examples `index` (the tied evaluation mode), whatever its mode."""
    m = copy.deepcopy(model).eval()
    for name, module in list(m.named_modules()):
        if isinstance(module, ExampleTiedDropout):
            parent_name, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent_name), child, PinnedMask(module.mask(index), module.channel_dim))
    return m


def tied_channels(model, p_gen, p_mem, seed, index):
    """{dropout layer: (B, C) bool}: the memorization channels each example of `index` was tied to,
    recomputed from the dropout's hashing of (seed, layer, index) with fresh modules of the given
    settings (generalization channels False)."""
    out = {}
    for m in etd_modules(model):
        fresh = ExampleTiedDropout(m.channels, p_gen, p_mem, seed, m.layer, m.channel_dim)
        mem = fresh.memorization_mask(torch.as_tensor(index))
        out[m.layer] = torch.cat([mem.new_zeros(len(mem), fresh.n_gen), mem], dim=1)
    return out


class ChannelUnits:
    """Which units write each example-tied dropout channel: the parameters (first dimension = the
    channel count) of the modules before the dropout in its Sequential -- for a conv + BN + ReLU +
    dropout block, filter c and BatchNorm scale and shift c. `unit_channel[u]`: the channel id of unit u
    (-1: none); `channels[id]`: (layer, channel); `is_mem[id]`: a memorization channel."""

    def __init__(self, model, units):
        entry_of = {e.names[0]: e for e in units.entries}
        self.unit_channel = torch.full((len(units),), -1, dtype=torch.long)
        self.channels, self.is_mem, self.first = [], [], {}
        for name, module in model.named_modules():
            if not isinstance(module, ExampleTiedDropout):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            self.first[module.layer] = len(self.channels)
            self.channels += [(module.layer, c) for c in range(module.channels)]
            self.is_mem += [c >= module.n_gen for c in range(module.channels)]
            found = False
            if isinstance(parent, nn.Sequential):
                for sibling, sub in parent.named_children():
                    if sibling == child:
                        break
                    for pname, p in sub.named_parameters():
                        e = entry_of.get(f"{parent_name}.{sibling}.{pname}")
                        if e is None or p.shape[0] != module.channels:
                            continue
                        local = torch.arange(e.count)
                        c = local // (p.numel() // p.shape[0]) if e.kind == "element" else local
                        self.unit_channel[e.offset:e.offset + e.count] = self.first[module.layer] + c
                        found = True
            if not found:
                raise UserError(f"cannot tell which units write the channels of the example-tied dropout {name}: "
                                f"the ETD ground truth needs the dropout inside a Sequential after a conv / linear "
                                f"layer (resnet9, cnn, vit); pass --etd=False")
        self.is_mem = torch.tensor(self.is_mem)

    def own(self, tied):
        """(n_channels,) bool: the memorization channels of the first example of tied_channels' rows."""
        return torch.cat([tied[layer][0].cpu() for layer in self.first])

    def scores(self, ranking, own, k_max):
        """Precision and recall at k = 1..k_max of the example's own memorization channels among the top-k
        units: precision = fraction of the top k units that write one of them; recall = fraction of them
        written by at least one top-k unit; precision_any = fraction writing any memorization channel."""
        ch = self.unit_channel[ranking[:k_max]]
        valid = ch >= 0
        hit = valid & own[ch.clamp_min(0)]
        mem = valid & self.is_mem[ch.clamp_min(0)]
        ks = torch.arange(1, len(ch) + 1)
        seen, recall = set(), []
        for c, h in zip(ch.tolist(), hit.tolist()):
            if h:
                seen.add(c)
            recall.append(len(seen) / max(1, int(own.sum())))
        return {"precision": (hit.cumsum(0) / ks).tolist(), "recall": recall,
                "precision_any": (mem.cumsum(0) / ks).tolist()}

    def chance(self, own):
        """Precision of a random unit: the fraction of all units that write an own memorization channel."""
        return float((self.unit_channel >= 0).logical_and(own[self.unit_channel.clamp_min(0)]).float().mean())


# ----------------------------------------------------------------------------- summaries

def _mean(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(v) if v else None


def summarize(records, methods, k_max, kinds=("noisy", "clean")):
    """Per method and kind: fraction of targets flipped with the top k zeroed (k = 1..k_max), mean accuracy
    drop on the collateral sets per k measured, ETD precision / recall / reference examples kept per k
    (where recorded), and the seconds per target of the ranking."""
    out = {}
    for method in methods:
        s = {"seconds_mean": _mean([r["methods"][method]["seconds"] for r in records]),
             "seconds_median": statistics.median([r["methods"][method]["seconds"] for r in records]) if records else None}
        for kind in kinds:
            rs = [r for r in records if r["kind"] == kind]
            if not rs:
                continue
            ms = [r["methods"][method] for r in rs]
            d = {"n": len(rs), "flip_rate": [statistics.fmean(m["flipped"][k] for m in ms) for k in range(k_max)]}
            if "collateral_drop" in ms[0]:
                ks = sorted(ms[0]["collateral_drop"], key=int)
                d["collateral_drop"] = {k: {split: _mean([m["collateral_drop"][k][split] for m in ms])
                                            for split in ms[0]["collateral_drop"][k]} for k in ks}
            if "precision" in ms[0]:
                for key in ("precision", "recall", "precision_any", "refs_kept"):
                    d[key] = [statistics.fmean(m[key][k] for m in ms) for k in range(k_max)]
            s[kind] = d
        out[method] = s
    return out


# ----------------------------------------------------------------------------- the reproduction report

def _band(ax, xs, runs, color, label, scale=100):
    a = np.array(runs, dtype=float) * scale
    mean = np.nanmean(a, 0)
    ax.plot(xs, mean, color=color, label=label, marker=".")
    if len(a) > 1:
        sd = np.nanstd(a, 0, ddof=1)
        ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.15)


def _ms(values, scale=100, digits=1):
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float) * scale
    if not len(v):
        return "n/a"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def report_section(results_per_seed, cfg, out_dir):
    """The reproduction report's section from localization_methods.json of each seed: one figure (flip
    rate of noisy targets, test-accuracy drop after their edits, ETD precision, cost; mean ± std over
    seeds, ddof=1) and a markdown table. Returns (figure path, markdown text)."""
    from pathlib import Path
    res = results_per_seed
    methods = [m for m in res[0]["methods"] if all(m in r["summary"]["plain"] for r in res)]
    k_max = res[0]["config"]["max_k"]
    k5, ks = min(5, k_max), list(range(1, k_max + 1))
    ck = [int(k) for k in res[0]["collateral_k"]]
    has_etd = all(r.get("etd") for r in res)
    plain = lambda r, m, kind="noisy": r["summary"]["plain"][m][kind]
    etd = lambda r, m: r["summary"]["etd"][m]["noisy"]
    over = f" (mean ± std over {len(res)} seeds)" if len(res) > 1 else ""  # one seed: no spread to show
    fig, axes = figure(f"Localization methods: zeroing each method's top-k units{over}", cfg,
                       ncols=4 if has_etd else 3, panel=(4.4, 3.6))
    for m in methods:
        color, label = COLORS[m], LABELS[m]
        _band(axes[0, 0], ks, [plain(r, m)["flip_rate"] for r in res], color, label)
        _band(axes[0, 1], ks, [plain(r, m, "clean")["flip_rate"] for r in res], color, label)
        if ck:
            _band(axes[0, 2], ck, [[plain(r, m)["collateral_drop"][str(k)]["test"] for k in ck] for r in res], color, label)
        if has_etd:
            _band(axes[0, 3], ks, [etd(r, m)["precision"] for r in res], color, label)
    titles = [("noisy targets flipped (plain model)", "targets flipped (%)"),
              ("clean targets flipped (plain model)", "targets flipped (%)"),
              ("collateral: test accuracy drop\n(after a noisy target's edit)", "accuracy drop (points)"),
              ("ETD model: top-k units writing the\ntarget's own memorization channels", "precision (%)")]
    for ax, (title, ylabel) in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("k (top-k units zeroed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig_path = save(fig, Path(out_dir) / "localization_methods.png")

    header = ["method", "noisy flipped @1 (%)", f"@{k5} (%)", f"@{k_max} (%)", f"clean flipped @{k_max} (%)"]
    header += [f"test drop @{ck[-1]} (points)"] if ck else []
    header += [f"ETD precision @{k5} (%)", f"ETD recall @{k_max} (%)"] if has_etd else []
    header += ["seconds per target"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        row = [LABELS[m]] + [_ms([plain(r, m)["flip_rate"][k - 1] for r in res]) for k in (1, k5, k_max)]
        row.append(_ms([plain(r, m, "clean")["flip_rate"][-1] for r in res]))
        if ck:
            row.append(_ms([plain(r, m)["collateral_drop"][str(ck[-1])]["test"] for r in res]))
        if has_etd:
            row += [_ms([etd(r, m)["precision"][k5 - 1] for r in res]), _ms([etd(r, m)["recall"][-1] for r in res])]
        row.append(_ms([r["cost_seconds"][m] for r in res], scale=1, digits=3))
        table.append("| " + " | ".join(row) + " |")
    n = res[0]["config"]["n_examples"]
    chance = f"; chance precision {_ms([r['etd']['chance_precision'] for r in res])} %" if has_etd else ""
    text = (f"{len(res)} seed(s); per seed {n} noisy + {n} clean targets on the plain model"
            + (f", {n} noisy targets on the example-tied dropout model evaluated tied{chance}" if has_etd else "")
            + ". Flipped: the target's prediction leaves its training label with the ranking's top k units "
              "zeroed.\n\n" + "\n".join(table))
    return fig_path, text
