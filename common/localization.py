"""Localization methods: which units of a model memorize a training example? Several methods rank the
same units (common.flipping.Units) for a target example inside its reference batch (target first);
the rankings are then judged by what zeroing their top k units does (docs/experiments/localization_methods.md).

Every method returns a ranking: a permutation of all units, the most responsible first. Methods that
score units rank by score, exact ties broken in a seeded random order (unit order would favour the
first layers wherever many scores tie, e.g. units that a mask never moved).

  greedy        the neuron-flipping search (common.flipping.flip_sequential): zero the best unit by w * dL/dw,
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

The variants of Chang et al. (NAACL 2024), each on the target alone (row 0), objective the target's
training-label probability or cross-entropy:
  ig_act        Integrated Gradients on unit activations from a zero baseline (Knowledge-Neurons style): one
                probed module at a time (ActivationProbe's signals), its whole output scaled by alpha from 0
                to 1; score(channel) = sum over positions of a * mean_s dp/da at alpha_s = (s - 1/2) / m, p the
                target's training-label probability. Units without a channel signal (head weights: the
                signal w[k, j] x_j scales with w[k, j]) take the same integral on their parameter.
  zeroout       every unit zeroed alone: score = p(label) - p(label | unit zeroed); one forward per unit.
  keep_hc       a keep mask: unit u's parameters times z_u, z_u ~ HardConcrete(log_alpha_u) clamped to
                [0, 1] (as Chang et al.: log_alpha from 0, plain clamp), Adam on CE(target) + penalty *
                mean E[open gates]: the fewest units that keep the target's prediction. Rank: log_alpha.
  keep_slim     the same with a continuous keep mask s in [0, 1] from 1 (Network Slimming), penalty *
                mean(s). Rank: s.

Every learned mask (hardconcrete, slimming, keep_hc, keep_slim) runs until `Plateau` says it has
converged (a stopping rule, not a step count), at most `max_steps` Adam steps; its penalty is chosen on
development targets (`tune_penalties`).

removal_loss = -log(1 - p_t(training label)) + mean over the references of their cross-entropy: remove
the target's training-label prediction, keep the references'. (The flipping objective's -CE_t is
unbounded: an optimiser would drive it to -inf and stop caring for the references.)

Ground truth: a model trained with example-tied dropout, evaluated tied (each example with its own
training mask: `pin_tied`), has its noisy examples' memorization in their own memorization channels,
which the dropout's hashing tells (`tied_channels`); `ChannelUnits` maps channels to the units that
write them (a conv filter and its BatchNorm scale and shift). `oracle_ranking` zeroes the target's own
memorization channels first: the upper reference. Selectivity and activation IG probe a channel before
the dropout (a pinned mask would otherwise hand them the answer); the methods' margins over two baselines
(the same masks pinned on a model trained without ETD; clean ETD targets) say what is left.
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
from .flipping import entry_scores, flip_sequential, objective, stage_positions, zeroed_copy
from .models import stages
from .plots import figure, legend_beside, save
from .precision import strict_fp32
from .rng import generator

METHODS = ("greedy", "oneshot", "activation", "ig", "ig_act", "zeroout", "hardconcrete", "slimming", "keep_hc",
           "keep_slim", "random")
MASKS = ("hardconcrete", "slimming", "keep_hc", "keep_slim")  # the learned masks: run to convergence, penalty tuned
PASSES = ("forward", "backward", "forward_examples", "backward_examples")  # a ranking's cost, per target
ORACLE = "oracle"  # ETD models only: the target's own memorization channels first (reads the answer)
LABELS = {"greedy": "greedy zeroing (paper)", "oneshot": "one-shot w*dL/dw", "activation": "activation selectivity",
          "ig": "integrated gradients (weights)", "ig_act": "IG on activations (Chang)", "zeroout": "ZeroOut (Chang)",
          "hardconcrete": "HardConcrete removal mask", "slimming": "slimming removal mask",
          "keep_hc": "HardConcrete keep mask (Chang)", "keep_slim": "slimming keep mask (Chang)",
          "random": "random units", ORACLE: "oracle (own channels)"}
COLORS = {"greedy": "black", "oneshot": "tab:blue", "activation": "tab:orange", "ig": "tab:green", "ig_act": "limegreen",
          "zeroout": "tab:cyan", "hardconcrete": "tab:purple", "slimming": "tab:brown", "keep_hc": "violet",
          "keep_slim": "peru", "random": "tab:gray", ORACLE: "tab:red"}
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

# Channel-wise modules a probe walks past. Not example-tied dropout (nor its pinned masks): probed after it,
# a unit outside the target's mask reads exactly 0 and selectivity would read the answer off the mask.
CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid,
               nn.Identity, nn.Dropout, StandardDropout)


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
      of the output of the last channel-wise module (BatchNorm, activation, standard dropout) that
      directly follows its module in the same Sequential, else of its module's output: for a conv + BN +
      ReLU (+ example-tied dropout) block the ReLU's channel, before the example-tied mask;
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
        while i + 1 < len(names) and isinstance(parent[i + 1], CHANNELWISE):
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

def label_probability(logits, y):
    """The target's (row 0) probability of its training label."""
    return torch.softmax(logits[0].float(), 0)[y[0]]


