"""Example-tied dropout cost: one training epoch of the default model with it vs without it.

Same architecture, same initial weights, same batches (common.training.train_epoch); the ETD
model has a dropout module after each of its conv blocks, masks hashed on the fly from (seed,
layer, index). Timed alternately, medians reported as a ratio (target <= 1.15 on CPU). Then the
mask memory per layer: ours (nothing stored), one bit per (example, channel), and the authors'
dense float32 N x C x H x W table, for the default run and for CIFAR-10 with full-width ResNet-9
(50,000 examples; computed from the shapes, no CIFAR data is loaded).

    python bench/bench_example_tied_dropout.py [--repeats=3] [--p_gen=0.5] [--p_mem=0.2]
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.data import load_data  # noqa: E402
from common.dropout import etd_factory, mask_memory  # noqa: E402
from common.models import build_model, model_for  # noqa: E402
from common.training import make_optimizer, train_epoch  # noqa: E402

KNOBS = dict(dataset="mnist_5k", model="resnet9", width=0.25, noise=0.1, seed=0, model_seed=0, batch_size=128,
             lr=0.05, schedule="triangle", warmup=0.25, momentum=0.9, weight_decay=5e-4, augment=False, amp=True,
             p_gen=0.5, p_mem=0.2, repeats=3)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def memory_table(title, model, example_shape, n):
    rows = mask_memory(model, example_shape, n)
    print(f"\n{title}: mask memory per layer for {n:,} examples")
    print(f"  {'layer':<8} {'C':>5} {'activation':>14} {'ours':>6} {'1 bit/(ex,ch)':>14} {'dense float':>12}")
    for r in rows:
        print(f"  {r['layer']:<8} {r['channels']:>5} {'x'.join(map(str, r['activation'])):>14} {r['stored_bytes']:>6} "
              f"{fmt_bytes(r['packed_bits_bytes']):>14} {fmt_bytes(r['dense_float_bytes']):>12}")
    print(f"  {'total':<8} {'':>5} {'':>14} {0:>6} {fmt_bytes(sum(r['packed_bits_bytes'] for r in rows)):>14} "
          f"{fmt_bytes(sum(r['dense_float_bytes'] for r in rows)):>12}")
    return rows


def main(argv):
    cfg = config.parse(KNOBS, argv)
    data = load_data(cfg)
    plain = model_for(cfg, data)
    etd = model_for(cfg, data, dropout=etd_factory(cfg.p_gen, cfg.p_mem, cfg.model_seed))
    etd.load_state_dict(plain.state_dict())
    models = {"plain": plain, "etd": etd}
    opts = {k: make_optimizer(m.parameters(), cfg) for k, m in models.items()}
    state = {k: (copy.deepcopy(m.state_dict()), copy.deepcopy(o.state_dict())) for (k, m), o in
             zip(models.items(), opts.values())}
    idx = torch.arange(data.n_train, device=data.device)

    def epoch(k):
        models[k].load_state_dict(state[k][0])  # every timed epoch starts from the same weights
        opts[k].load_state_dict(state[k][1])
        return train_epoch(models[k], data, idx, opts[k], cfg, epoch=1, desc=k)

    print(f"{cfg.dataset} ({data.n_train} train), {cfg.model} x{cfg.width}, batch {cfg.batch_size}, "
          f"p_gen {cfg.p_gen}, p_mem {cfg.p_mem}, {torch.get_num_threads()} threads, {cfg.repeats} alternating repeats")
    epoch("plain"), epoch("etd")  # warm-up
    times = {"plain": [], "etd": []}
    for _ in range(cfg.repeats):
        for k in times:
            t = time.perf_counter()
            epoch(k)
            times[k].append(time.perf_counter() - t)
    a, b = statistics.median(times["plain"]), statistics.median(times["etd"])
    print(f"train epoch  without {a:7.3f}s  with example-tied dropout {b:7.3f}s  ratio x{b / a:.3f} (target <= 1.15)")

    memory_table(f"default ({cfg.model} x{cfg.width}, {cfg.dataset})", etd,
                 (data.in_channels, data.image_size, data.image_size), data.n_train)
    cifar = build_model("resnet9", 3, 10, 32, width=1.0, dropout=etd_factory(cfg.p_gen, cfg.p_mem, 0))
    memory_table("CIFAR-10, full-width ResNet-9", cifar, (3, 32, 32), 50_000)


if __name__ == "__main__":
    from common import cli
    cli.run(main)
