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
copies of the whole batch, each copy's noise of norm eot_noise x the norm of the whole batch, and
    L = mean over copies of [ mean_j CE_j with the target's term multiplied by -|B| ]
      = mean over copies of [ -CE_t + sum_{j != t} CE_j / |B| ]
(the mean of the copies' objectives: the authors average the copies' gradients). n_eot = 0: one
clean copy. The target counts as flipped when the argmax of its logits averaged over the copies
differs from its training label. The score of a unit is the first-order decrease of L when it is
zeroed: w * dL/dw, summed over the filter for a channel unit; for a channel_out unit
sum over examples and positions of a_c * dL/da_c, a_c the silenced output channel (after the
BatchNorm), which equals gamma[c] dL/dgamma[c] + beta[c] dL/dbeta[c] (a_c = gamma xhat + beta).
Greedy: zero the best unit not yet zeroed, recompute, until the target flips or `max_units` units are
zeroed (then: not flipped).

Each step runs the copies one after the other (a forward and a backward per copy, the copies'
gradients averaged, as the authors): a copy's memory and cache footprint, not n_eot times it.

Two implementations, same answers:
- `flip_sequential`: the authors' loop written plainly (per step and copy: a forward and a full
  backward of the batch). The reference for the tests and the benchmark baseline.
