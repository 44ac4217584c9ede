"""Mechanics of layer retraining: reset one layer group, freeze the rest for real, keep frozen BatchNorm fixed.

Freezing acts on the model's own parameters (`requires_grad_(False)`), and the optimizer is given the
group's parameters only; the authors froze a copy, so every layer trained. A BatchNorm layer updates
its running statistics in train mode even when its parameters are frozen, so the normalization
layers outside the group are held in eval mode for every training batch (`hold_eval`).
"""
import torch
import torch.nn as nn

from .models import group_keys, layer_groups

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


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
    groups = dict(layer_groups(model))
    inside = {id(m) for m in groups[name].modules()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(groups[name].parameters())
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
    """State-dict keys outside group `name` whose tensors differ (bitwise) from `reference`."""
    inside = set(group_keys(model)[name])
    return [k for k, v in model.state_dict().items() if k not in inside and not torch.equal(v, reference[k])]
