"""Layer rewinding mechanics: put one layer group of a trained model back to an earlier checkpoint, in place.

One model stays on the device. `Rewinder` keeps a copy of the final tensors of every group and the
rewind checkpoints' tensors of those groups (each checkpoint read once); `rewound(group, epoch)`
copies the checkpoint's tensors into the model's own parameter and buffer storage (nothing else is
touched, nothing is re-allocated) and copies the final ones back on exit, so the model is
bit-identical to the final model between rewinds.

`rewind_sweep` evaluates every (group, epoch) pair. Rewinding a group leaves every layer before it
unchanged, so where the model is a plain sequence of stages (`common.models.stages`), each batch's
activations entering the stage that holds the group are computed once with the final weights, and
only the rest of the network runs per rewind epoch: the same modules on the same tensors as
`model(x)`, hence the same predictions as common.evaluation.predict (bench/bench_layer_rewinding.py).
Models whose forward is not such a sequence (torchvision, the user's own) get one whole forward per
(group, epoch) instead, with the same answers.

BatchNorm statistics of the rewound group (BN_MODES): `final` keeps the final model's (parameters
only, as the authors did); `recompute` re-estimates them on the training images for the network the
rewound group now sits in (final layers before it); `checkpoint` takes the checkpoint's, with its weights.

Epoch 0 is the checkpoint saved at initialization; epoch e the one saved after e epochs.

Under bf16 autocast every rewind happens outside an autocast region and each forward opens its own:
autocast keeps the bf16 copy of each weight for the life of a region, so rewinds inside one region
computed with the first rewind's weights (results before this fix: docs/results/h100,
docs/results/fashion_h100).
"""
import contextlib

import torch
from torch import nn

from .cli import UserError, progress
from .evaluation import predict, split_accuracy
from .models import group_keys, layer_groups, stages
from .precision import autocast

BN_MODES = ("final", "recompute", "checkpoint")  # "final" first: the authors' way

# Fractions of training at which the automatic rewind points sit (besides 0 and the last-but-one).
AUTO_FRACTIONS = (0.1, 0.25, 0.5, 0.75)


def auto_rewind_epochs(epochs):
    """Initialization, 10/25/50/75% of training and the last-but-one epoch, e.g. 20 epochs ->
    [0, 2, 5, 10, 15, 19], 50 -> [0, 5, 13, 25, 38, 49], 100 -> [0, 10, 25, 50, 75, 99]."""
    points = {0, epochs - 1, *(int(f * epochs + 0.5) for f in AUTO_FRACTIONS)}
    return sorted(e for e in points if 0 <= e < epochs)


def check_rewind_epochs(value, epochs):
    """None (auto) or a non-empty list of epochs in 0..epochs-1: the error text, or None when valid."""
    if value is None:
        return None
    example = f"--rewind_epochs={auto_rewind_epochs(epochs)}".replace(" ", "")
    if not isinstance(value, (list, tuple)) or not value:
        return (f"rewind_epochs={value!r} must be a non-empty list of checkpoint epochs (0 = initialization) "
                f"or None for the automatic choice; e.g. {example}")
    bad = [e for e in value if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < epochs]
    if bad:
        return (f"rewind_epochs has {bad[0]!r}, not an epoch in 0..{epochs - 1} (0 = initialization, "
                f"{epochs - 1} = last-but-one of epochs={epochs}); e.g. {example}")
    return None


def resolve_rewind_epochs(value, epochs):
    """The sorted, de-duplicated rewind epochs: `value` or, when None, auto_rewind_epochs(epochs)."""
    problem = check_rewind_epochs(value, epochs)
    if problem:
        raise UserError(problem)
    return auto_rewind_epochs(epochs) if value is None else sorted(set(value))


def rewind_keys(model, bn_stats):
    """Ordered {group: [state_dict keys a rewind replaces]}: the group's parameters and, unless
    bn_stats == "final", its buffers too (BatchNorm running_mean, running_var, num_batches_tracked)."""
    params = {name for name, _ in model.named_parameters()}
    return {g: [k for k in keys if bn_stats != "final" or k in params] for g, keys in group_keys(model).items()}