- `Flipper`: the same decisions with less work. (1) A filter's score needs no weight gradient:
  sum_w w * dL/dw = sum over examples and positions of (out_c - bias_c) * dL/dout_c (the conv output
  is linear in its filter), so the backward skips the weight-gradient convolutions (and the first
  conv's whole backward); channel_out scores come from the BatchNorm's parameter gradients, which
  need no conv weight gradient either. (2) Without noise (n_eot = 0) zeroing a unit changes nothing
  before its stage: the forward restarts from the cached input of the first stage that holds it
  (`common.models.stages`; models without stages run whole forwards). Fresh noise at every step
  changes every layer's input, so with noise every step is a whole forward.
  The forward runs the same kernels on the same tensors as the reference, so the logits, the flip
  check and every score but the filter scores are bitwise the reference's. A filter score is the
  same sum of the products w * in * g in another order and carries a rounding tolerance
  (`filter_tolerance`, valid for fp32: see ROUNDOFF). Where the best unit is not ahead of a rival by
  more than their tolerances, the filter scores of the layers involved are recomputed as the
  reference computes them (the weight gradient of each copy by the same kernel: bitwise the
  reference's) and the choice is made again (`Flipper.exact_steps` counts such steps). Equality holds
  on one device with one thread count (kernels round differently across them; on CUDA only with
  deterministic algorithms).

Everything runs in eval mode (BatchNorm uses its running statistics, so examples do not interact), in
strict fp32 (no TF32, no autocast): a borderline example must not flip by rounding.
"""
import copy
import itertools
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import UserError
from .data import KINDS
from .models import layer_groups, root, stages
from .precision import strict_fp32
from .rng import generator

UNITS = ("channel", "channel_out", "weight")


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
        grad = dict(zip(self.grad_names, grads))
        return torch.cat([entry_scores(e, [model.get_parameter(n).detach() for n in e.names],
                                       [grad[n] for n in e.names]) for e in self.entries])


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

def objective(logits, y):
    """logits: one or more copies of the batch stacked copy-major (a multiple of len(y) rows); y: the
    batch's labels, target first. The mean over copies of the mean over the batch of the cross-entropy
    with the target's term multiplied by -len(y)."""
    b = len(y)
    ce = F.cross_entropy(logits.float(), y.repeat(len(logits) // b), reduction="none").view(-1, b)
    weight = torch.ones(b, device=ce.device)
    weight[0] = -b
    return (ce * weight).mean()


def target_prediction(logits):
    """The target's class from the logits of each copy of the batch (a list): the argmax of its logits
    (row 0) averaged over the copies."""
    return int(torch.stack([out[0] for out in logits]).mean(0).argmax())


def mean_over_copies(per_copy):
    """Per-copy lists of tensors -> their mean: summed in copy order, then divided (both implementations
    round the same way)."""
    total, n = None, 0
    for values in per_copy:
        total, n = (list(values) if total is None else [t + v for t, v in zip(total, values)]), n + 1
    return [t / n for t in total]


def eot_generator(seed, index, step):
    """The noise of greedy step `step` for target `index`: fresh at every step (as the authors), seeded."""
    return generator(seed, "neuron_flipping", "eot", index, step)


def eot_inputs(x, n_eot, eot_noise, gen):
    """The input of one step: x itself (n_eot = 0), or n_eot noised copies of the batch stacked
    copy-major; each copy's Gaussian noise has norm eot_noise * the norm of the whole batch x (the
    authors' l2_noise: one norm for the batch, not one per example). Drawn on the CPU (the same
    numbers on every device)."""
    if n_eot == 0:
        return x
    z = torch.randn((n_eot,) + tuple(x.shape), generator=gen).to(x.device)
    scale = eot_noise * x.norm() / z.flatten(1).norm(dim=1)
    noisy = x.unsqueeze(0) + z * scale[:, None, None, None, None]
    return noisy.flatten(0, 1).contiguous(memory_format=torch.channels_last)


def step_copies(x, n_eot, eot_noise, noise_key, step):
    """The copies of the batch that greedy step `step` runs: [x] without noise, else its n_eot noised
    copies. Each copy is a forward and a backward of its own (as the authors: their memory and
    cache footprint is a copy's, not n_eot times that)."""
    return list(eot_inputs(x, n_eot, eot_noise, eot_generator(*noise_key, step) if n_eot else None).split(len(x)))


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


def _reference_scores(model, units, copies, y):
    """One step of the reference: a forward per copy, the copies' gradients averaged, the scores.
    Returns (logits per copy, scores); `model`'s parameters must require gradients."""
    logits = [model(c) for c in copies]
    return logits, _reference_backward(model, units, logits, y)


def _reference_backward(model, units, logits, y):
    params = [model.get_parameter(n) for n in units.grad_names]
    grads = mean_over_copies(_grads(objective(out, y), params) for out in logits)
    return units.scores(model, grads)


def _grads(loss, inputs, retain=False):
    """d loss / d inputs; zeros for an input the loss does not use (e.g. a head unused in eval mode)."""
    grads = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def flip_sequential(model, units, x, y, max_units, n_eot=0, eot_noise=0.01, noise_key=(0, 0)):
    """The authors' greedy loop, plainly. x, y: the batch, target first; noise_key: (seed, target index)
    for the noise of each step. Returns a FlipResult."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    zeroed = []
    with strict_fp32():
        for step in itertools.count():
            logits = [m(c) for c in step_copies(x, n_eot, eot_noise, noise_key, step)]
            prediction = target_prediction(logits)
            if prediction != int(y[0]) or len(zeroed) >= max_units:
                return FlipResult(zeroed, prediction != int(y[0]), prediction)
            u = _best(_reference_backward(m, units, logits, y), zeroed)
            units.zero_(m, u)
            zeroed.append(u)


# Rounding of a filter score. Both paths evaluate the same sum T of the n products w * in * g (over
# examples, positions and filter taps), in different orders. Under the standard probabilistic model
# of rounding (independent, mean-zero errors; Higham & Mary 2019), any evaluation order of such a sum
# errs by at most lambda sqrt(n) u S with probability at least 1 - 2n exp(-lambda^2 / 2), u = 2^-24
# the fp32 unit roundoff and S the sum of |w * in * g|. With lambda = 8 that fails with probability
# below 1e-5 for n up to 1e9, whatever the kernels' blocking; the tolerance covers both paths:
# 16 sqrt(n) u S', where S' >= S is a Cauchy-Schwarz bound, cheap to compute:
# S <= ||W_c|| * sum over examples and positions of |g| * ||input patch||. A near-tie within the
# tolerance costs little: the reference's own scores of the layers involved (their weight gradients).
ROUNDOFF = 2.0 ** -24
LAMBDA = 8.0
KEEP_BYTES = 2 ** 30  # conv inputs and output gradients kept for settling near-ties (else: a whole reference step)
QUICK_MARGIN = 1e-4  # relative gap of the top two logits that rounding cannot close (Flipper._quick_prediction)


def _rows(t):
    """(N, C, H, W) -> (N * H * W, C): a view for channels-last tensors."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _window_sums(conv, t):
    """t: (N, G, H, W) -> (N, G, H', W'): the sums of t over the conv's kernel window at each of its output
    positions (the conv's stride, padding, padding mode and dilation), each channel on its own. One
    depthwise convolution with a kernel of ones over the N x G maps (many maps at once: far cheaper on a
    CPU than N maps of one channel)."""
    n, g = t.shape[:2]
    maps = t.contiguous().view(1, n * g, *t.shape[2:])
    ones = torch.ones((n * g, 1) + tuple(conv.kernel_size), device=t.device, dtype=t.dtype)
    if conv.padding_mode != "zeros":  # as Conv2d._conv_forward pads
        maps, padding = F.pad(maps, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    else:
        padding = conv.padding
    out = F.conv2d(maps, ones, None, conv.stride, padding, conv.dilation, n * g)
    return out.view(n, g, *out.shape[2:])


def filter_tolerance(conv, inp, grad):
    """Per output channel: 2 lambda sqrt(n) u S', the rounding tolerance of a filter score (see ROUNDOFF)."""
    w = conv.weight.detach()
    groups = conv.groups
    n = w[0].numel() * grad.numel() // grad.shape[1]  # products in a filter score: taps x output positions
    # the squared norm of every input patch (per group): the squares of the input summed over each group's
    # channels first, then over the kernel window -- the same sum as a convolution of in^2 with ones over
    # all of the group's channels, at a fraction of its cost
    square = torch.linalg.vector_norm(inp.detach().unflatten(1, (groups, -1)), dim=2).square_()  # (N, groups, H, W)
    patch = _rows(_window_sums(conv, square)).clamp_min_(0).sqrt_()  # (M, groups)
    g = _rows(grad).abs()  # (M, C)
    if groups == 1:
        weighted = patch[:, 0] @ g
    else:
        weighted = (g * patch.repeat_interleave(w.shape[0] // groups, dim=1)).sum(0)
    # S' is computed in fp32 too: by the same model of rounding each of its three sums (patches, positions,
    # the weight's norm; none longer than n) falls short of its exact value by a relative lambda sqrt(n) u
    # at most, and its few elementwise roundings (fewer than lambda, of u each) by no more than that again:
    # dividing by (1 - lambda sqrt(n) u)^4 keeps it above S
    short = LAMBDA * math.sqrt(n) * ROUNDOFF
    return 2 * short / (1 - short) ** 4 * w.flatten(1).norm(dim=1) * weighted


def _weight_grads(conv, inp, grad):
    """The conv's parameter gradients from its input and output gradient: the kernel the reference's
    backward runs (aten.convolution_backward, the same bias flag), so bitwise the reference's. None
    where the conv pads itself in another way (padding_mode, padding="same")."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    _, gw, gb = torch.ops.aten.convolution_backward(grad, inp, conv.weight, None, conv.stride, conv.padding,
                                                    conv.dilation, False, [0, 0], conv.groups,
                                                    [False, True, conv.bias is not None])
    return {"weight": gw, "bias": gb}


class Flipper:
    """flip_sequential's decisions with less work (see the module docstring). Reusable across targets."""

    def __init__(self, model, units, tolerance=filter_tolerance):
        self.units, self.tolerance = units, tolerance
        self.model = copy.deepcopy(model).eval()
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.exact = copy.deepcopy(model).eval()  # for an ambiguous step: the reference computation
        for p in self.exact.parameters():
            p.requires_grad_(True)
        self.stages = stages(self.model)
        positions = stage_positions(self.model)
        self.entry_stage = None if positions is None else [min(positions[n] for n in e.names) for e in units.entries]
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.param_entries = {}  # entry index -> its parameters, scored from their gradients (exact)
        self.conv_entries = {}   # entry index -> its conv, scored from the conv output (with a tolerance)
        for i, e in enumerate(units.entries):
            module = self.model.get_submodule(e.module)
            if e.kind != "element" and isinstance(module, nn.Conv2d):
                self.conv_entries[i] = module
                module.register_forward_hook(self._keep)
            else:
                self.param_entries[i] = [self.model.get_parameter(n).requires_grad_(True) for n in e.names]
        self.params = [p for ps in self.param_entries.values() for p in ps]
        self.unit_entry = torch.repeat_interleave(torch.arange(len(units.entries)),
                                                  torch.tensor([e.count for e in units.entries]))
        self.capture, self.outs, self.called = False, {}, set()
        # The conv inputs and output gradients kept at a step, per copy, live on until the next step's
        # copies replace them one by one: freed all at once, a CPU's allocator hands their memory back to
        # the system and the next step faults it in again, page by page (most of the fast path's extra time
        # on a CPU, measured); replaced one by one, it is reused. The memory in use is a step's, as before;
        # a search releases it when it ends (held across searches, it would cost the code in between).
        self.held = []
        self.steps = self.exact_steps = self.exact_layers = 0  # steps, steps with near-ties, layers re-scored

    def _keep(self, module, inputs, out):
        if self.capture:
            if not out.requires_grad:  # the first conv: nothing before it needs a gradient
                out.requires_grad_(True)
            # a conv called twice in one forward: its output misses a call's share (-> the reference)
            self.outs[module] = None if module in self.called else (inputs[0], out, out._version)
            self.called.add(module)

    def _forward(self, inp, cache=None, start=0):
        """The model's logits on `inp`, the conv outputs kept; with a stage cache, from stage `start`
        (the outputs of the convs before it stay from the forward that filled the cache)."""
        self.capture, self.called = True, set()
        try:
            if cache is None:
                self.outs = {}
                return self.model(inp)
            h = inp if start == 0 else cache[start - 1]
            for i in range(start, len(self.stages)):
                h = cache[i] = self.stages[i](h)
            return h
        finally:
            self.capture = False

    def _quick_prediction(self, copies):
        """The target's prediction from a forward of its own row of each copy (n_copies inputs instead
        of the whole batch), or None where its top two averaged logits are within QUICK_MARGIN of each
        other. A row's logits do not depend on the other rows of its batch (eval mode); a kernel whose
        rounding did depend on the batch size would move them by rounding only, far inside the margin."""
        with torch.no_grad():
            rows = torch.cat([c[:1] for c in copies]).contiguous(memory_format=torch.channels_last)
            mean = self.model(rows).mean(0)
        top = mean.topk(2).values
        return int(mean.argmax()) if float(top[0] - top[1]) > QUICK_MARGIN * float(top.abs().max()) else None

    def _copy_pass(self, copy_input, y, cache, start, retain):
        """Forward and backward of one copy of the batch: (its logits, its part) with part = (parameter
        gradients, {conv entry: fast filter scores}, {conv entry: their tolerances}, {conv entry: (conv
        input, d objective / d conv output)}), or part None where a conv output cannot be used (a conv
        called twice in a forward, or its output changed in place)."""
        out = self._forward(copy_input, cache, start)
        outputs = dict(self.outs)
        convs = [(i, m) for i, m in self.conv_entries.items() if m in outputs]  # a conv not run scores 0
        if any(outputs[m] is None or outputs[m][1]._version != outputs[m][2] for _, m in convs):
            return out.detach(), None
        grads = _grads(objective(out, y), self.params + [outputs[m][1] for _, m in convs], retain)
        scores, tols, kept = {}, {}, {}
        for (i, m), g in zip(convs, grads[len(self.params):]):
            inp, o, _ = outputs[m]
            o = o.detach()
            if self.units.entries[i].kind == "channel" and m.bias is not None:
                o = o - m.bias.detach()[:, None, None]  # the filter's part of the output
            scores[i] = (_rows(o) * _rows(g)).sum(0)
            tols[i] = self.tolerance(m, inp, g)
            kept[i] = (inp.detach(), g)
        return out.detach(), (grads[:len(self.params)], scores, tols, kept)

    def _combine(self, parts):
        """(scores, tolerances, kept) in unit order from the copies' parts (tolerance 0: bitwise the
        reference's); kept: per copy {conv entry: (input, output gradient)}, or None where keeping them
        for every copy would take more than KEEP_BYTES."""
        grads = mean_over_copies(p[0] for p in parts) if self.params else []
        device = parts[0][0][0].device if self.params else next(iter(parts[0][1].values())).device
        scores = [torch.zeros(e.count, device=device) for e in self.units.entries]
        tols = [torch.zeros(e.count, device=device) for e in self.units.entries]
        k = 0
        for i, ps in self.param_entries.items():
            scores[i] = entry_scores(self.units.entries[i], [p.detach() for p in ps], grads[k:k + len(ps)])
            k += len(ps)
        convs = list(parts[0][1])
        if convs:  # the copies' sums are one sum of n_copies times the terms: sqrt(n_copies) on the mean
            widen = math.sqrt(len(parts))
            for i, s, t in zip(convs, mean_over_copies([p[1][i] for i in convs] for p in parts),
                               mean_over_copies([p[2][i] for i in convs] for p in parts)):
                scores[i], tols[i] = s, t * widen
        kept = [p[3] for p in parts]
        size = sum(t.numel() * t.element_size() for k in kept for pair in k.values() for t in pair)
        return torch.cat(scores), torch.cat(tols), (kept if size <= KEEP_BYTES else None)

    def _exact_scores(self, i, kept):
        """The reference's scores of conv entry i, bitwise: each copy's weight gradient by the reference's
        kernel, averaged over the copies as the reference does, times the weight (None: not available)."""
        m, e = self.conv_entries[i], self.units.entries[i]
        per_copy = []
        if kept is None:
            return None
        for k in kept:
            grads = _weight_grads(m, *k[i])
            if grads is None:
                return None
            per_copy.append([grads[name.rsplit(".", 1)[1]] for name in e.names])
        return entry_scores(e, [self.model.get_parameter(n).detach() for n in e.names], mean_over_copies(per_copy))

    def _choose(self, scores, tols, kept, zeroed):
        """The reference's choice: the best unit, once no rounding within the tolerances could put another
        unit ahead of it (exact ties among exact scores go to the first unit in both implementations).
        Near-ties are settled with the reference's own scores of the conv layers involved. None where
        those are not available."""
        settled = False
        while True:
            u = _best(scores, zeroed)
            rival = scores + tols >= scores[u] - tols[u]
            rival[u] = False
            if zeroed:
                rival[torch.tensor(zeroed, device=rival.device)] = False
            involved = set(self.unit_entry[(rival & (tols > 0)).cpu()].tolist())
            if tols[u] > 0 and bool(rival.any()):
                involved.add(self.units.entry_index(u))
            if not involved:
                self.exact_steps += settled
                return u
            for i in involved:
                exact = self._exact_scores(i, kept)
                if exact is None:
                    return None
                e = self.units.entries[i]
                scores[e.offset:e.offset + e.count], tols[e.offset:e.offset + e.count] = exact, 0
            self.exact_layers += len(involved)
            settled = True

    def flip(self, x, y, max_units, n_eot=0, eot_noise=0.01, noise_key=(0, 0)):
        """Same arguments and answer as flip_sequential on the model given at construction."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.original[n])
        reuse = n_eot == 0 and self.stages is not None  # fresh noise changes every layer's input
        cache, start, zeroed = ([None] * len(self.stages) if reuse else None), 0, []
        self.outs = {}
        try:
            with strict_fp32():
                for step in itertools.count():
                    copies = step_copies(x, n_eot, eot_noise, noise_key, step)
                    quick = self._quick_prediction(copies)  # the step's flip check, from the target's rows alone
                    if quick is not None and (quick != int(y[0]) or len(zeroed) >= max_units):
                        return FlipResult(zeroed, quick != int(y[0]), quick)
                    # each copy's forward and backward, one after the other (one copy's memory at a time)
                    logits, parts = [], []
                    for k, c in enumerate(copies):
                        if k < len(self.held):  # the last step's copy k, released just before its successor
                            self.held[k] = None
                        out, part = self._copy_pass(c, y, cache, start, retain=reuse)  # reuse: keep the prefix graph
                        logits.append(out)
                        parts.append(part)
                    self.held = [part and part[3] for part in parts]
                    prediction = target_prediction(logits)  # the reference's flip check, bitwise
                    if prediction != int(y[0]) or len(zeroed) >= max_units:
                        return FlipResult(zeroed, prediction != int(y[0]), prediction)
                    found = None if None in parts else self._combine(parts)
                    u = None if found is None else self._choose(*found, zeroed)
                    found = None  # self.held alone keeps the copies' conv inputs and gradients
                    self.steps += 1
                    if u is None:  # conv outputs not usable: the reference computation, whole
                        self.exact.load_state_dict(self.model.state_dict())
                        u = _best(_reference_scores(self.exact, self.units, copies, y)[1], zeroed)
                        self.exact_steps += 1
                    self.units.zero_(self.model, u)
                    zeroed.append(u)
                    if reuse:  # the stages before the unit's are unchanged
                        start = self.entry_stage[self.units.entry_index(u)]
        finally:
            self.capture, self.outs, self.held = False, {}, []


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
    return [(kind, data.kind == KINDS.index(k)) for kind, k in (("noisy", "mislabeled"), ("atypical", "atypical"),
                                                               ("clean", "typical"))]


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
    """Per kind (noisy, atypical, clean; those present): counts (not flipped counted as max_units: a lower bound), fraction
    flipped, layer groups of the zeroed units, and mean accuracy drop on the evaluation sets."""
    out = {}
    for kind in ("noisy", "atypical", "clean"):
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
