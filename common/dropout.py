"""Example-tied dropout (Maini et al. 2023; docs/protocol.md, experiment 5) and standard dropout (the baseline).

ExampleTiedDropout splits a layer's C channels into generalization channels (the first
floor(p_gen * C), always on) and memorization channels. In training, example i keeps only its own
subset of memorization channels, each kept with probability p_mem; the subset is a pure function of
(seed, layer, i), whole channels shared over spatial positions (or tokens). Nothing is stored: the
bits come from an integer hash of (layer salt, index, channel) computed on the fly for the batch,
so there are no parameters, no buffers, no state_dict entries (checkpoints and layer groups are the
same as without dropout) and zero mask memory, for any dataset size.

Evaluation modes (`set_mode`, used when the model is in eval mode):
  tied  the example's own training mask (needs its index): were the noisy examples memorized?
  keep  all channels, memorization channels scaled by p_mem (their expected value in training)
  drop  memorization channels zeroed; generalization channels x drop_scale: (p_gen + p_mem) / p_gen
        with `drop_rescale` (the default, as the authors' code), 1 without it (as the method's
        description); `drop_scaling` switches an existing model between the two (no retraining)

The negative control of the drop (RandomChannelDrop, random_drop_factory): in a model trained without
dropout, as many channels as the drop zeroes, chosen at random, zeroed at the same places.

Models take these modules through `common.models.build_model(..., dropout=factory)`, where
`factory(layer_name, channels, channel_dim)` returns the module for one layer. The zoo builds them
into its blocks; any other model (torchvision, a user's factory), or a zoo model given other
places, gets them from `place`: after chosen modules, by forward hooks, so the model's code, its
state_dict keys and its layer groups stay as they are (see `place` and docs/own_model.md).
"""
import contextlib
import copy
import fnmatch
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import UserError
from .evaluation import predict, split_accuracy
from .rng import derive_seed

MODES = ("tied", "keep", "drop")
DROP_SCALINGS = {"rescaled": True, "unscaled": False}  # the drop mode's scalings: name -> drop_rescale, authors' first
_M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- integer hashing
# All arithmetic stays below 2**63 in int64 (no overflow, so it is exact and the same on every
# device): values are 32-bit, and a 32-bit product is split into two 16-bit halves.

def _mul32(x, m):
    """(x * m) mod 2**32 for int64 tensors x in [0, 2**32) and a 32-bit constant m."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x):
    """A 32-bit integer mixer (Wellons' lowbias32 family) on int64 tensors in [0, 2**32); a bijection."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


# ----------------------------------------------------------------------------- the modules

def _view(m, x, channel_dim):
    """Reshape a (B, C) or (1, C) mask to broadcast over x along `channel_dim` (1 for NCHW, -1 for tokens)."""
    if channel_dim == 1:
        return m.view(m.shape[0], m.shape[1], *([1] * (x.dim() - 2)))
    return m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1])


def n_generalization(p_gen, channels):
    """The number of generalization channels of a layer: floor(p_gen * C)."""
    return int(math.floor(p_gen * channels + 1e-9))  # 0.29 * 100 is 28.99999...: still 29