def _epoch_list(epochs):
    """Saved epochs compactly: '0..20' when contiguous, else the list."""
    epochs = sorted(epochs)
    if epochs and epochs == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 2:
        return f"{epochs[0]}..{epochs[-1]}"
    return str(epochs)


def load_rewind_states(run, epochs, keys, model, device):
    """{epoch: {key: tensor on `device`}} for the rewound keys, each checkpoint loaded once.

    A missing checkpoint, or one whose tensors do not fit the model, is a UserError naming it."""
    saved = run.saved_epochs()
    missing = [e for e in epochs if e not in saved]
    if missing:
        raise UserError(f"run {run.dir} has no checkpoint for epoch {missing[0]} "
                        f"(saved: {_epoch_list(saved) or 'none'}); choose --rewind_epochs among the saved epochs, "
                        f"or move the run directory aside and re-run to retrain it")
    own = model.state_dict()
    wanted = [k for group in keys.values() for k in group]
    states = {}
    for epoch in progress(epochs, desc="load checkpoints", leave=False):
        state = run.load_checkpoint(epoch)["model"]
        for k in wanted:
            if k not in state or tuple(state[k].shape) != tuple(own[k].shape):
                found = "missing" if k not in state else f"shape {tuple(state[k].shape)}"
                raise UserError(f"checkpoint {run.ckpt_path(epoch)} does not fit the model ({k}: {found}, model has "
                                f"{tuple(own[k].shape)}); use the run directory that matches --model/--width/--dataset")
        states[epoch] = {k: state[k].to(device) for k in wanted}  # only the tensors a rewind needs
    return states


def clone_states(states):
    """A private copy of load_rewind_states' tensors (recompute mode writes its statistics into them)."""
    return {e: {k: t.clone() for k, t in state.items()} for e, state in states.items()}


class Rewinder:
    """Swaps one group's tensors of `model` for a checkpoint's, in place, and back."""

    def __init__(self, model, states, keys):
        """`states`: {epoch: {key: tensor}} (load_rewind_states); `keys`: {group: [keys]} (rewind_keys)."""
        self.model, self.states, self.keys = model, states, keys
        # state_dict() tensors share storage with the parameters and buffers: copy_ into them edits the model.
        self.live = model.state_dict()
        self.final = {k: t.detach().clone() for k, t in self.live.items()}

    @contextlib.contextmanager
    def rewound(self, group, epoch, keep=False):
        """Within the block, `group` holds checkpoint `epoch`'s tensors; the final ones are restored on exit.

        `keep`: first copy the group's tensors back into the stored state of `epoch` (statistics
        accumulated inside the block persist to the next rewind)."""
        keys = self.keys[group]
        try:
            with torch.no_grad():
                for k in keys:
                    self.live[k].copy_(self.states[epoch][k])
            yield self.model
            if keep:
                with torch.no_grad():
                    for k in keys:
                        self.states[epoch][k].copy_(self.live[k])
        finally:
            with torch.no_grad():
                for k in keys:
                    self.live[k].copy_(self.final[k])

    def changed_keys(self):
        """The state_dict keys whose tensors differ from the final model (empty between rewinds)."""
        return [k for k, t in self.model.state_dict().items() if not torch.equal(t, self.final[k])]


def split_at(model, group):
    """(front, back): lists of the model's stages, the group inside back[0], such that running front
    then back equals model(x); None where the model is not a plain sequence of stages or the group
    does not lie inside one stage (then whole forwards are the way)."""
    seq = stages(model)
    if seq is None:
        return None
    module = dict(layer_groups(model))[group]
    for k, stage in enumerate(seq):
        if any(m is module for m in stage.modules()):
            return seq[:k], seq[k:]
    return None


def _run(modules, h):
    for m in modules:
        h = m(h)
    return h