def oneshot_scores(model, units, x, y):
    """w * dL/dw of the flipping objective per unit, once (the greedy search's first scores)."""
    params = {n: p.requires_grad_() for n, p in _params(model, units).items()}
    grads = _grads(objective(functional_call(model, params, (x,)), y), list(params.values()))
    return units.scores(model, grads)


def _path_grads(model, names, trained, x, y, steps, loss_fn):
    """{name: mean over alpha_s = (s - 1/2) / steps of d loss_fn / d w at alpha_s * trained[name]}, the
    parameters `names` scaled together, the rest of the network as trained."""
    total = {n: torch.zeros_like(trained[n]) for n in names}
    for s in range(steps):
        alpha = (s + 0.5) / steps
        scaled = {n: (alpha * trained[n]).requires_grad_() for n in names}
        g = _grads(loss_fn(functional_call(model, scaled, (x,)), y), list(scaled.values()))
        for n, gi in zip(names, g):
            total[n] += gi
    return {n: t / steps for n, t in total.items()}


def ig_scores(model, units, x, y, steps):
    """Integrated Gradients per unit, one layer group at a time (module docstring)."""
    trained, mean_grad, groups = _params(model, units), {}, {}
    for e in units.entries:
        groups.setdefault(e.group, []).extend(e.names)
    for names in groups.values():
        mean_grad.update(_path_grads(model, names, trained, x, y, steps, objective))
    return units.scores(model, [mean_grad[n] for n in units.grad_names])


def _channel_sums(t):
    """(C,): the sum of row 0 of t over everything but its channels (dim 1 of NCHW / (B, C), last of tokens)."""
    t = t[0].float()
    if t.ndim == 1:
        return t
    return t.flatten(1).sum(1) if t.ndim == 3 else t.flatten(0, -2).sum(0)


