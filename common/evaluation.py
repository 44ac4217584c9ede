"""Accuracy split the way every experiment reports it: clean / noisy / test.

- clean:      clean training examples (label = true label)
- noisy:      mislabeled training examples w.r.t. their noisy label -- "still memorized?"
- noisy_true: mislabeled training examples w.r.t. their true label -- "back to the right answer?"
- test:       the (never corrupted) test set
- typical / mislabeled / atypical: with memorized = atypical or both, the training examples of each kind
  (common/data.py), w.r.t. their training label ("noisy" is then the memorized set: mislabeled + atypical)
"""
import torch

from . import distributed
from .data import KINDS
from .precision import autocast


@torch.no_grad()
def predict(model, data, split="train", indices=None, batch_size=1024, amp=True, shard=True):
    """Predicted classes for examples of a split, in eval mode (training mode restored after).

    Training examples are passed with their indices (example-tied dropout may use them).
    Under torchrun (and `shard`) each rank predicts its slice of `indices` and every rank gets all
    predictions: every rank must call it, with the same indices."""
    was_training = model.training
    model.eval()
    n = data.n_train if split == "train" else len(data.x_test)
    indices = torch.arange(n, device=data.device) if indices is None else indices.to(data.device)
    if shard and distributed.active():
        lo, hi = distributed.shard_bounds(len(indices))
        mine = predict(model, data, split, indices[lo:hi], batch_size, amp, shard=False)
        model.train(was_training)
        return distributed.all_gather_cat(mine, len(indices))
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        with autocast(data.device, amp):
            logits = model(data.batch(idx, split), index=idx if split == "train" else None)
        out.append(logits.argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=data.device)


SPLIT_KINDS = ("mislabeled", "atypical")  # the memorized set's two kinds with memorized=both


def split_kinds(memorized):
    """The kinds of the memorized set that tables and figures show apart, beside clean (with memorized=both
    the typical clean examples) and noisy (the memorized set, lumped): mislabeled and atypical with
    memorized=both; none otherwise (the memorized set has one kind: `noisy` is it)."""
    return SPLIT_KINDS if memorized == "both" else ()


def _mean(correct):
    return float(correct.float().mean()) if len(correct) else float("nan")


def split_accuracy(train_pred, test_pred, data):
    """{clean, noisy, noisy_true, train, test} accuracies from predictions on the full splits."""
    hit = train_pred == data.y_train
    out = {"clean": _mean(hit[~data.noisy]), "noisy": _mean(hit[data.noisy]),
           "noisy_true": _mean((train_pred == data.y_true)[data.noisy]),
           "train": _mean(hit), "test": _mean(test_pred == data.y_test)}
    if getattr(data, "memorized", "noisy") != "noisy":  # the split by kind: mislabeled / atypical / typical clean
        out.update({name: _mean(hit[data.kind == code]) for code, name in enumerate(KINDS)})
    return out


def accuracies(model, data, batch_size=1024, amp=True):
    """Clean / noisy / noisy-true / train / test accuracy of `model` (fractions in [0, 1])."""
    return split_accuracy(predict(model, data, "train", batch_size=batch_size, amp=amp),
                          predict(model, data, "test", batch_size=batch_size, amp=amp), data)