def _set_index(model, index):
    """What a zoo model's forward does before running its stages: hand the example indices to the
    modules that want them (example-tied dropout)."""
    for m in model.modules():
        if getattr(m, "wants_index", False):
            m.index = index


def _batches(data, split, batch_size):
    n = data.n_train if split == "train" else len(data.x_test)
    return torch.arange(n, device=data.device).split(batch_size)


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_stats(model, data, rewinder, group, epochs, *, amp, batch_size=1024):
    """Re-estimate the BatchNorm statistics of `group` rewound to each epoch, in place of the
    checkpoint's (stored into rewinder.states, which must hold the group's buffers).

    The statistics are those of the training images as they reach the rewound group through the
    final layers before it: PyTorch's cumulative average over batches (momentum=None, as
    torch.optim.swa_utils.update_bn), the group's BatchNorm layers in train mode, everything else in
    eval mode. Label-free. Per batch the stages before the group's stage run once for all epochs
    (whole forwards where split_at is None). Returns the number of BatchNorm layers updated (0:
    nothing to do, e.g. a linear head)."""
    bns = batchnorms(dict(layer_groups(model))[group])
    if not bns:
        return 0
    split = split_at(model, group)
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.momentum = None  # cumulative average over all batches, not an exponential one
        for e in epochs:  # fresh accumulators in each epoch's stored state
            with rewinder.rewound(group, e, keep=True):
                for m in bns:
                    m.reset_running_stats()
        for idx in _batches(data, "train", batch_size):
            if split is not None:
                _set_index(model, idx)
                with autocast(data.device, amp):
                    h = _run(split[0], data.batch(idx))
            for e in epochs:  # the rewind outside the autocast region (module docstring)
                with rewinder.rewound(group, e, keep=True):
                    for m in bns:
                        m.train()
                    with autocast(data.device, amp):
                        if split is not None:
                            split[1][0](h.clone())  # only the statistics matter: the later stages are not needed
                        else:
                            model(data.batch(idx), index=idx)
                    for m in bns:
                        m.eval()
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            m.eval()
    return len(bns)


@torch.no_grad()
def rewind_sweep(model, data, rewinder, epochs, groups=None, *, amp, batch_size=1024, recompute_bn=False):
    """{group: {epoch: split_accuracy}} with each group rewound alone to each epoch (eval mode).

    Per group and batch, the stages before the group's stage run once (final weights); that stage
    and everything after it run once per rewind epoch; a model that is not a plain sequence of
    stages runs whole (common.evaluation.predict) per (group, epoch). `recompute_bn`: first
    re-estimate the group's BatchNorm statistics (recompute_bn_stats). The model is left final."""
    was_training = model.training
    out = {}
    for group in progress(list(groups or rewinder.keys), desc="rewind groups"):
        if recompute_bn:
            recompute_bn_stats(model, data, rewinder, group, epochs, amp=amp, batch_size=batch_size)
        model.eval()
        split = split_at(model, group)
        if split is None:
            out[group] = {}
            for e in epochs:
                with rewinder.rewound(group, e):
                    out[group][e] = split_accuracy(predict(model, data, "train", batch_size=batch_size, amp=amp),
                                                   predict(model, data, "test", batch_size=batch_size, amp=amp), data)
            continue
        front, back = split
        preds = {(s, e): [] for s in ("train", "test") for e in epochs}
        for s in ("train", "test"):
            for idx in _batches(data, s, batch_size):
                _set_index(model, idx if s == "train" else None)
                with autocast(data.device, amp):
                    h = _run(front, data.batch(idx, s))
                for e in epochs:  # the rewind outside the autocast region (module docstring)
                    with rewinder.rewound(group, e), autocast(data.device, amp):
                        # a clone: no module may edit the shared activations in place
                        preds[s, e].append(_run(back, h.clone()).argmax(1))
        out[group] = {e: split_accuracy(torch.cat(preds["train", e]), torch.cat(preds["test", e]), data)
                      for e in epochs}
    model.train(was_training)
    return out
