"""Neuron flipping: the fewest units whose zeroing flips a training example's prediction (docs/protocol.md).

Units -- what one greedy step zeroes:
- unit="channel" (the authors' criterion): a conv filter W[c] of any Conv2d is one unit; every other
  parameter (BatchNorm / LayerNorm affine, linear weights, biases) one unit per element.
- unit="channel_out": a conv's output channel c silenced where it leaves the conv: where a BatchNorm2d
  takes the conv's output, its output channel (gamma[c] = beta[c] = 0: an eval-mode BatchNorm after a
  zeroed filter still emits the constant beta - gamma * mean / std, so "channel" does not silence the
  channel); else the conv output (W[c] = 0 and bias[c] = 0). The conv filter and that BatchNorm's
  parameters are no units of their own; every other parameter one unit per element.
- unit="weight": every parameter element.
Units come from the module tree (layer groups input to output, parameters in module order), for any
architecture.

Criterion, for a target t in its batch B (t first, then its reference examples), following the
authors' code: each greedy step draws fresh Gaussian noise (seeded per target and step) for n_eot
copies of the whole batch, each copy noised once with noise of norm eot_noise x the norm of the whole
batch, and (objective="mean_logits", the default: the authors' code since their fix "averaging at
pred level instead of gradient level")
    zbar = the copies' logits averaged,   L = mean_j CE(zbar_j, y_j) with the target's term multiplied by -|B|
                                            = -CE(zbar_t, y_t) + sum_{j != t} CE(zbar_j, y_j) / |B|
and one backward of L. objective="mean_loss" (their code before that fix, as the paper was written):
L = the mean over the copies of that objective on each copy's logits (the mean of the copies'
gradients). n_eot = 0: one clean copy (both coincide). The target counts as flipped when the argmax of
zbar_t differs from its training label (both objectives). The score of a unit is the first-order
decrease of L when it is zeroed: w * dL/dw, summed over the filter for a channel unit; for a
channel_out unit gamma[c] dL/dgamma[c] + beta[c] dL/dbeta[c] (= sum over examples and positions of
a_c * dL/da_c, a_c = gamma xhat + beta the silenced output channel). Greedy: zero the best unit not
yet zeroed, recompute, until the target flips or `max_units` units are zeroed (then: not flipped).

Two implementations, the same unit sequences:
- `flip_sequential`: the authors' loop written plainly, one target at a time: per step the copies'
  forwards, one after the other, and a backward. Where the copies' graphs would hold more than `rows`
  input rows (a memory budget: `graph_rows`), the forward runs without a graph first and each piece
  again with its graph, backpropagated from its share of dL/dlogits (one piece alive at a time).
- `flip_batched`: several targets in one forward (torch.func.vmap over per-target parameter copies:
  each target its own batch, noise and zeroed units), for a GPU that one target's batch leaves idle.
  Its kernels round otherwise; a step where rounding could decide (top two within TIE) is redone by
  the plain step, so the choices are the plain loop's.

Everything runs in eval mode (BatchNorm uses its running statistics, so examples do not interact), in
strict fp32 (no TF32, no autocast): a borderline example must not flip by rounding.
"""
import copy
import itertools
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .cli import UserError
from .data import KINDS as EXAMPLE_KINDS
from .models import layer_groups, root, stages
from .precision import strict_fp32
from .rng import generator

UNITS = ("channel", "channel_out", "weight")
OBJECTIVES = ("mean_logits", "mean_loss")  # the authors' current objective, their earlier one (objective())
# flip_batched: a top-two gap (scores, or the target's mean logits) within this fraction of the largest
# magnitude is left to the plain step (vmap's kernels round otherwise than the plain loop's; the
# differences measured are in docs/experiments/neuron_flipping.md)
TIE = 1e-4


# ----------------------------------------------------------------------------- units

@dataclass
class Entry:
    """One block of units: units offset .. offset + count - 1."""
    group: str     # layer group, e.g. "res1.0"
    param: str     # inside the group: the parameter ("conv.weight"), or the module whose output channel is silenced ("bn")
    kind: str      # "channel" (a filter), "channel_out" (an output channel) or "element"
    module: str    # full name of the module that holds the zeroed parameters
    names: tuple   # full names of the parameters zeroed at a unit's index
    shape: tuple   # shape of names[0]
    offset: int
    count: int