class ExampleTiedDropout(nn.Module):
    """Example-tied dropout over whole channels; no parameters, no buffers, masks hashed on the fly."""
    wants_index = True  # Net.forward hands it the batch's example indices

    def __init__(self, channels, p_gen, p_mem, seed, layer, channel_dim=1, drop_rescale=True):
        super().__init__()
        if not (0 < p_gen < 1 and 0 < p_mem < 1):
            raise ValueError(f"p_gen={p_gen} and p_mem={p_mem} must both be in (0, 1)")
        self.channels, self.p_gen, self.p_mem, self.layer = channels, p_gen, p_mem, layer
        self.n_gen = n_generalization(p_gen, channels)
        self.channel_dim = channel_dim
        self.drop_rescale = drop_rescale  # evaluation only (drop mode): training is the same either way
        self.mode = "keep"  # eval mode; "keep" works for any input, "tied" needs training indices
        self.index = None
        salt = derive_seed(seed, "example_tied_dropout", layer)
        self.salt_example, self.salt_channel = salt & _M32, (salt >> 32) & _M32
        self.threshold = int(round(p_mem * 2 ** 32))  # keep a channel when its hash < threshold

    @property
    def drop_scale(self):
        return drop_factor(self.p_gen, self.p_mem, self.drop_rescale)

    def extra_repr(self):
        return (f"{self.layer!r}, channels={self.channels} (generalization {self.n_gen}), p_mem={self.p_mem}, "
                f"mode={self.mode!r}, drop_rescale={self.drop_rescale}")

    def memorization_mask(self, index):
        """(B, C - n_gen) bool: which memorization channels each example keeps; a function of (seed, layer, index)."""
        index = torch.as_tensor(index).long()
        key = hash32((index & _M32) ^ self.salt_example)  # one key per example (a bijection of its index)
        ch = hash32(torch.arange(self.n_gen, self.channels, device=index.device) ^ self.salt_channel)
        return hash32(key[:, None] ^ ch[None, :]) < self.threshold

    def mask(self, index):
        """(B, C) bool training mask: generalization channels on, then the example's memorization subset."""
        mem = self.memorization_mask(index)
        return torch.cat([mem.new_ones(len(mem), self.n_gen), mem], dim=1)

    def mode_scale(self, mode, device, dtype):
        """(1, C) multipliers of the index-free modes: keep (memorization x p_mem) and drop (memorization x 0)."""
        gen, mem = (1.0, self.p_mem) if mode == "keep" else (self.drop_scale, 0.0)
        s = torch.full((1, self.channels), mem, device=device, dtype=dtype)
        s[:, :self.n_gen] = gen
        return s

    def forward(self, x):
        mode = "tied" if self.training else self.mode
        if mode == "tied":
            index = self.index
            if index is None:
                raise UserError(f"example-tied dropout ({self.layer}) in {'training' if self.training else 'tied'} "
                                f"mode needs the examples' training indices (model(x, index=idx)); evaluate "
                                f"inputs without an index (e.g. the test set) in 'keep' or 'drop' mode")
            if len(index) != x.shape[0]:
                raise ValueError(f"{len(index)} indices for a batch of {x.shape[0]}")
            m = self.mask(index.to(x.device)).to(x.dtype)
        else:
            m = self.mode_scale(mode, x.device, x.dtype)
        return x * _view(m, x, self.channel_dim)


class StandardDropout(nn.Module):
    """Standard (inverted, unit-wise) dropout with rate p: the matched-rate baseline, as the authors'
    StandardDropout. Fresh masks every step from the torch RNG, which the training loop seeds per
    (model_seed, epoch); identity in eval mode. (Dropping whole channels at the matched rate 0.48 (p_gen 0.4)
    after every block did not train at these widths: loss 2.17 after 20 epochs on the tiny run.)"""

    def __init__(self, p):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout rate {p} must be in [0, 1)")
        self.p = p

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class RandomChannelDrop(nn.Module):
    """The drop mode's negative control, for a model trained without dropout: as many channels as the
    drop zeroes (C - floor(p_gen * C)), chosen at random (a function of (seed, layer)), zeroed, the
    others multiplied by the drop's factor (drop_rescale as in ExampleTiedDropout). In training and
    evaluation alike; no parameters, its channel choice a non-persistent buffer (state_dict unchanged)."""

    def __init__(self, channels, p_gen, p_mem, seed, layer, channel_dim=1, drop_rescale=True):
        super().__init__()
        self.channels, self.p_gen, self.p_mem, self.layer = channels, p_gen, p_mem, layer
        self.channel_dim, self.drop_rescale = channel_dim, drop_rescale
        g = torch.Generator().manual_seed(derive_seed(seed, "random_channel_drop", layer))
        kept = torch.zeros(channels, dtype=torch.bool)
        kept[torch.randperm(channels, generator=g)[:n_generalization(p_gen, channels)]] = True
        self.register_buffer("kept", kept, persistent=False)

    def extra_repr(self):
        return f"{self.layer!r}, channels={self.channels} (kept {int(self.kept.sum())}), drop_rescale={self.drop_rescale}"

    def forward(self, x):
        m = self.kept.to(x.dtype) * drop_factor(self.p_gen, self.p_mem, self.drop_rescale)
        return x * _view(m[None], x, self.channel_dim)