def ig_act_scores(model, units, probe, x, y, steps):
    """Integrated Gradients of the target's label probability on unit activations from a zero baseline,
    one probed module at a time (module docstring); units without a channel signal: on their parameter."""
    x1, y1 = x[:1], y[:1]
    channel_attr, state = {}, {}

    def scale(module, inputs, out):
        state["a"] = out.detach()
        state["scaled"] = (state["alpha"] * state["a"]).requires_grad_()
        return state["scaled"]
    for name in sorted({name for kind, name, _ in probe.plan if kind == "channel"}):
        handle = model.get_submodule(name).register_forward_hook(scale)
        try:
            total = 0
            for s in range(steps):
                state["alpha"] = (s + 0.5) / steps
                total = total + _grads(label_probability(model(x1), y1), [state["scaled"]])[0]
        finally:
            handle.remove()
        channel_attr[name] = _channel_sums(state["a"] * total / steps)
    trained, scores = _params(model, units), []
    for e, (kind, name, index) in zip(units.entries, probe.plan):
        if kind == "channel" and int(index.max()) < len(channel_attr[name]):
            scores.append(channel_attr[name][index.to(channel_attr[name].device)])
        else:
            g = _path_grads(model, list(e.names), trained, x1, y1, steps, label_probability)
            scores.append(entry_scores(e, [trained[n] for n in e.names], [g[n] for n in e.names]))
    return torch.cat(scores)


@torch.no_grad()
def zeroout_scores(model, units, x, y):
    """ZeroOut: every unit zeroed alone, score = the drop of the target's label probability. A unit's
    forward restarts from the cached input of the first stage it changes (common.models.stages).
    Returns (scores, forward passes of the target)."""
    x1, y1 = x[:1], y[:1]
    parts, positions = stages(model), stage_positions(model)
    inputs, h = [], x1
    for part in parts or []:
        inputs.append(h)
        h = part(h)
    base = label_probability(model(x1), y1)
    scores = torch.empty(len(units))
    for e in units.entries:
        params = [model.get_parameter(n) for n in e.names]
        start = min(positions[n] for n in e.names) if parts else None
        for local in range(e.count):
            _, index = units.locate(e.offset + local)
            saved = [p[index].clone() for p in params]
            for p in params:
                p[index] = 0
            if parts:
                h = inputs[start]
                for part in parts[start:]:
                    h = part(h)
            else:
                h = model(x1)
            for p, v in zip(params, saved):
                p[index] = v
            scores[e.offset + local] = base - label_probability(h, y1)
    return scores, len(units) + 1


class Plateau:
    """The stopping rule of a learned mask: every `window` Adam steps the window's mean loss is compared
    with the previous window's; converged when it fell by less than `tol` of it (relative) and the top
    `k` units of the mask's ranking are the same set as at the previous window's end. `means` is the
    trace (one mean loss per window)."""

    def __init__(self, window, tol, k):
        self.window, self.tol, self.k = window, tol, k
        self.losses, self.means, self.top = [], [], None

    def step(self, loss, theta):
        """Record one step's loss and the mask's scores after it; True once converged."""
        self.losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        if len(self.losses) % self.window:
            return False
        mean = statistics.fmean(self.losses[-self.window:])
        # a stable sort: among equal scores (e.g. masks at 0) the same units each time
        top = set(torch.sort(theta.detach().float(), descending=True, stable=True).indices[:self.k].tolist())
        done = bool(self.means) and self.means[-1] - mean <= self.tol * abs(self.means[-1]) and top == self.top
        self.means.append(mean)
        self.top = top
        return done