def batchnorm_after_conv(model, sample):
    """{Conv2d: the affine BatchNorm2d that takes its output as input}, found by running `sample`
    (a batch of one input is enough) through the model in eval mode."""
    outputs, pairs, hooks = [], {}, []

    def conv_hook(module, inputs, out):
        outputs.append((module, out))

    def bn_hook(module, inputs):
        for conv, out in outputs:
            if inputs[0] is out and conv not in pairs and module.affine:
                pairs[conv] = module

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pairs


class Units:
    """The candidate units of a model in a fixed order: layer groups input to output, parameters in
    module order, then channel / element (row-major) order. A unit is an int in [0, len(units)).
    `sample`: one input, needed for unit="channel_out" (to find the BatchNorm after each conv)."""

    def __init__(self, model, unit="channel", sample=None):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if unit == "channel_out" and sample is None:
            raise ValueError("unit='channel_out' needs a sample input to find the BatchNorm after each conv")
        self.unit = unit
        name_of = {id(p): n for n, p in model.named_parameters()}
        path_of = {id(m): n for n, m in model.named_modules()}
        owner = {}  # full parameter name -> (module, name inside it)
        for m in model.modules():
            for local, p in m.named_parameters(recurse=False):
                owner.setdefault(name_of[id(p)], (m, local))
        bn_after = batchnorm_after_conv(model, sample) if unit == "channel_out" else {}
        conv_of_bn = {bn: conv for conv, bn in bn_after.items()}

        def full(module, local):
            prefix = path_of[id(module)]
            return f"{prefix}.{local}" if prefix else local

        base = root(model)[0]  # a group's parameters are named base + group + "." + their name in it
        self.entries, taken, offset = [], set(), 0
        for group, gmodule in layer_groups(model):
            relative = lambda name: name[len(base + group) + 1:] or name.rsplit(".", 1)[-1]
            for _, p in gmodule.named_parameters():
                name = name_of[id(p)]
                if name in taken:
                    continue
                m, local = owner[name]
                conv = m if isinstance(m, nn.Conv2d) else conv_of_bn.get(m)
                if unit == "channel_out" and conv is not None:
                    silenced = bn_after.get(conv, conv)  # the module whose output channel is zeroed
                    names = tuple(full(silenced, k) for k, q in silenced.named_parameters(recurse=False)
                                  if k in ("weight", "bias"))
                    absorbed = {full(mod, k) for mod in (conv, silenced) for k, _ in mod.named_parameters(recurse=False)}
                    kind, label, module = "channel_out", relative(path_of[id(silenced)]), path_of[id(silenced)]
                    count = conv.out_channels
                elif unit == "channel" and isinstance(m, nn.Conv2d) and local == "weight":
                    names, absorbed, kind, label, module = (name,), {name}, "channel", relative(name), path_of[id(m)]
                    count = p.shape[0]
                else:
                    names, absorbed, kind, label, module = (name,), {name}, "element", relative(name), path_of[id(m)]
                    count = p.numel()
                shape = tuple(model.get_parameter(names[0]).shape)
                self.entries.append(Entry(group, label, kind, module, names, shape, offset, count))
                taken |= absorbed
                offset += count
        self.n = offset
        self.offsets = [e.offset for e in self.entries]
        missing = set(name_of.values()) - taken
        if missing:
            raise ValueError(f"parameters outside every layer group: {sorted(missing)[:5]}")
        # the parameters whose gradients the scores need, in entry order
        self.grad_names = list(dict.fromkeys(n for e in self.entries for n in e.names))

    def __len__(self):
        return self.n

    def entry_index(self, u):
        lo, hi = 0, len(self.offsets)
        while hi - lo > 1:  # the last entry starting at or before u
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.offsets[mid] <= u else (lo, mid)
        return lo

    def locate(self, u):
        """(entry, index into each of its parameters: (c,) for a channel, the element's indices otherwise)."""
        e = self.entries[self.entry_index(u)]
        local = u - e.offset
        if e.kind != "element":
            return e, (local,)
        index = []
        for dim in reversed(e.shape):
            index.append(local % dim)
            local //= dim
        return e, tuple(reversed(index))

    def describe(self, u):
        """JSON-able: layer group, parameter (or silenced module), kind, index, and the full names of
        the parameters set to zero at that index (the edit, rebuildable from the record alone)."""
        e, index = self.locate(u)
        return {"group": e.group, "param": e.param, "kind": e.kind, "index": list(index), "params": list(e.names)}

    @torch.no_grad()
    def zero_(self, model, u):
        e, index = self.locate(u)
        for name in e.names:
            model.get_parameter(name)[index] = 0

    def changed(self, zeroed):
        """Full names of the parameters that zeroing the units `zeroed` changes."""
        return {n for u in zeroed for n in self.locate(u)[0].names}

    def scores(self, model, grads):
        """First-order score per unit, in unit order; `grads` aligned with `grad_names`."""
        return self.scores_of({n: model.get_parameter(n).detach() for n in self.grad_names},
                              dict(zip(self.grad_names, grads)))

    def scores_of(self, params, grads):
        """The same from {name: parameter} and {name: gradient}."""
        return torch.cat([entry_scores(e, [params[n] for n in e.names], [grads[n] for n in e.names])
                          for e in self.entries])