# ----------------------------------------------------------------------------- factories and helpers

def drop_factor(p_gen, p_mem, rescale):
    """The drop mode's multiplier of the generalization channels: the authors' test-time factor
    (p_gen + p_mem) / p_gen when rescaling, else 1. ((p_gen + (1 - p_gen) * p_mem) / p_gen would be
    the exact expected mass; the authors' code used this one.)"""
    return (p_gen + p_mem) / p_gen if rescale else 1.0


def scaling_name(rescale):
    """'rescaled' | 'unscaled': the key of a drop_rescale value in DROP_SCALINGS and in the results."""
    return next(name for name, r in DROP_SCALINGS.items() if r == bool(rescale))


def etd_factory(p_gen, p_mem, seed, drop_rescale=True):
    """`dropout=` argument of build_model/model_for: one ExampleTiedDropout per wired layer."""
    def make(layer, channels, channel_dim=1):
        return ExampleTiedDropout(channels, p_gen, p_mem, seed, layer, channel_dim, drop_rescale)
    return make


def random_drop_factory(p_gen, p_mem, seed, drop_rescale=True):
    """`dropout=` argument for the negative control: RandomChannelDrop at every wired layer."""
    def make(layer, channels, channel_dim=1):
        return RandomChannelDrop(channels, p_gen, p_mem, seed, layer, channel_dim, drop_rescale)
    return make


def standard_dropout_factory(p):
    """`dropout=` argument for the standard-dropout baseline."""
    def make(layer, channels, channel_dim=1):
        return StandardDropout(p)
    return make


def matched_rate(p_gen, p_mem):
    """The expected fraction of channels example-tied dropout drops in training."""
    return (1 - p_gen) * (1 - p_mem)


def etd_modules(model):
    return [m for m in model.modules() if isinstance(m, ExampleTiedDropout)]


def set_mode(model, mode):
    """Set the evaluation mode of every ExampleTiedDropout in `model`; returns how many there are."""
    if mode not in MODES:
        raise ValueError(f"unknown example-tied dropout mode {mode!r}; valid: {', '.join(MODES)}")
    mods = etd_modules(model)
    for m in mods:
        m.mode = mode
    return len(mods)


@contextlib.contextmanager
def mode(model, mode_name):
    """`with dropout.mode(model, "drop"): ...` -- the previous modes are restored afterwards."""
    mods = etd_modules(model)
    old = [m.mode for m in mods]
    set_mode(model, mode_name)
    try:
        yield model
    finally:
        for m, o in zip(mods, old):
            m.mode = o


@contextlib.contextmanager
def drop_scaling(model, rescale):
    """`with dropout.drop_scaling(model, False): ...` -- drop mode with (True) or without the authors'
    rescaling of the generalization channels (the negative control's RandomChannelDrop too); the
    previous settings are restored afterwards."""
    mods = [m for m in model.modules() if isinstance(m, (ExampleTiedDropout, RandomChannelDrop))]
    old = [m.drop_rescale for m in mods]
    for m in mods:
        m.drop_rescale = rescale
    try:
        yield model
    finally:
        for m, o in zip(mods, old):
            m.drop_rescale = o