def mask_scores(model, units, x, y, kind, lr, penalty, gen, plateau, max_steps):
    """A mask learned for the target until `plateau` says converged (at most max_steps Adam steps):
    removal masks (hardconcrete, slimming: remove the target's label, keep the references') or Chang et
    al.'s keep masks (keep_hc, keep_slim: keep the target's prediction with the fewest units; module
    docstring). Returns (scores: log_alpha or the mask, {"steps", "converged", "trace"})."""
    params = _params(model, units)
    keep = kind.startswith("keep")
    hard = kind in ("hardconcrete", "keep_hc")
    init = {"hardconcrete": math.log(HC_INIT / (1 - HC_INIT)) + BETA * math.log(-GAMMA / ZETA),
            "keep_hc": 0.0, "slimming": 0.0, "keep_slim": 1.0}[kind]
    theta = torch.full((len(units),), init, device=x.device, requires_grad=True)
    xs, ys = (x[:1], y[:1]) if keep else (x, y)
    optimizer = torch.optim.Adam([theta], lr=lr)
    converged, steps = False, 0
    while steps < max_steps and not converged:
        if hard:
            u = torch.rand(len(units), generator=gen).clamp(1e-6, 1 - 1e-6).to(x.device)
            z = torch.sigmoid((u.log() - (-u).log1p() + theta) / BETA) * (ZETA - GAMMA) + GAMMA
            # keep (Chang et al.): a plain clamp; removal: the clamped value with the stretched sample's
            # gradient (with a plain clamp a removal gate sampled at 0 gets none: most would never be scored)
            z = z.clamp(0, 1) if keep else z + (z.clamp(0, 1) - z).detach()
            reg = torch.sigmoid(theta - BETA * math.log(-GAMMA / ZETA))  # P(gate open)
        else:
            z, reg = theta, theta.abs()
        logits = functional_call(model, masked_params(params, units, z if keep else 1 - z), (xs,))
        task = F.cross_entropy(logits.float(), ys) if keep else removal_loss(logits, ys)
        loss = task + penalty * (reg.mean() if keep else reg.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not hard:
            with torch.no_grad():
                theta.clamp_(0, 1)
        steps += 1
        converged = plateau.step(loss, theta)
    return theta.detach(), {"steps": steps, "converged": converged, "trace": [round(m, 6) for m in plateau.means]}


def greedy_ranking(model, units, x, y, k_max, gen):
    """The flipping search's zeroed units (flip_sequential, until the flip), continued with the same rule to k_max
    units; then the rest by the scores after the last. Returns (ranking, units zeroed at the flip or None)."""
    result = flip_sequential(model, units, x, y, k_max)
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


def oracle_ranking(truth, own, gen):
    """The target's own memorization channels first (a seeded order of channels, each with all the units
    that write it), then every other unit in a seeded random order: the upper reference, reading the answer."""
    channels = torch.nonzero(own).flatten()
    channels = channels[torch.randperm(len(channels), generator=gen)]
    first = [u for c in channels.tolist() for u in torch.nonzero(truth.unit_channel == c).flatten().tolist()]
    rest = torch.randperm(len(truth.unit_channel), generator=gen)
    rest = rest[~torch.isin(rest, torch.tensor(first, dtype=torch.long))]
    return torch.cat([torch.tensor(first, dtype=torch.long), rest])


class Localizer:
    """Rankings of a model's units for targets by every method (reusable across targets of one model).

    x, y: the batch, target first, then its reference examples; `index` seeds the random pieces.
    `penalties`: {mask method: sparsity weight}. Every ranking also reports its cost in passes of the
    network (forward / backward passes and the examples they carried)."""

    def __init__(self, model, units, seed, max_k, ig_steps, mask_max_steps, mask_window, mask_tol, hc_lr, slim_lr,
                 penalties):
        self.model, self.units, self.seed = _frozen(model), units, seed
        self.max_k, self.ig_steps = max_k, ig_steps
        self.max_steps, self.window, self.tol = mask_max_steps, mask_window, mask_tol
        self.lr = {"hardconcrete": hc_lr, "keep_hc": hc_lr, "slimming": slim_lr, "keep_slim": slim_lr}
        self.penalties = dict(penalties)
        self._probe = None
        self.counting, self.passes = True, None
        self.model.register_forward_hook(self._count)

    def _count(self, module, inputs, out):
        if not self.counting or self.passes is None:
            return
        rows = int(inputs[0].shape[0]) if inputs else 0
        self.passes["forward"] += 1
        self.passes["forward_examples"] += rows
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:  # each is backpropagated
            self.passes["backward"] += 1
            self.passes["backward_examples"] += rows

    def gen(self, *tags):
        return generator(self.seed, "localization", *tags)

    def rank(self, method, x, y, index):
        """(ranking: a CPU LongTensor permutation of the units, extra JSON-able facts incl. "passes"); strict fp32."""
        self.passes = dict.fromkeys(PASSES, 0)
        self.counting = True
        with strict_fp32():
            ranking, extra = self._rank(method, x, y, index)
        passes, self.passes = self.passes, None  # later forwards (of copies, which keep the hook) uncounted
        return ranking, {**extra, "passes": passes}

    def _add(self, forward, backward, rows):
        self.passes["forward"] += forward
        self.passes["backward"] += backward
        self.passes["forward_examples"] += forward * rows
        self.passes["backward_examples"] += backward * rows

    def _rank(self, method, x, y, index):
        ties = self.gen("ties", method, index)
        if method == "greedy":
            self.counting = False  # zeroed copies' passes (which keep the hook): counted here, K + 1
            ranking, flip_at = greedy_ranking(self.model, self.units, x, y, self.max_k, ties)
            self._add(self.max_k + 1, self.max_k + 1, len(x))
            return ranking, {"flip_at": flip_at}
        if method == "oneshot":
            return rank(oneshot_scores(self.model, self.units, x, y), ties), {}
        if method in ("activation", "ig_act"):
            self._probe = self._probe or ActivationProbe(self.model, self.units)
            if method == "activation":
                return rank(self._probe.selectivity(x), ties), {}
            return rank(ig_act_scores(self.model, self.units, self._probe, x, y, self.ig_steps), ties), {}
        if method == "ig":
            return rank(ig_scores(self.model, self.units, x, y, self.ig_steps), ties), {}
        if method == "zeroout":
            self.counting = False
            scores, forwards = zeroout_scores(self.model, self.units, x, y)
            self._add(forwards, 0, 1)  # partial forwards (from a cached stage) counted as whole ones
            return rank(scores, ties), {}
        if method in MASKS:
            theta, facts = mask_scores(self.model, self.units, x, y, method, self.lr[method], self.penalties[method],
                                       self.gen(method, index), Plateau(self.window, self.tol, self.max_k),
                                       self.max_steps)
            return rank(theta, ties), {"mask": facts}
        if method == "random":
            return torch.randperm(len(self.units), generator=self.gen("random", index)), {}
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def flip_auc(flipped):
    """Area under the flip curve: the fraction of k = 1..K at which the target is flipped."""
    return statistics.fmean(flipped) if flipped else float("nan")


def tune_penalties(localizer, dev, base, factors, k_max):
    """Per learned mask, the sparsity weight (base[method] x a factor) whose rankings flip the development
    targets `dev` ([(x, y, index)]) soonest: the largest mean area under the flip curve (k = 1..k_max;
    the first factor on ties; a single factor is taken without ranking). Sets localizer.penalties; returns {method: {"chosen", "auc": {penalty: mean}}}."""
    out = {}
    for method in base:
        auc = {}
        for f in (factors if len(factors) > 1 else ()):  # one factor: nothing to choose
            localizer.penalties[method] = base[method] * f
            auc[base[method] * f] = statistics.fmean(
                flip_auc([p != int(y[0]) for p in topk_predictions(localizer.model, localizer.units,
                                                                  localizer.rank(method, x, y, i)[0], x, k_max)])
                for x, y, i in dev)
        chosen = max(auc, key=lambda p: auc[p]) if auc else base[method] * factors[0]  # the first of equal maxima
        localizer.penalties[method] = chosen
        out[method] = {"chosen": chosen, "auc": {f"{p:g}": a for p, a in auc.items()}}
    return out


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
        """Against the example's own memorization channels `own`, a unit a hit when it writes one of them:
        precision at k = 1..k_max (the fraction of the top k units that are hits); recall at k (the fraction
        of its own channels written by at least one top-k unit); precision_any (top-k units writing any
        memorization channel); `ap`: average precision of the hits over the whole ranking; per dropout
        layer (the ranking restricted to the units writing that layer's channels, where a global top k can
        skip a layer): `layer_precision` at k = 1..k_max and `layer_ap`."""
        ch_all = self.unit_channel[ranking]
        hit_all = (ch_all >= 0) & own[ch_all.clamp_min(0)]
        ch, hit = ch_all[:k_max], hit_all[:k_max]
        mem = (ch >= 0) & self.is_mem[ch.clamp_min(0)]
        ks = torch.arange(1, len(ch) + 1)
        seen, recall = set(), []
        for c, h in zip(ch.tolist(), hit.tolist()):
            if h:
                seen.add(c)
            recall.append(len(seen) / max(1, int(own.sum())))
        layer_precision, layer_ap = {}, {}
        for layer, (lo, hi) in self.layer_ranges().items():
            inside = (ch_all >= lo) & (ch_all < hi)
            h = hit_all[inside]
            layer_precision[layer] = (h[:k_max].cumsum(0) / torch.arange(1, min(k_max, len(h)) + 1)).tolist()
            layer_ap[layer] = average_precision(h)
        return {"precision": (hit.cumsum(0) / ks).tolist(), "recall": recall,
                "precision_any": (mem.cumsum(0) / ks).tolist(), "ap": average_precision(hit_all),
                "layer_precision": layer_precision, "layer_ap": layer_ap}

    def layer_ranges(self):
        """{dropout layer: (first channel id, one past its last)}."""
        bounds = list(self.first.values()) + [len(self.channels)]
        return {layer: (lo, hi) for layer, lo, hi in zip(self.first, bounds, bounds[1:])}

    def chance(self, own):
        """Precision of a random unit: the fraction of all units that write an own memorization channel."""
        return float((self.unit_channel >= 0).logical_and(own[self.unit_channel.clamp_min(0)]).float().mean())


def average_precision(hits):
    """Average precision of a ranked list of hits (bool, best first): the mean over the hits of the
    precision at their rank; nan without hits."""
    hits = torch.as_tensor(hits, dtype=torch.bool)
    if not bool(hits.any()):
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


class HeldOut:
    """Collateral on an example-tied dropout model, tied: a fixed set of training examples (clean and
    noisy) evaluated each with its own training mask (`pin_tied`), after an edit; the examples of the
    target's batch left out. Accuracy against the training labels."""

    def __init__(self, model, data, sets):
        self.idx = torch.cat([sets["clean"], sets["noisy"]])
        self.n_clean = len(sets["clean"])
        self.pinned = pin_tied(model, self.idx.to(data.device))
        self.x, self.y = data.batch(self.idx.to(data.device)), data.labels(self.idx.to(data.device))
        self.before = self.predict(self.pinned)

    @torch.no_grad()
    def predict(self, model):
        with strict_fp32():
            return model.eval()(self.x).argmax(1)

    def accuracies(self, preds, exclude=()):
        """{"clean": .., "noisy": ..}: accuracy of `preds` on the set's clean and noisy examples, those in
        `exclude` (indices) left out."""
        keep = ~torch.isin(self.idx, torch.as_tensor(list(exclude), dtype=torch.long))
        right = (preds.cpu() == self.y.cpu()) & keep
        kinds = {"clean": slice(0, self.n_clean), "noisy": slice(self.n_clean, None)}
        return {k: float(right[s].sum() / keep[s].sum().clamp_min(1)) for k, s in kinds.items()}

    def after(self, units, ranking, k, exclude):
        """Accuracies with the top k units of `ranking` zeroed."""
        m = zeroed_copy(self.pinned, units, ranking[:k].tolist())
        return self.accuracies(self.predict(m), exclude)


# ----------------------------------------------------------------------------- summaries

def _mean(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(v) if v else None


def summarize(records, methods, k_max, kinds=("noisy", "clean")):
    """Per method and kind: fraction of targets flipped with the top k zeroed (k = 1..k_max), the mean area
    under the flip curve, the median k to flip (k_max + 1 where none), the mean accuracy drop on the
    collateral sets per k measured and at each target's own flip point, ETD precision / recall / reference
    examples kept per k, average precision (global and per layer), held-out collateral at the flip point
    (where recorded), and the seconds per target of the ranking."""
    out = {}
    for method in methods:
        secs = [r["methods"][method]["seconds"] for r in records]
        s = {"seconds_mean": _mean(secs), "seconds_median": statistics.median(secs) if secs else None}
        for kind in kinds:
            rs = [r for r in records if r["kind"] == kind]
            if not rs:
                continue
            ms = [r["methods"][method] for r in rs]
            d = {"n": len(rs), "flip_rate": [statistics.fmean(m["flipped"][k] for m in ms) for k in range(k_max)],
                 "auc": _mean([m["auc"] for m in ms]),
                 "flip_k_median": statistics.median(m["flip_k"] or k_max + 1 for m in ms)}
            if "collateral_drop" in ms[0]:
                ks = sorted(ms[0]["collateral_drop"], key=int)
                d["collateral_drop"] = {k: {split: _mean([m["collateral_drop"][k][split] for m in ms])
                                            for split in ms[0]["collateral_drop"][k]} for k in ks}
                d["collateral_at_flip"] = {split: _mean([(m["collateral_at_flip"] or {}).get(split) for m in ms])
                                           for split in ("clean", "noisy", "test")}
            if "precision" in ms[0]:
                for key in ("precision", "recall", "precision_any", "refs_kept"):
                    d[key] = [statistics.fmean(m[key][k] for m in ms) for k in range(k_max)]
                d["ap"] = _mean([m["ap"] for m in ms])
                d["layer_ap"] = {layer: _mean([m["layer_ap"][layer] for m in ms]) for layer in ms[0]["layer_ap"]}
                d["held_out_at_flip"] = {split: _mean([m.get("held_out_at_flip", {}).get(split) for m in ms])
                                         for split in ("clean", "noisy")}
            s[kind] = d
        out[method] = s
    return out


# ----------------------------------------------------------------------------- ranking the methods

def _flip_ks(ms, k_max):
    return np.array([m["flip_k"] or k_max + 1 for m in ms], dtype=float)


def _layer_mean(m):
    v = [a for a in m["layer_ap"].values() if a is not None and np.isfinite(a)]
    return float(np.mean(v)) if v else float("nan")


def _nanmean(a):
    a = np.asarray(a, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def compare(results_per_seed, resamples=2000):
    """One statistic per method and question, each with a 95% percentile bootstrap CI (seeds resampled,
    then targets within a seed; common.claims.bootstrap):
      auc                area under the flip curve, plain model, noisy targets (mean)
      auc_vs_greedy      the same minus greedy's, paired per target
      median_k           median k to flip (K + 1 where the top K never flip it), plain noisy targets
      collateral_at_flip test accuracy drop at the method's own flip point (targets it flips)
      etd_auc            area under the flip curve, ETD noisy targets
      held_out_at_flip   ETD: held-out clean training accuracy drop (tied) at the method's own flip point
      ap, ap_minus_a, ap_minus_b          ETD noisy targets' average precision of their own channels; minus
                         the same method's on baseline (a) (paired per target) and on the clean targets (b)
      precision5_minus_a / _b, layer_ap_minus_a / _b   the same margins for precision at 5 and per-layer AP
      forward_equivalents  cost: example-forwards + 2 x example-backwards per target (mean; no CI)
    Returns {method: {statistic: {"value", "ci", "n"}}}."""
    from .claims import bootstrap  # the one bootstrap of the project
    res = results_per_seed
    k_max = res[0]["config"]["max_k"]
    methods = [m for m in res[0]["methods"] if all(m in r["methods"] for r in res)]
    methods += [ORACLE] if all(r.get("etd") for r in res) else []
    out = {}

    def plain(r, kind="noisy"):
        return [rec for rec in r["plain"]["records"] if rec["kind"] == kind]

    def etd(r, model, kind):
        return [rec for rec in (r.get("etd") or {}).get("records", []) if rec["model"] == model and rec["kind"] == kind]

    def stat(name, strata, fn):
        strata = [s for s in strata if all(len(a) for a in s)]
        if not strata:
            return None
        value = fn(strata)
        lo, hi = bootstrap(strata, fn, f"localization:{name}", resample_strata=True, n=resamples)
        return {"value": value, "ci": [lo, hi], "n": int(sum(len(s[0]) for s in strata))}

    mean0 = lambda sample: _nanmean(np.concatenate([s[0] for s in sample]))
    median0 = lambda sample: float(np.median(np.concatenate([s[0] for s in sample])))
    diff01 = lambda sample: mean0(sample) - _nanmean(np.concatenate([s[1] for s in sample]))
    for m in methods:
        o = {}
        if m != ORACLE:
            o["auc"] = stat(f"{m}:auc", [(np.array([t["methods"][m]["auc"] for t in plain(r)]),) for r in res], mean0)
            if "greedy" in methods:
                o["auc_vs_greedy"] = stat(f"{m}:auc_vs_greedy", [(np.array(
                    [t["methods"][m]["auc"] - t["methods"]["greedy"]["auc"] for t in plain(r)]),) for r in res], mean0)
            o["median_k"] = stat(f"{m}:median_k", [(_flip_ks([t["methods"][m] for t in plain(r)], k_max),) for r in res],
                                 median0)
            o["collateral_at_flip"] = stat(f"{m}:collateral", [(np.array(
                [t["methods"][m]["collateral_at_flip"]["test"] for t in plain(r) if t["methods"][m]["collateral_at_flip"]]),)
                for r in res], mean0)
            every = [t for r in res for t in r["plain"]["records"] + (r.get("etd") or {}).get("records", [])]
            o["forward_equivalents"] = {"value": float(np.mean([t["methods"][m]["passes"]["forward_examples"] +
                                                                2 * t["methods"][m]["passes"]["backward_examples"]
                                                                for t in every])), "ci": None, "n": len(every)}
        if all(r.get("etd") for r in res):
            noisy = [etd(r, "etd", "noisy") for r in res]
            o["etd_auc"] = stat(f"{m}:etd_auc", [(np.array([t["methods"][m]["auc"] for t in ts]),) for ts in noisy], mean0)
            o["held_out_at_flip"] = stat(f"{m}:held_out", [(np.array(
                [t["methods"][m]["held_out_at_flip"]["clean"] for t in ts if "held_out_at_flip" in t["methods"][m]]),)
                for ts in noisy], mean0)
            for key, get in (("ap", lambda t: t["methods"][m]["ap"]),
                             ("precision5", lambda t: t["methods"][m]["precision"][min(5, k_max) - 1]),
                             ("layer_ap", lambda t: _layer_mean(t["methods"][m]))):
                if key == "ap":
                    o["ap"] = stat(f"{m}:ap", [(np.array([get(t) for t in ts]),) for ts in noisy], mean0)
                base_a = [{t["index"]: t for t in etd(r, "etd_base", "noisy")} for r in res]
                o[f"{key}_minus_a"] = stat(f"{m}:{key}:a", [(np.array(
                    [get(t) - get(b[t["index"]]) for t in ts if t["index"] in b]),) for ts, b in zip(noisy, base_a)], mean0)
                o[f"{key}_minus_b"] = stat(f"{m}:{key}:b", [(np.array([get(t) for t in ts]),
                                                              np.array([get(t) for t in etd(r, "etd", "clean")]))
                                                             for ts, r in zip(noisy, res)], diff01)
        out[m] = o
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
    legend_beside(axes[0, -1], axes[0, 0].get_legend_handles_labels(), fontsize=7)  # the methods' colours
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