def entry_scores(e, params, grads):
    """w * dL/dw per element; for a channel unit summed over everything but the channel dimension
    (and over the entry's parameters: gamma and beta of a channel_out unit)."""
    if e.kind == "element":
        return (params[0] * grads[0]).flatten()
    total = None
    for p, g in zip(params, grads):
        s = p * g
        s = s.sum(dim=tuple(range(1, s.ndim))) if s.ndim > 1 else s
        total = s if total is None else total + s
    return total


def zeroed_copy(model, units, zeroed):
    """A copy of `model` (eval mode) with the units `zeroed` set to zero."""
    m = copy.deepcopy(model).eval()
    for u in zeroed:
        units.zero_(m, u)
    return m


def stage_positions(model):
    """{full parameter name: position of its stage in common.models.stages(model)}, or None where the
    model has no stages (then nothing can be restarted from a cached stage input)."""
    parts = stages(model)
    if parts is None:
        return None
    where = {id(p): k for k, s in enumerate(parts) for p in s.parameters()}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


# ----------------------------------------------------------------------------- one greedy search

def objective(logits, y, mode="mean_logits"):
    """logits: the batch's copies stacked copy-major (a multiple of len(y) rows); y: the batch's labels,
    target first. The cross-entropy per example with the target's term multiplied by -len(y), then the
    mean over the batch, as the authors write it; what it takes per example (OBJECTIVES):
    "mean_logits": the cross-entropy of the copies' mean logits (the authors' code since their fix
    "averaging at pred level instead of gradient level"); "mean_loss": the mean over the copies of
    each copy's objective (their code before that fix: the mean of the copies' gradients)."""
    b = len(y)
    z = logits.float().view(-1, b, logits.shape[-1])
    weight = torch.ones(b, device=z.device)
    weight[0] = -b
    if mode == "mean_logits":
        return (F.cross_entropy(z.mean(0), y, reduction="none") * weight).mean()
    if mode == "mean_loss":
        return (F.cross_entropy(z.flatten(0, 1), y.repeat(len(z)), reduction="none").view(-1, b) * weight).mean()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {mode!r}")


def target_prediction(logits, b):
    """The target's class from the copies' logits stacked copy-major (batches of b rows, target first):
    the argmax of its logits averaged over the copies (both objectives: the authors' flip check)."""
    return int(logits.view(-1, b, logits.shape[-1])[:, 0].mean(0).argmax())


def eot_generator(seed, index, step):
    """The noise of greedy step `step` for target `index`: fresh at every step (as the authors), seeded."""
    return generator(seed, "neuron_flipping", "eot", index, step)


def eot_draw(x, n_eot, gen):
    """The Gaussian draws of one step's n_eot copies of batch x, on the CPU (the same numbers on every
    device; no draw for n_eot = 0)."""
    return torch.randn((n_eot,) + tuple(x.shape), generator=gen) if n_eot else None


def eot_apply(x, z, eot_noise):
    """x itself (z None), or its copies x + z_k scaled so that each copy's noise has norm eot_noise * the
    norm of the whole batch x (the authors' l2_noise: one norm for the batch, not one per example; each
    copy noised once, as their code since their fix), stacked copy-major."""
    if z is None:
        return x
    z = z.to(x.device)
    scale = eot_noise * x.norm() / z.flatten(1).norm(dim=1)
    noisy = x.unsqueeze(0) + z * scale[:, None, None, None, None]
    return noisy.flatten(0, 1).contiguous(memory_format=torch.channels_last)