def mask_memory(model, example_shape, n_examples):
    """Per dropout layer: channels, activation shape and the bytes a mask table would take for
    `n_examples`: ours (0: hashed on the fly), one bit per (example, channel), and the authors' dense
    float32 N x C x H x W table. Shapes come from one forward pass of a single zero input."""
    shapes, hooks = {}, []
    for m in etd_modules(model):
        hooks.append(m.register_forward_hook(lambda mod, inp, out: shapes.__setitem__(mod.layer, tuple(out.shape[1:]))))
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), mode(model, "keep"):
            model(torch.zeros(1, *example_shape, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    rows = []
    for m in etd_modules(model):
        shape = shapes[m.layer]
        rows.append({"layer": m.layer, "channels": m.channels, "activation": list(shape),
                     "stored_bytes": 0, "packed_bits_bytes": n_examples * math.ceil(m.channels / 8),
                     "dense_float_bytes": 4 * n_examples * math.prod(shape)})
    return rows


@torch.no_grad()
def recalibrate_batchnorm(model, data, batch_size=512):
    """A copy of a standard-dropout model whose BatchNorm running statistics are re-estimated on the
    training inputs with dropout off. (The statistics gathered in training include the variance that
    dropout adds; at evaluation, without dropout, they no longer fit: the "variance shift".)"""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, StandardDropout):
            m.p = 0.0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the pass
    model.train()
    for idx in torch.arange(data.n_train, device=data.device).split(batch_size):
        model(data.batch(idx), index=idx)
    return model.eval()


def evaluate(model, data, mode_name, amp=True):
    """Accuracies of `model` with its example-tied dropout in `mode_name` (any model: modes only
    touch ETD modules). Returns (accuracies, train predictions); tied mode has no test accuracy
    (test inputs have no training index), so its "test" and "gap" are None.

    gap = train - test: accuracy on all training examples w.r.t. the labels trained on, minus test."""
    with mode(model, mode_name):
        train_pred = predict(model, data, "train", amp=amp)
        test_pred = None if mode_name == "tied" else predict(model, data, "test", amp=amp)
    if test_pred is None:
        acc = split_accuracy(train_pred, data.y_test, data)  # test column replaced below
        acc["test"] = None
    else:
        acc = split_accuracy(train_pred, test_pred, data)
    acc["gap"] = None if acc["test"] is None else acc["train"] - acc["test"]
    return acc, train_pred


# ----------------------------------------------------------------------------- placing dropout in any model

AFTER_AUTO = "auto"
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh)
PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)  # skipped when looking for the calls in a row


def check_after(value):
    """The config check of a `dropout_after` knob: "auto" or a non-empty list of names / patterns."""
    if value == AFTER_AUTO or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value)):
        return None
    return (f"dropout_after={value!r} must be 'auto' or a list of module type names or module-name patterns, "
            f"e.g. --dropout_after=['ReLU'] or --dropout_after=['layer*.0.relu']")


def after_tag(after):
    """A short filesystem-safe name of a `dropout_after` value, for variant directories."""
    return "after-" + re.sub(r"[^A-Za-z0-9_.-]", "_", after if isinstance(after, str) else "+".join(after))[:60]


class _After(nn.Module):
    """A forward hook: dropout on the output of chosen calls of one module (call k of n per forward)."""

    def __init__(self, drops, n_calls):
        super().__init__()
        self.drops = nn.ModuleDict({str(k): d for k, d in drops.items()})
        self.n_calls, self.calls = n_calls, 0

    def hook(self, module, inputs, output):
        k = str(self.calls % self.n_calls)  # modulo: a module run once per forward needs no reset
        self.calls += 1
        return self.drops[k](output) if k in self.drops else output


class _Placed(nn.Module):
    """The dropout modules placed in a model (no tensors: state_dict and layer groups are unchanged)."""

    def __init__(self):
        super().__init__()
        self.after = nn.ModuleDict()

    def reset(self, module, args):
        """Forward pre-hook of the model: call counters start at 0 with every forward."""
        for a in self.after.values():
            a.calls = 0


