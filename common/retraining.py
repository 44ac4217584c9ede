"""Mechanics of layer retraining: reset one layer group, freeze the rest for real, choose what the frozen
BatchNorm layers do, count the fit of the retraining set.

Freezing acts on the model's own parameters (`requires_grad_(False)`), and the optimizer is given the
group's parameters only; the authors froze a copy, so every layer trained. A BatchNorm layer
normalizes with batch statistics and updates its running statistics in train mode even when its
parameters are frozen: FROZEN_BN says what the BatchNorm layers outside the group do during
retraining. `train` is the authors' loop (the whole model in train mode: the frozen layers'
statistics follow the retraining data); `eval` holds them in eval mode for every batch
(`hold_eval`), so the frozen layers compute exactly what they compute at test time.

Early stop as the authors: training accuracy over the epoch's batches (`RunningAccuracy`, measured
during the epoch as in their loop, w.r.t. the labels trained on) counted as 100% in `stop_after`
epochs, not necessarily in a row.
"""
import torch
import torch.nn as nn

from . import distributed
from .models import group_keys, group_params, layer_groups

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
FROZEN_BN = ("train", "eval")  # "train" first: the authors' loop


def group_names(model):
    return [name for name, _ in layer_groups(model)]


@torch.no_grad()
def reset_group(model, name, state):
    """Copy group `name`'s tensors (parameters AND buffers, e.g. BatchNorm statistics) from `state`."""
    own = model.state_dict()  # shares storage with the model
    for key in group_keys(model)[name]:
        own[key].copy_(state[key])


def freeze_except(model, name):
    """Make only group `name` trainable. Returns (its parameters, the BatchNorm modules outside it)."""
    inside = {id(m) for m in dict(layer_groups(model))[name].modules()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = group_params(model)[name]
    for p in params:
        p.requires_grad_(True)
    frozen_norms = [m for m in model.modules() if isinstance(m, NORM_TYPES) and id(m) not in inside]
    return params, frozen_norms


def hold_eval(modules):
    """Put `modules` in eval mode (call after model.train(): their running statistics stay fixed)."""
    for m in modules:
        m.eval()


def unfreeze(model):
    for p in model.parameters():
        p.requires_grad_(True)


def changed_outside(model, name, reference):
    """(parameter keys, buffer keys) outside group `name` whose tensors differ (bitwise) from `reference`."""
    inside = set(group_keys(model)[name])
    params = {n for n, _ in model.named_parameters()}
    changed = [k for k, v in model.state_dict().items() if k not in inside and not torch.equal(v, reference[k])]
    return [k for k in changed if k in params], [k for k in changed if k not in params]


class RunningAccuracy:
    """Accuracy of the training forwards of `model` w.r.t. the labels trained on (data.labels), counted
    while attached (`with RunningAccuracy(model, data) as acc: train_epoch(...)`; then `acc.value()`).
    It reads the logits of every forward called with `index=` in train mode: the authors' stop criterion."""

    def __init__(self, model, data):
        self.model, self.data = model, data
        self.hits = torch.zeros((), dtype=torch.long, device=data.device)
        self.seen = torch.zeros((), dtype=torch.long, device=data.device)

    def _hook(self, module, args, kwargs, output):
        index = kwargs.get("index")
        if module.training and index is not None:
            with torch.no_grad():
                self.hits += (output.argmax(1) == self.data.labels(index)).sum()
                self.seen += len(index)

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def value(self):
        """Fraction of the forwarded examples predicted with their training label (all ranks together)."""
        hits, seen = self.hits.clone(), self.seen.clone()
        if distributed.active():
            distributed.all_reduce_sum_(hits), distributed.all_reduce_sum_(seen)
        return int(hits) / max(1, int(seen))
