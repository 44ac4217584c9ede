"""Gradient accounting cost: one training epoch of the default run, plain vs ours (without and with
the control group) vs the authors' method.

- plain:   `losses.mean().backward()`, the optimizer step.
- ours:    common.accounting.GradientAccountant without a control: the full backward, then the clean
           part by a second backward through the retained graph; sums stay on the device (2 backwards).
- control: the same with the control group (what gradient_accounting.py runs): a third backward for
           the control part (a seeded random clean subset as large as the noisy set).
- authors: the method of the paper's code: backward the clean part, copy every parameter gradient
           to the CPU and take its norms there, the same for the noisy part, then a third backward
           of the whole loss for the step (3 backwards + 2 gradient copies per step).
Each method trains its own copy of the model from the same initial state on the same batches. The
CPU is shared, so the methods are interleaved step by step (rotating which goes first): a slow
minute hits all of them alike. Reported: per-epoch time (sum of its step times, median over
`repeats` epochs), ratios of those medians, and the median of the per-step ratios. Also checks that
ours, with and without the control, leaves the weights bit-identical to plain training.

    python bench/bench_gradient_accounting.py [--repeats=3] [--batch_size=128] [--device=cpu]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.accounting import GradientAccountant, control_mask  # noqa: E402
from common.data import load_data  # noqa: E402
from common.precision import autocast  # noqa: E402
from common.models import group_params, model_for  # noqa: E402
from common.training import batch_order, lr_factor, make_optimizer, pick_device  # noqa: E402

KNOBS = dict(dataset="mnist_5k", model="resnet9", width=0.25, noise=0.1, seed=0, model_seed=0, epochs=20,
             batch_size=128, lr=0.05, schedule="triangle", warmup=0.25, momentum=0.9, weight_decay=5e-4,
             augment=False, amp=True, device="auto", download=False, repeats=3)


class AuthorsAccounting:
    """Three backward passes per step; after the clean and the noisy one, every parameter gradient is
    copied to the CPU and its squared norm accumulated there per layer group (only norms are kept)."""

    def __init__(self, model, noisy):
        self.model, self.noisy = model, noisy
        self.groups = group_params(model)
        self.sq = {part: {g: 0.0 for g in self.groups} for part in ("clean", "noisy")}

    def backward(self, losses, idx):
        noisy = self.noisy[idx]
        for part, weights in (("clean", (~noisy).to(losses.dtype)), ("noisy", noisy.to(losses.dtype))):
            self.model.zero_grad(set_to_none=True)
            ((losses * weights).sum() / len(losses)).backward(retain_graph=True)
            for g, params in self.groups.items():
                cpu = [p.grad.detach().to("cpu", copy=True) for p in params if p.grad is not None]
                self.sq[part][g] += sum(float(t.pow(2).sum()) for t in cpu)
        self.model.zero_grad(set_to_none=True)
        losses.mean().backward()


def main(argv):
    cfg = config.parse(KNOBS, argv)
    device = pick_device(cfg.device)
    data = load_data(cfg, device)
    batches = batch_order(torch.arange(data.n_train, device=device), cfg.batch_size, cfg.model_seed, 1)
    total_steps = cfg.epochs * len(batches)
    models, opts, hooks = {}, {}, {}
    for name in ("plain", "ours", "control", "authors"):
        models[name] = model_for(cfg, data)  # the same initialization (model_seed) for each
        opts[name] = make_optimizer(models[name].parameters(), cfg)
    ours = GradientAccountant(models["ours"], data.noisy)
    control = GradientAccountant(models["control"], data.noisy, control=control_mask(data.noisy, cfg.seed))
    accountants = {"ours": ours, "control": control}
    hooks = {"plain": None, "ours": ours.backward, "control": control.backward,
             "authors": AuthorsAccounting(models["authors"], data.noisy).backward}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(name, i, idx):
        """One step as common.training.train_epoch takes it, timed."""
        model, opt = models[name], opts[name]
        sync()
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(i / total_steps, cfg.schedule, cfg.warmup)
        x, y = data.batch(idx), data.labels(idx)
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg.amp):
            logits = model(x, index=idx)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        if hooks[name] is None:
            losses.mean().backward()
        else:
            hooks[name](losses, idx)
        opt.step()
        if name in accountants and i % len(batches) == len(batches) - 1:
            accountants[name].end_epoch()  # the epoch's reduction is part of the cost
        sync()
        return time.perf_counter() - t

    names = list(models)
    print(f"{cfg.dataset} ({data.n_train} train, {int(data.noisy.sum())} noisy), {cfg.model} x{cfg.width}, "
          f"batch {cfg.batch_size}, {len(batches)} steps per epoch, {device}, {torch.get_num_threads()} threads; "
          f"1 warm-up + {cfg.repeats} epochs, methods interleaved step by step")
    for k, idx in enumerate(batches[:3]):  # warm-up steps (allocator, kernels); all stay in lockstep
        for name in names:
            step(name, k, idx)
    epochs, ratios = {n: [] for n in names}, {n: [] for n in names if n != "plain"}
    i = 3
    for r in range(cfg.repeats + 1):
        per = {n: 0.0 for n in names}
        for k, idx in enumerate(batches):
            order = names[(i % len(names)):] + names[:(i % len(names))]
            t = {n: step(n, i, idx) for n in order}
            i += 1
            for n in names:
                per[n] += t[n]
            if r > 0:
                for n in ratios:
                    ratios[n].append(t[n] / t["plain"])
        if r > 0:
            for n in names:
                epochs[n].append(per[n])
        print(f"  epoch {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(f"{n} {per[n]:.1f}s" for n in names),
              flush=True)
    for n in accountants:
        identical = all(torch.equal(v, models[n].state_dict()[k]) for k, v in models["plain"].state_dict().items())
        print(f"{n} left the weights bit-identical to plain training ({i} steps): {identical}")
    med = {n: statistics.median(t) for n, t in epochs.items()}
    for n in names:
        print(f"{n:8s} epoch median {med[n]:7.2f}s  (epochs: {', '.join(f'{x:.2f}' for x in epochs[n])})")
    for n in ratios:
        print(f"{n} / plain: x{med[n] / med['plain']:.2f} (epoch medians), x{statistics.median(ratios[n]):.2f} "
              f"(median of per-step ratios)")
    print(f"control / ours: x{med['control'] / med['ours']:.2f} (the control group's extra backward)")
    print(f"authors / control: x{med['authors'] / med['control']:.2f}, "
          f"authors / ours: x{med['authors'] / med['ours']:.2f}"
          f"   (floors ~x1.67 (ours) and ~x2.33 (control) of plain: 5/3 and 7/3 of a step's FLOPs)")
    return med


if __name__ == "__main__":
    from common import cli
    cli.run(main)