def trace(model, example_shape, top=None):
    """The module calls of one forward of a batch of 2 zero inputs (eval mode, nothing changed):
    [(path below `top`, the model's root (default: the model), module, call number of that module,
    output shape or None)] in the order the calls finish (a module after the modules it contains)."""
    top = model if top is None else top
    calls, count, hooks = [], {}, []

    def record(path):
        def hook(module, inputs, output):
            k = count[id(module)] = count.get(id(module), -1) + 1
            calls.append((path, module, k, tuple(output.shape) if isinstance(output, torch.Tensor) else None))
        return hook

    for path, m in top.named_modules():
        if path:
            hooks.append(m.register_forward_hook(record(path)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *example_shape, device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return calls


def _auto_positions(calls):
    """Default places, in the order the calls run: after the activation of every conv block
    (Conv2d + norm + activation calls in a row; in a model without such a triple, Conv2d +
    activation), and on the hidden units of every transformer MLP (Linear + activation on tokens or
    channels-last maps, 3-D or more, features last); a model with neither: the hidden units of its
    MLPs (Linear + activation, 2-D)."""
    leaves = [c for c in calls if not any(True for _ in c[1].children()) and not isinstance(c[1], PASS_THROUGH)]
    conv_norm, conv, tokens, flat = [], [], [], []
    for i, (path, m, k, shape) in enumerate(leaves):
        if not isinstance(m, ACTIVATIONS) or shape is None or i == 0:
            continue
        prev, prev2 = leaves[i - 1][1], leaves[i - 2][1] if i >= 2 else None
        if len(shape) == 4 and isinstance(prev, NORMS) and isinstance(prev2, nn.Conv2d):
            conv_norm.append((i, (path, m, k, shape, 1)))
        elif len(shape) == 4 and isinstance(prev, nn.Conv2d):
            conv.append((i, (path, m, k, shape, 1)))
        elif len(shape) >= 3 and isinstance(prev, nn.Linear):  # tokens (B, N, D), or channels-last maps
            tokens.append((i, (path, m, k, shape, -1)))
        elif len(shape) == 2 and isinstance(prev, nn.Linear):
            flat.append((i, (path, m, k, shape, 1)))
    return [c for _, c in sorted((conv_norm or conv) + tokens or flat, key=lambda x: x[0])]


def _named_positions(calls, after):
    out = []
    for pattern in after:
        hit = [c for c in calls if type(c[1]).__name__ == pattern or fnmatch.fnmatchcase(c[0], pattern)]
        if not hit:
            raise UserError(f"dropout_after: {pattern!r} matches no module type or module name of the model; give "
                            f"a class name (e.g. 'ReLU') or a name pattern below the model (e.g. '{calls[0][0]}')")
        for path, m, k, shape in hit:
            if shape is None or len(shape) < 2:
                raise UserError(f"dropout_after: cannot put dropout after {path} ({type(m).__name__}): its output is "
                                f"{'not a tensor' if shape is None else f'of shape {shape}'}; choose a module whose "
                                f"output is (batch, channels, ...) or (batch, tokens, features)")
            out.append((path, m, k, shape, -1 if len(shape) == 3 else 1))
    return out


def place(model, factory, after=AFTER_AUTO, example_shape=None, top=None):
    """Put `factory(layer_name, channels, channel_dim)` after modules of `model`, in place, by forward
    hooks; returns the placed layer names. `after`: "auto" (see _auto_positions) or a list of module
    class names (e.g. "ReLU") and module-name patterns below `top`, the model's root (common.models.root;
    default: the model itself) (fnmatch, e.g. "layer*.1.relu"); every call of a chosen module gets its
    own dropout layer, named by the module's path (and "#k" for the k-th call of a module run more than
    once). Channels are dim 1, or the last dim of a 3-D output (tokens). `example_shape`: (C, H, W) of
    one input. (The root comes from the caller: common.models imports this module, not the reverse.)"""
    problem = check_after(after)
    if problem:
        raise UserError(problem)
    calls = trace(model, example_shape, top)
    positions = _auto_positions(calls) if after == AFTER_AUTO else _named_positions(calls, after)
    if not positions:
        raise UserError("dropout_after='auto' found no place for dropout in this model (no Conv2d [+ norm] + "
                        "activation module, no Linear + activation module); name the modules with "
                        "--dropout_after=[...] (class names or module-name patterns), see docs/own_model.md")
    n_calls = {}
    for path, m, k, _ in calls:
        n_calls[id(m)] = max(n_calls.get(id(m), 0), k + 1)
    by_module, names = {}, []
    for path, m, k, shape, dim in positions:
        name = path if n_calls[id(m)] == 1 else f"{path}#{k}"
        if name in names:
            continue  # matched twice (by type and by name)
        names.append(name)
        by_module.setdefault(id(m), (path, m, {}))[2][k] = factory(name, shape[dim], dim)
    placed = getattr(model, "dropouts", None)
    if placed is None:
        placed = model.dropouts = _Placed()
        model.register_forward_pre_hook(placed.reset)
    for path, m, drops in by_module.values():
        a = _After(drops, n_calls[id(m)])
        placed.after[str(len(placed.after))] = a
        m.register_forward_hook(a.hook)
    return names
