"""Gradient accounting cost: one training epoch of the default run, plain vs ours vs the authors' method.

- plain:   `losses.mean().backward()`, the optimizer step.
- ours:    common.accounting.GradientAccountant: the full backward, then the clean part by a second
           backward through the retained graph; per-parameter sums stay on the device (2 backwards).
- authors: the method of the paper's code: backward the clean part, copy every parameter gradient
           to the CPU and take its norms there, the same for the noisy part, then a third backward
           of the whole loss for the step (3 backwards + 2 gradient copies per step).
Same model state, same batches (common.training.train_epoch); the three are timed alternately,
`repeats` times, and medians are reported as ratios to plain. Also checks that ours leaves the
weights bit-identical to plain training.

    python bench/bench_gradient_accounting.py [--repeats=3] [--batch_size=128] [--device=cpu]
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.accounting import GradientAccountant  # noqa: E402
from common.data import load_data  # noqa: E402
from common.models import group_params, model_for  # noqa: E402
from common.training import make_optimizer, pick_device, train_epoch  # noqa: E402

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
    model = model_for(cfg, data)
    opt = make_optimizer(model.parameters(), cfg)
    start = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    indices = torch.arange(data.n_train, device=device)
    steps = len(indices.split(cfg.batch_size))
    ours, authors = GradientAccountant(model, data.noisy), AuthorsAccounting(model, data.noisy)

    def epoch(backward, after=None):
        model.load_state_dict(start[0])  # every measurement starts from the same state
        opt.load_state_dict(start[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_epoch(model, data, indices, opt, cfg, epoch=1, step0=0, total_steps=cfg.epochs * steps,
                    backward=backward, desc="bench")
        if after:
            after()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    methods = {"plain": (None, None), "ours": (ours.backward, ours.end_epoch), "authors": (authors.backward, None)}
    print(f"{cfg.dataset} ({data.n_train} train, {int(data.noisy.sum())} noisy), {cfg.model} x{cfg.width}, "
          f"batch {cfg.batch_size}, {steps} steps, {device}, {torch.get_num_threads()} threads, "
          f"{cfg.repeats} alternating repeats")
    epoch(*methods["plain"])
    plain_weights = copy.deepcopy(model.state_dict())
    epoch(*methods["ours"])
    identical = all(torch.equal(plain_weights[k], v) for k, v in model.state_dict().items())
    print(f"ours leaves the weights bit-identical to plain training after one epoch: {identical}")
    epoch(*methods["authors"])  # warm-up of the last one
    times = {name: [] for name in methods}
    for r in range(cfg.repeats):
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]  # alternate the order too
        for name in order:
            times[name].append(epoch(*methods[name]))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:8s} median {med[name]:7.2f}s  (runs: {', '.join(f'{x:.2f}' for x in t)})")
    print(f"ours / plain    x{med['ours'] / med['plain']:.2f}   (floor ~x1.67: 5/3 of a step's FLOPs)")
    print(f"authors / plain x{med['authors'] / med['plain']:.2f}")
    print(f"authors / ours  x{med['authors'] / med['ours']:.2f}")
    return med


if __name__ == "__main__":
    from common import cli
    cli.run(main)