def eot_inputs(x, n_eot, eot_noise, gen):
    """The input of one step: x itself (n_eot = 0), or n_eot noised copies of the batch stacked copy-major
    (eot_draw, eot_apply)."""
    return eot_apply(x, eot_draw(x, n_eot, gen), eot_noise)


def step_draw(x, n_eot, noise_key, step):
    """The draws of greedy step `step` (noise_key: (seed, target index)): fresh at every step, seeded."""
    return eot_draw(x, n_eot, eot_generator(*noise_key, step) if n_eot else None)


def step_input(x, n_eot, eot_noise, noise_key, step):
    """What greedy step `step` runs: the batch x, or its n_eot noised copies stacked copy-major."""
    return eot_apply(x, step_draw(x, n_eot, noise_key, step), eot_noise)


@dataclass
class FlipResult:
    units: list        # the zeroed units, in order (empty: the target did not have its label to begin with)
    flipped: bool      # the prediction left the training label within max_units
    prediction: int    # the target's prediction at the end (on the last step's noised copies)


def _best(scores, zeroed):
    """The best unit not yet zeroed (the first one on exact ties, as torch.argmax)."""
    if zeroed:
        scores = scores.index_fill(0, torch.tensor(zeroed, device=scores.device), -torch.inf)
    return int(scores.argmax())


def _grads(out, inputs, grad_outputs=None):
    """d out / d inputs (out: a loss, or outputs with grad_outputs); zeros for an input that out does not
    use (e.g. a head unused in eval mode)."""
    grads = torch.autograd.grad(out, inputs, grad_outputs=grad_outputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def graph_bytes_per_row(model, x):
    """Bytes that one more input row adds to the autograd graph of a forward of `model` (the tensors
    saved for its backward, each storage counted once): forwards of two rows of x and of one."""
    def saved(n):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x[:n])
        return sum(seen.values())
    return max(1, saved(2) - saved(1))


def graph_rows(model, x, budget):
    """How many input rows one forward's autograd graph may hold within `budget` bytes (at least 1)."""
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        return max(1, int(budget // graph_bytes_per_row(model, x)))
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)


def search_step(model, params, inp, y, mode, rows, done):
    """One greedy step of the plain loop on `model`: (the copies' logits, d objective / d params), the
    gradients None where done(logits) says the search ends here (no backward then). The copies run one
    at a time (as the authors' loop), split further where a copy has more than `rows` rows (None: no
    limit). Where all of them fit in `rows`, their graphs are kept and one backward follows; else a
    forward without graph gives the logits and the objective's gradient with respect to them, then each
    piece is run again with its graph and backpropagated from its share of that gradient, one after the
    other, so that one piece's graph is alive at a time (peak memory of `rows` rows, one forward more)."""
    b = len(y)
    rows = rows or len(inp)
    pieces = inp.split(min(b, rows))
    if len(inp) <= rows:
        logits = torch.cat([model(p) for p in pieces])
        if done(logits.detach()):
            return logits.detach(), None
        return logits.detach(), _grads(objective(logits, y, mode), params)
    with torch.no_grad():
        logits = torch.cat([model(p) for p in pieces])
    if done(logits):
        return logits, None
    leaf = logits.requires_grad_()
    (dz,) = torch.autograd.grad(objective(leaf, y, mode), [leaf])
    total = None
    for p, g in zip(pieces, dz.split(len(pieces[0]))):
        grads = _grads(model(p), params, g)
        total = grads if total is None else [t.add_(d) for t, d in zip(total, grads)]
    return logits.detach(), total


def flip_sequential(model, units, x, y, max_units, n_eot=0, eot_noise=0.01, noise_key=(0, 0), mode="mean_logits",
                    rows=None):
    """The authors' greedy loop, plainly, one target at a time. x, y: the batch, target first;
    noise_key: (seed, target index) for the noise of each step; mode: the objective (OBJECTIVES);
    rows: the most input rows one forward's graph holds (search_step; None: no limit). Returns a
    FlipResult."""
    m = copy.deepcopy(model).eval().requires_grad_(True)
    params = [m.get_parameter(n) for n in units.grad_names]
    zeroed, b, label = [], len(y), int(y[0])
    done = lambda logits: target_prediction(logits, b) != label or len(zeroed) >= max_units
    with strict_fp32():
        for step in itertools.count():
            inp = step_input(x, n_eot, eot_noise, noise_key, step)
            logits, grads = search_step(m, params, inp, y, mode, rows, done)
            if grads is None:
                prediction = target_prediction(logits, b)
                return FlipResult(zeroed, prediction != label, prediction)
            u = _best(units.scores(m, grads), zeroed)
            units.zero_(m, u)
            zeroed.append(u)


def _near_tie(values, exclude=()):
    """Whether the top two of `values` (1-D; `exclude`d positions left out) are within TIE of the
    largest magnitude among them: where the batched path's rounding could order them otherwise."""
    if exclude:
        values = values.index_fill(0, torch.tensor(list(exclude), device=values.device), -torch.inf)
    top = values.topk(2).values
    scale = float(values[values.isfinite()].abs().max())
    return float(top[0] - top[1]) <= TIE * scale


def flip_batched(model, units, jobs, slots, max_units, n_eot=0, eot_noise=0.01, mode="mean_logits"):
    """flip_sequential for many targets, `slots` of them in one forward: each slot holds a target with its
    own batch, noise and zeroed units (its own copy of the parameters: per-target masks), run together by
    torch.func.vmap over the slots; a slot whose target finishes takes the next job. jobs: an iterator of
    (key, x, y, noise_key), all batches of one size, pulled as slots free up (it may look at what has
    finished so far). Yields (key, FlipResult) as targets finish, in that order.
    The same unit sequences as flip_sequential: vmap runs other kernels (grouped convolutions), which
    round otherwise, so a step whose top two scores, or whose target's top two mean logits, are within
    TIE of each other (relative) is redone by flip_sequential's own step on that target's parameters
    (`self.settled` counts them)."""
    flipper = _Batched(model, units, max_units, n_eot, eot_noise, mode)
    yield from flipper.run(jobs, slots)


class _Batched:
    def __init__(self, model, units, max_units, n_eot, eot_noise, mode):
        self.units, self.max_units, self.n_eot, self.eot_noise, self.mode = units, max_units, n_eot, eot_noise, mode
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.buffers = dict(self.model.named_buffers())
        self.plain = copy.deepcopy(self.model).requires_grad_(True)  # for the near-ties: flip_sequential's step
        self.settled = 0

    def _loss(self, params, inp, y):
        logits = functional_call(self.model, (params, self.buffers), (inp,))
        return objective(logits, y, self.mode), logits

    def _plain_step(self, params, inp, y):
        """flip_sequential's step on one target's parameters: (its logits, its scores)."""
        with torch.no_grad():
            for n, p in self.plain.named_parameters():
                p.copy_(params[n])
        plist = [self.plain.get_parameter(n) for n in self.units.grad_names]
        logits, grads = search_step(self.plain, plist, inp, y, self.mode, None, lambda z: False)
        return logits, self.units.scores(self.plain, grads)

    def run(self, jobs, slots):
        names = list(self.original)
        params = {n: p.unsqueeze(0).repeat((slots,) + (1,) * p.ndim) for n, p in self.original.items()}
        state = [None] * slots  # per slot: [key, x, y, noise_key, step, zeroed, the step's draws (a future)]
        step_fn = vmap(grad(self._loss, has_aux=True))
        scores_fn = vmap(self.units.scores_of)
        exhausted = False
        # The noise is drawn on the CPU (the same numbers on every device), one target's copies at a time;
        # a step's draws for all slots would keep the device waiting, so each slot's next draws are made in a
        # thread pool while the device computes the current step (they depend on nothing computed).
        with ThreadPoolExecutor(max_workers=min(slots, os.cpu_count() or 1)) as pool, strict_fp32():
            draw = lambda st: pool.submit(step_draw, st[1], self.n_eot, st[3], st[4])
            while True:
                for s in range(slots):  # fill the free slots
                    if state[s] is None and not exhausted:
                        job = next(jobs, None)
                        if job is None:
                            exhausted = True
                        else:
                            state[s] = [*job, 0, []]
                            state[s].append(draw(state[s]))
                            for n in names:
                                params[n][s].copy_(self.original[n])
                active = [s for s in range(slots) if state[s] is not None]
                if not active:
                    return
                inp = []
                for s in active:
                    st = state[s]
                    inp.append(eot_apply(st[1], st[6].result(), self.eot_noise))
                    st[4] += 1
                    st[6] = draw(st)  # the next step's, while this one computes
                inp, ys = torch.stack(inp), torch.stack([state[s][2] for s in active])
                if len(active) < slots:
                    idx = torch.tensor(active, device=inp.device)
                    live = {n: params[n].index_select(0, idx) for n in names}
                else:
                    live = params
                grads, logits = step_fn(live, inp, ys)
                scores = scores_fn(live, grads)
                for j, s in enumerate(active):
                    key, x, y, noise_key, step, zeroed, _ = state[s]
                    b, label = len(y), int(y[0])
                    z, sc = logits[j].detach(), scores[j]
                    tied = _near_tie(z.view(-1, b, z.shape[-1])[:, 0].mean(0))
                    if not tied and not (target_prediction(z, b) != label or len(zeroed) >= self.max_units):
                        tied = _near_tie(sc, zeroed)
                    if tied:  # rounding could decide: flip_sequential's own step
                        self.settled += 1
                        z, sc = self._plain_step({n: params[n][s] for n in names}, inp[j], y)
                    prediction = target_prediction(z, b)
                    if prediction != label or len(zeroed) >= self.max_units:
                        state[s] = None
                        yield key, FlipResult(zeroed, prediction != label, prediction)
                        continue
                    u = _best(sc, zeroed)
                    e, index = self.units.locate(u)
                    with torch.no_grad():
                        for n in e.names:
                            params[n][s][index] = 0
                    zeroed.append(u)


# ----------------------------------------------------------------------------- the experiment's choices

@torch.no_grad()
def refresh_batchnorm(model, data, batch_size):
    """What the authors' analysis script does before flipping: one train-mode pass over the training
    set, in order, which overwrites the BatchNorm running statistics (momentum updates); no parameter
    changes. The model is left in eval mode."""
    model.train()
    with strict_fp32():
        for idx in torch.arange(data.n_train, device=data.device).split(batch_size):
            model(data.batch(idx), index=idx)
    model.eval()


def target_kinds(data):
    """[(kind, mask)] of the targets: noisy = the memorized set (mislabeled; with memorized=atypical the
    atypical clean examples) and clean; with memorized=both, noisy (mislabeled), atypical (clean, the
    authors' `rare`) and clean (typical)."""
    if getattr(data, "memorized", "noisy") != "both":
        return [("noisy", data.noisy), ("clean", ~data.noisy)]
    return [(kind, data.kind == EXAMPLE_KINDS.index(k))
            for kind, k in (("noisy", "mislabeled"), ("atypical", "atypical"), ("clean", "typical"))]


def candidates(data, fits, seed):
    """{"noisy": [...], ("atypical": [...],) "clean": [...]} (target_kinds): the training examples of each
    kind that the model fits (predicts with their training label), in a seeded random order (targets are
    taken from the front)."""
    order = {}
    for kind, mask in target_kinds(data):
        pool = torch.nonzero((mask & fits).cpu()).flatten()
        order[kind] = pool[torch.randperm(len(pool), generator=generator(seed, "neuron_flipping", kind))].tolist()
    return order


def pick_targets(data, fits, n, seed):
    """The first n candidates of each kind, interleaved noisy, clean, noisy, ... so a partial run is
    balanced; the choice for n is a prefix of the choice for a larger n. Returns [(index, kind)]."""
    order = candidates(data, fits, seed)
    for kind, pool in order.items():
        if len(pool) < n:
            raise UserError(f"n_examples={n}, but only {len(pool)} {kind} training examples are predicted with "
                            f"their training label; pass --n_examples={len(pool)} or less")
    return [(i, kind) for pair in zip(order["noisy"][:n], order["clean"][:n]) for i, kind in zip(pair, ("noisy", "clean"))]


@torch.no_grad()
def margins(model, data, batch_size=1024):
    """Per training example, on `model` (eval mode, strict fp32, clean inputs): its margin, the logit of
    its training label minus the largest other logit (> 0: predicted with its training label)."""
    model.eval()
    out = []
    with strict_fp32():
        for idx in torch.arange(data.n_train, device=data.device).split(batch_size):
            logits = model(data.batch(idx), index=idx).float()
            label = data.y_train[idx]
            own = logits.gather(1, label[:, None])[:, 0]
            out.append(own - logits.scatter(1, label[:, None], -torch.inf).max(1).values)
    return torch.cat(out).cpu()


def nearest_on_margin(margin, value, pool, taken):
    """The candidate of `pool` (in its order) not in `taken` whose margin is nearest to `value` (the
    first in pool order on ties), or None where none is left."""
    free = [i for i in pool if i not in taken]
    if not free:
        return None
    gap = (margin[torch.tensor(free)] - value).abs()
    return free[int(gap.argmin())]  # argmin: the first of equal gaps


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
    it, the edited example itself left out. In strict fp32, like the search. An edit changes nothing
    before the first stage that holds a changed parameter, so the unedited model's stage outputs on
    the evaluation sets are cached once (the last stages first, within `budget` bytes) and an edited
    model runs only from there; a model without stages (common.models.stages) runs whole forwards."""

    def __init__(self, model, data, sets, budget=512 * 2 ** 20, batch_size=1024):
        self.data, self.sets, self.batch_size = data, sets, batch_size
        self.train_idx = torch.cat([sets["clean"], sets["noisy"]]).to(data.device)
        self.test_idx = sets["test"].to(data.device)
        self.n_clean = len(sets["clean"])
        model.eval()
        self.positions = stage_positions(model)
        parts = stages(model) or []
        n = len(self.train_idx) + len(self.test_idx)
        with torch.no_grad(), strict_fp32():
            h, sizes = next(self._inputs())[0][:1], []  # bytes per example of each stage's output
            for part in parts:
                h = part(h)
                sizes.append(h.numel() * h.element_size() * n)
            self.cache, used = {}, 0  # stage position k -> the output of stage k, in chunks
            for k in reversed(range(len(parts))):
                if used + sizes[k] > budget:
                    break
                used, self.cache[k] = used + sizes[k], []
            preds = []
            for x, idx in self._inputs():
                if parts:
                    h = x
                    for k, part in enumerate(parts):
                        h = part(h)
                        if k in self.cache:
                            self.cache[k].append(h)
                else:
                    h = model(x, index=idx)
                preds.append(h.argmax(1))
        self.before = torch.cat(preds)

    def _inputs(self):
        for split, idx in (("train", self.train_idx), ("test", self.test_idx)):
            for chunk in idx.split(self.batch_size):
                yield self.data.batch(chunk, split), (chunk if split == "train" else None)

    def predict(self, model, changed=None):
        """Predictions of `model` on the sets; it differs from the unedited model only in the parameters
        `changed` (full names; None: anywhere)."""
        if changed is not None and not changed:
            return self.before.clone()
        model.eval()
        parts = stages(model)
        start = 0
        if parts is not None and changed is not None and self.positions is not None:
            first = min(self.positions.get(n, 0) for n in changed)  # the first stage the edit changes
            start = max([k + 1 for k in self.cache if k < first], default=0)
        preds = []
        with torch.no_grad(), strict_fp32():
            if parts is None:
                for x, idx in self._inputs():
                    preds.append(model(x, index=idx).argmax(1))
            else:
                chunks = self.cache[start - 1] if start else (x for x, _ in self._inputs())
                for h in chunks:
                    for part in parts[start:]:
                        h = part(h)
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

    def __call__(self, model, changed=None, exclude=None):
        """(accuracies after the edit, drop from before it), the edited training example `exclude` left
        out; `changed`: the full names of the parameters the edit changed (None: anywhere)."""
        after = self.accuracies(self.predict(model, changed), exclude)
        before = self.accuracies(self.before, exclude)
        return after, {k: before[k] - after[k] for k in after}


def summarize(records, baseline, max_units):
    """Per kind (noisy, atypical, clean, clean_matched; those present): counts (not flipped counted as max_units: a lower bound), fraction
    flipped, layer groups of the zeroed units, and mean accuracy drop on the evaluation sets."""
    out = {}
    for kind in ("noisy", "atypical", "clean", "clean_matched"):
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
