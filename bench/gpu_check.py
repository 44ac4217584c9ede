"""GPU check: the numbers a paper-scale run depends on, in one script of at most ~8 minutes on one H100.

    python bench/gpu_check.py [--out=PATH] [--fashion_dir=DIR] [--parts=[...]] [--key=value ...]
    python bench/gpu_check.py --smoke          # tiny sizes: runs anywhere (a CPU) in well under a minute

Parts (each guarded: one that raises is reported as failed with its reason, the others still run;
each has a time budget, checked between its measurements):
  throughput  ResNet-9 width 1, batch 512, bf16 autocast, channels_last (the paper preset
              configs/cifar10_resnet9.py): images/s and seconds per epoch of 50,000 32x32x3 images
              through common.training.train_epoch (images on the device, batches by indexing), with
              and without on-device crop+flip; then the same model fed by a torchvision DataLoader with
              per-sample PIL transforms (RandomCrop, flip, ToTensor, Normalize; worker processes),
              and both data paths alone.
  accounting  a training step with common.accounting.GradientAccountant's backward hook (with and
              without its control group) vs plain backward, through train_epoch; ratios.
  dropout     a training step of the same model with example-tied dropout vs without; ratio.
  flipping    common.flipping.flip_batched (several targets per forward, as neuron_flipping.py on
              CUDA) vs flip_sequential (one at a time) at neuron_flipping.py's settings (the authors':
              reference batch 511, 5 noised copies) on the same targets of a briefly trained model: the
              unit sequences must be identical; targets per second of each. Deterministic kernels on CUDA.
  precision   the same short run (seed, data, batches) trained with bf16 autocast and in fp32: final
              clean / noisy / test accuracy of each.
  torchrun    `torchrun --nproc_per_node=1 gradient_accounting.py` for 1 epoch in a temporary runs_dir.

Images: Fashion-MNIST from its IDX files (--fashion_dir, else data/fashion-mnist/, data/FashionMNIST/raw/,
or the Debian package's folder), zero-padded from 28 to 32 px and repeated to 3 channels; where no
IDX files are found, the embedded digits (mnist_5k) the same way, repeated to `n_images`. The output
says which. Results: a table on stdout and a JSON (--out; written after every part, atomically).
"""
import copy
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import example_tied_dropout as etd_script  # noqa: E402  (its knobs: p_gen, p_mem)
import neuron_flipping as flip_script  # noqa: E402  (its knobs: ref_batch, n_eot, ...; declares the run keys)
from common import config  # noqa: E402
from common.accounting import GradientAccountant, control_mask  # noqa: E402
from common.cli import UserError  # noqa: E402
from common.data import SYSTEM_FASHION_MNIST, Data, _read_idx, apply_label_noise, load_arrays  # noqa: E402
from common.dropout import etd_factory  # noqa: E402
from common.evaluation import accuracies, predict  # noqa: E402
from common.flipping import Units, candidates, flip_batched, flip_sequential, graph_rows, reference_batch  # noqa: E402
from common.models import model_for  # noqa: E402
from common.precision import autocast, strict_fp32  # noqa: E402
from common.rng import generator  # noqa: E402
from common.runs import writable_dir, write_json  # noqa: E402
from common.training import batch_order, make_optimizer, pick_device, train_epoch  # noqa: E402

PRESET = "configs/cifar10_resnet9.py"  # the paper's ResNet-9 recipe: width 1, batch 512, lr, schedule
PARTS = ("throughput", "accounting", "dropout", "flipping", "precision", "torchrun")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_DIRS = (REPO / "data" / "fashion-mnist", REPO / "data" / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST)

# The run's training keys (the shared block's defaults; the preset then sets the paper's values).
TRAIN_KEYS = ("model", "width", "noise", "seed", "model_seed", "batch_size", "lr", "schedule", "warmup", "momentum",
              "weight_decay", "augment", "amp", "device")
KNOBS = {
    **{k: config.RUN_DEFAULTS[k] for k in TRAIN_KEYS},
    "out": "bench/results/gpu_check.json",  # the JSON (relative to the repository root)
    "smoke": False,           # tiny sizes (SMOKE below); `--smoke` alone is enough
    "parts": list(PARTS),     # which parts to run
    "images": "auto",         # auto (Fashion-MNIST IDX files if found, else mnist_5k) | fashion_mnist | mnist_5k
    "fashion_dir": "",        # folder with Fashion-MNIST's IDX files (.gz or not); "" = search FASHION_DIRS
    "n_images": 50_000,       # training images (CIFAR-10's count); the test split is the dataset's own
    "loader_workers": -1,     # DataLoader worker processes; -1 = min(8, CPU cores)
    "steps": 40,              # training steps per timed pass of the accounting and dropout parts
    "repeats": 3,             # timed passes per arm (alternating arms), medians reported
    "flip_targets": 4,        # targets of each kind (noisy, clean)
    "flip_slots": 0,          # targets per forward of the batched search (0: neuron_flipping.py's auto)
    "flip_train_epochs": 1,   # epochs of the briefly trained model searched by the flipping part
    "max_units": flip_script.max_units,
    "ref_batch": flip_script.ref_batch,
    "n_eot": flip_script.n_eot,
    "eot_noise": flip_script.eot_noise,
    "unit": flip_script.unit,
    "objective": flip_script.objective,
    "graph_gb": flip_script.graph_gb,
    "precision_epochs": 5,    # epochs of the bf16 / fp32 comparison
    "torchrun_args": [],      # extra arguments for the torchrun part's script
    "threads": 0,             # torch CPU threads, also for the torchrun child (0: torch's default)
    # time budgets in seconds, per part (checked between measurements, so a part may overrun by one)
    "budget_throughput": 90, "budget_accounting": 60, "budget_dropout": 45, "budget_flipping": 100,
    "budget_precision": 90, "budget_torchrun": 60,
}
# --smoke: every size tiny, so all parts run on a CPU in seconds (the command line still overrides these).
SMOKE = dict(threads=1, width=0.125, batch_size=32, n_images=256, loader_workers=0, steps=3, repeats=1, flip_targets=1,
             flip_train_epochs=3, max_units=5, ref_batch=7, n_eot=2, precision_epochs=1,
             torchrun_args=["--model=cnn", "--width=0.125", "--batch_size=256"])
IMAGES = ("auto", "fashion_mnist", "mnist_5k")
MINIMA = {"n_images": 2, "steps": 1, "repeats": 1, "flip_targets": 1, "flip_train_epochs": 1, "precision_epochs": 1,
          "threads": 0, **{f"budget_{p}": 1 for p in PARTS}}


# ----------------------------------------------------------------------------- images

def fashion_dir(cfg):
    """The folder holding Fashion-MNIST's four IDX files, or None (an explicit --fashion_dir must hold them)."""
    def holds(d):
        return all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in IDX_FILES)
    if cfg.fashion_dir:
        d = Path(cfg.fashion_dir)
        if not holds(d):
            raise UserError(f"--fashion_dir={cfg.fashion_dir} does not hold Fashion-MNIST's IDX files "
                            f"({', '.join(IDX_FILES)}, .gz or not); give the folder that does")
        return d
    return next((d for d in FASHION_DIRS if holds(d)), None)


def read_fashion(d):
    """(x, y, x_test, y_test) from the IDX files in folder d: uint8 N x 1 x 28 x 28 and int64 labels."""
    def read(name):
        return _read_idx(d / name if (d / name).is_file() else d / f"{name}.gz")
    x, y, xt, yt = (torch.from_numpy(np.array(read(f))) for f in IDX_FILES)
    return x[:, None], y.long(), xt[:, None], yt.long()


def to_32x3(x):
    """uint8 N x 1 x H x W (H, W <= 32) -> N x 3 x 32 x 32: zero padding around, the channel repeated."""
    h, w = x.shape[2:]
    top, left = (32 - h) // 2, (32 - w) // 2
    x = F.pad(x, (left, 32 - w - left, top, 32 - h - top))
    return x.expand(-1, 3, -1, -1).contiguous()


def check_images(cfg):
    """(x, y, x_test, y_test, source): `n_images` training images of 3 x 32 x 32 and the test split."""
    d = None if cfg.images == "mnist_5k" else fashion_dir(cfg)
    if d is not None:
        x, y, xt, yt = read_fashion(d)
        source = f"fashion_mnist IDX files in {d}"
    elif cfg.images == "fashion_mnist":
        raise UserError(f"images=fashion_mnist but no Fashion-MNIST IDX files in {', '.join(map(str, FASHION_DIRS))}; "
                        f"pass --fashion_dir=DIR or --images=auto")
    else:
        x, y, xt, yt = load_arrays("mnist_5k", cfg.seed)
        source = "mnist_5k (embedded digits" + ("; no Fashion-MNIST IDX files found)" if cfg.images == "auto" else ")")
    reps = -(-cfg.n_images // len(x))  # repeated up to n_images where the set is smaller
    if reps > 1:
        source += f", repeated x{reps}"
    # a seeded order (the files may be sorted by class): a prefix of it, or whole passes of it
    take = torch.randperm(len(x), generator=generator(cfg.seed, "gpu_check", "images")).repeat(reps)[:cfg.n_images]
    return to_32x3(x[take]), y[take], to_32x3(xt), yt, source


def make_data(cfg, device):
    x, y, xt, yt, source = check_images(cfg)
    num_classes = int(max(y.max(), yt.max())) + 1
    noisy_y, mask = apply_label_noise(y, cfg.noise, num_classes, cfg.seed)
    return Data("gpu_check", x, noisy_y, y, mask, xt, yt, num_classes, device), source


# ----------------------------------------------------------------------------- timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, fn()) with the device synchronized before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


class Budget:
    """A part's time budget, counted from its start."""

    def __init__(self, seconds):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def used(self):
        return time.perf_counter() - self.t0

    def left(self):
        return self.seconds - self.used()


def alternate(arms, repeats, budget, device):
    """Time every arm (name -> fn) once as a warm-up, then up to `repeats` rounds, arms alternating
    (a round starts only while the budget lasts). Returns ({arm: [seconds]}, rounds done)."""
    for fn in arms.values():
        timed(fn, device)
    times = {name: [] for name in arms}
    for r in range(repeats):
        if r and budget.left() < sum(statistics.median(t) for t in times.values()):
            break
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            times[name].append(timed(arms[name], device)[0])
    return times, len(next(iter(times.values())))


def fresh(cfg, data, dropout=None):
    """A model at the run's initialization (model_seed) and its optimizer."""
    model = model_for(cfg, data, dropout=dropout)
    return model, make_optimizer(model.parameters(), cfg)


def warm_indices(data, cfg):
    """A few batches including the epoch's partial last one: cuDNN autotunes every batch shape once."""
    bs, n = cfg.batch_size, data.n_train
    k = min(n, 2 * bs + (n % bs or bs))
    return torch.arange(k, device=data.device)


# ----------------------------------------------------------------------------- (a) throughput

class PerSampleImages(torch.utils.data.Dataset):
    """The usual torchvision pipeline: a uint8 HWC array as in torchvision's CIFAR10, one PIL image per
    sample, RandomCrop(padding 4) + horizontal flip (optional), ToTensor, Normalize."""

    def __init__(self, data, augment):
        import torchvision.transforms as T
        self.x = data.x_train.cpu().permute(0, 2, 3, 1).numpy()
        self.y = data.y_train.cpu()
        crop_flip = [T.RandomCrop(data.image_size, padding=4), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(crop_flip + [T.ToTensor(), T.Normalize(data.mean.flatten().tolist(),
                                                                           data.std.flatten().tolist())])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), self.y[i], i


def loader_for(data, cfg, augment, epoch):
    """A DataLoader over the per-sample pipeline yielding train_epoch's batches of `epoch`."""
    batches = batch_order(torch.arange(data.n_train), cfg.batch_size, cfg.model_seed, epoch)
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(PerSampleImages(data, augment), batch_sampler=[b.tolist() for b in batches],
                                       num_workers=workers, pin_memory=data.device.type == "cuda",
                                       persistent_workers=workers > 0), workers


def loader_epoch(model, opt, loader, data, cfg, max_batches=None):
    """train_epoch's step (autocast, channels_last, mean cross-entropy, SGD) on the loader's batches."""
    model.train()
    for k, (x, y, idx) in enumerate(loader):
        if max_batches is not None and k >= max_batches:
            break
        x = x.to(data.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y, idx = y.to(data.device, non_blocking=True), idx.to(data.device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(data.device, cfg.amp):
            logits = model(x, index=idx)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()


def part_throughput(cfg, data, budget):
    model, opt = fresh(cfg, data)
    n, every = data.n_train, torch.arange(data.n_train, device=data.device)
    aug = copy.copy(cfg)
    aug.augment = True
    plain = copy.copy(cfg)
    plain.augment = False
    for c in (plain, aug):  # warm-up: cuDNN autotuning of every batch shape, allocator
        train_epoch(model, data, warm_indices(data, c), opt, c, epoch=0, desc="warm-up")
    out, skipped = {"images": n, "batch_size": cfg.batch_size, "precision": "bf16" if cfg.amp and data.device.type ==
                    "cuda" else "fp32", "channels_last": True}, []

    def record(name, seconds):
        out[name] = {"seconds_per_epoch": round(seconds, 3), "images_per_s": round(n / seconds, 1)}

    record("ours", timed(lambda: train_epoch(model, data, every, opt, plain, epoch=1, desc="ours"), data.device)[0])
    record("ours_augment", timed(lambda: train_epoch(model, data, every, opt, aug, epoch=2, desc="ours+aug"),
                                 data.device)[0])
    loader, workers = loader_for(data, cfg, augment=True, epoch=3)
    out["loader_workers"] = workers
    if budget.left() > 2 * out["ours_augment"]["seconds_per_epoch"]:
        loader_epoch(model, opt, loader, data, cfg, max_batches=3)  # warm-up: worker start-up
        record("loader_augment", timed(lambda: loader_epoch(model, opt, loader, data, cfg), data.device)[0])
        out["loader_over_ours"] = round(out["loader_augment"]["seconds_per_epoch"] /
                                        out["ours_augment"]["seconds_per_epoch"], 2)
    else:
        skipped.append("loader_augment")

    # the data paths alone: batches on the device, no model
    gen = torch.Generator().manual_seed(0)
    batches = batch_order(every, cfg.batch_size, cfg.model_seed, 4)
    out["data_only_ours_s"] = round(timed(lambda: [data.batch(i, augment=True, gen=gen) for i in batches],
                                          data.device)[0], 3)
    if budget.left() > 0 and "loader_augment" not in skipped:
        def drain():
            for x, y, _ in loader:
                x.to(data.device, non_blocking=True), y.to(data.device, non_blocking=True)
        out["data_only_loader_s"] = round(timed(drain, data.device)[0], 3)
    else:
        skipped.append("data_only_loader")
    return out, skipped


def show_throughput(r):
    s = (f"ours {r['ours']['images_per_s']:.0f} img/s ({r['ours']['seconds_per_epoch']:.2f} s/epoch), "
         f"+aug {r['ours_augment']['images_per_s']:.0f} img/s")
    if "loader_augment" in r:
        s += (f"; DataLoader+aug ({r['loader_workers']} workers) {r['loader_augment']['images_per_s']:.0f} img/s "
              f"(x{r['loader_over_ours']} the time)")
    return s


# ----------------------------------------------------------------------------- (b), (c) step costs

def step_arms(cfg, data, arms, budget):
    """Timed passes of `steps` training steps (train_epoch on a fixed subset) per arm; arms: name ->
    (model, optimizer, backward hook or None, after-pass callback or None). Returns seconds per step."""
    idx = torch.arange(min(data.n_train, cfg.steps * cfg.batch_size), device=data.device)
    n_steps = len(batch_order(idx, cfg.batch_size, cfg.model_seed, 0))

    def run(name):
        model, opt, hook, after = arms[name]
        train_epoch(model, data, idx, opt, cfg, epoch=1, backward=hook, desc=name)
        if after:
            after()
    for model, opt, hook, after in arms.values():  # autotuning of every batch shape
        train_epoch(model, data, warm_indices(data, cfg), opt, cfg, epoch=0, backward=hook, desc="warm-up")
        if after:
            after()
    times, rounds = alternate({name: (lambda name=name: run(name)) for name in arms}, cfg.repeats, budget, data.device)
    per_step = {name: statistics.median(t) / n_steps for name, t in times.items()}
    return per_step, n_steps, rounds


def passes_skipped(cfg, rounds):
    return [f"{cfg.repeats - rounds} of {cfg.repeats} timed passes"] if rounds < cfg.repeats else []


def part_accounting(cfg, data, budget):
    control = control_mask(data.noisy, cfg.seed)
    arms = {}
    for name, ctrl in (("plain", None), ("accounting", control), ("accounting_no_control", None)):
        model, opt = fresh(cfg, data)
        acc = GradientAccountant(model, data.noisy, control=ctrl) if name != "plain" else None
        arms[name] = (model, opt, acc and acc.backward, acc and acc.end_epoch)
    per_step, n_steps, rounds = step_arms(cfg, data, arms, budget)
    return {"steps_per_pass": n_steps, "rounds": rounds, "step_ms": {k: round(1e3 * v, 3) for k, v in per_step.items()},
            "accounting_over_plain": round(per_step["accounting"] / per_step["plain"], 3),
            "accounting_no_control_over_plain": round(per_step["accounting_no_control"] / per_step["plain"], 3),
            "note": "accounting = GradientAccountant with its control group, as gradient_accounting.py runs it "
                    "(end_epoch's reduction included)"}, passes_skipped(cfg, rounds)


def part_dropout(cfg, data, budget):
    plain, opt = fresh(cfg, data)
    etd, etd_opt = fresh(cfg, data, dropout=etd_factory(etd_script.p_gen, etd_script.p_mem, cfg.model_seed))
    per_step, n_steps, rounds = step_arms(cfg, data, {"plain": (plain, opt, None, None),
                                                      "example_tied_dropout": (etd, etd_opt, None, None)}, budget)
    result = {"steps_per_pass": n_steps, "rounds": rounds, "p_gen": etd_script.p_gen, "p_mem": etd_script.p_mem,
              "step_ms": {k: round(1e3 * v, 3) for k, v in per_step.items()},
              "dropout_over_plain": round(per_step["example_tied_dropout"] / per_step["plain"], 3)}
    return result, passes_skipped(cfg, rounds)


# ----------------------------------------------------------------------------- (d) flipping

class deterministic_kernels:
    """PyTorch's deterministic algorithms and cuDNN without autotuning inside the block (previous
    settings after). warn_only: AdaptiveMaxPool2d's CUDA backward is flagged for its atomic adds, but
    with one output per (example, channel) each input element receives at most one add, so the
    result does not depend on the order."""

    def __enter__(self):
        self.saved = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def __exit__(self, *exc):
        on, warn, det, bench = self.saved
        torch.use_deterministic_algorithms(on, warn_only=warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench


def part_flipping(cfg, data, budget):
    model, opt = fresh(cfg, data)
    every = torch.arange(data.n_train, device=data.device)
    steps = len(batch_order(every, cfg.batch_size, cfg.model_seed, 1))
    for e in range(1, cfg.flip_train_epochs + 1):
        train_epoch(model, data, every, opt, cfg, epoch=e, step0=(e - 1) * steps,
                    total_steps=cfg.flip_train_epochs * steps, desc="brief training")
    model.eval()
    with deterministic_kernels():
        with strict_fp32():
            fits = predict(model, data, "train", amp=False) == data.y_train
        order = candidates(data, fits, cfg.seed)
        picks = [i for pair in zip(order["noisy"][:cfg.flip_targets], order["clean"][:cfg.flip_targets]) for i in pair]
        if not picks:
            raise RuntimeError("no target: the briefly trained model fits no training example of each kind; "
                               "raise --flip_train_epochs")
        units = Units(model, cfg.unit, sample=data.batch(torch.tensor([0])))
        rows = graph_rows(model, data.batch(torch.arange(2)), flip_script.graph_budget(cfg.graph_gb, data.device))
        slots = cfg.flip_slots or flip_script.slots_for(0, torch.device("cuda"), rows,
                                                        max(cfg.n_eot, 1) * (1 + cfg.ref_batch))
        jobs = []
        for index in picks:
            idx = torch.cat([torch.tensor([index]), reference_batch(data.n_train, index, cfg.ref_batch, cfg.seed)])
            jobs.append((index, data.batch(idx), data.labels(idx), (cfg.seed, index)))
        # the batched search first (all targets, `slots` per forward), then the plain loop on as many of the
        # same targets as the budget leaves time for
        batched_s, found = timed(lambda: dict(flip_batched(model, units, iter(jobs), slots, cfg.max_units, cfg.n_eot,
                                                           cfg.eot_noise, cfg.objective)), data.device)
        plain, sequential_s, skipped = {}, 0.0, []
        for index, x, y, noise_key in jobs:
            if plain and budget.left() < 2 * sequential_s / len(plain):  # another would likely overrun
                skipped.append(f"target {index} (plain loop)")
                continue
            t, plain[index] = timed(lambda: flip_sequential(model, units, x, y, cfg.max_units, cfg.n_eot, cfg.eot_noise,
                                                            noise_key, cfg.objective, rows), data.device)
            sequential_s += t
        targets = [{"index": i, "kind": "noisy" if bool(data.noisy[i]) else "clean", "units": len(found[i].units),
                    "flipped": found[i].flipped, "identical": found[i] == plain[i]} for i in plain]
        if not all(t["identical"] for t in targets):
            bad = next(i for i in plain if found[i] != plain[i])
            raise AssertionError(f"target {bad}: the batched search zeroed {found[bad].units[:8]}..., "
                                 f"the plain loop {plain[bad].units[:8]}...")
    per_s = {"sequential": len(plain) / sequential_s, "batched": len(jobs) / batched_s}
    return {"ref_batch": cfg.ref_batch, "n_eot": cfg.n_eot, "eot_noise": cfg.eot_noise, "unit": cfg.unit,
            "objective": cfg.objective, "max_units": cfg.max_units, "units_in_model": len(units), "slots": slots,
            "graph_rows": rows, "targets": targets, "identical": all(t["identical"] for t in targets),
            "passed_over": sum(not found[i].units for i in found),
            "sequential_s": round(sequential_s, 3), "batched_s": round(batched_s, 3),
            "targets_per_s": {k: round(v, 3) for k, v in per_s.items()},
            "speedup": round(per_s["batched"] / per_s["sequential"], 2), "deterministic_kernels": True}, skipped


# ----------------------------------------------------------------------------- (e) precision

def part_precision(cfg, data, budget):
    every = torch.arange(data.n_train, device=data.device)
    steps = len(batch_order(every, cfg.batch_size, cfg.model_seed, 1))
    out, skipped = {"epochs": cfg.precision_epochs, "tf32_convolutions": torch.backends.cudnn.allow_tf32,
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}, []
    for name, amp in (("bf16", True), ("fp32", False)):
        if name == "fp32" and budget.left() < 2.5 * out["bf16"]["seconds"]:  # fp32 takes longer
            skipped.append("fp32")
            break
        c = copy.copy(cfg)
        c.amp = amp
        model, opt = fresh(c, data)

        def train():
            for e in range(1, c.precision_epochs + 1):
                train_epoch(model, data, every, opt, c, epoch=e, step0=(e - 1) * steps,
                            total_steps=c.precision_epochs * steps, desc=f"{name} epoch {e}")
        seconds = timed(train, data.device)[0]
        acc = accuracies(model, data, amp=amp)
        out[name] = {"seconds": round(seconds, 2), **{k: round(acc[k], 4) for k in ("clean", "noisy", "test")}}
    if "fp32" in out:
        out["test_bf16_minus_fp32"] = round(out["bf16"]["test"] - out["fp32"]["test"], 4)
        out["autocast_active"] = data.device.type == "cuda"  # elsewhere both runs are fp32
    return out, skipped


# ----------------------------------------------------------------------------- (f) torchrun

def child_error(output):
    """The line of a failed child's output that says why: its one-line error (common.cli), else the
    last exception line other than torchrun's own wrapper, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("error:")]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line]
    return (said[:1] or raised[-1:] or lines[-1:] or ["no output"])[0]


def part_torchrun(cfg, data, budget):
    script = "gradient_accounting.py"
    with tempfile.TemporaryDirectory(prefix="gpu_check_runs_") as runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script,
               str(REPO / PRESET), "--dataset=mnist_5k", "--epochs=1", f"--device={cfg.device}", "--download=False",
               f"--runs_dir={runs}", *cfg.torchrun_args]
        t0 = time.perf_counter()
        try:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {})}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=max(5.0, budget.left()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"torchrun did not finish within the budget ({budget.seconds:.0f} s)")
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {child_error(proc.stdout + proc.stderr)[:200]}")
        trained = sorted(p.relative_to(runs).as_posix() for p in Path(runs).glob("*/checkpoints/epoch_001.pt"))
        if not trained:
            raise RuntimeError("torchrun exited 0 but no run has a checkpoint of epoch 1")
    return {"command": " ".join(["torchrun", *cmd[3:]]).replace(runs, "<tmp>"), "seconds": round(seconds, 1),
            "checkpoint": trained[0]}, []


# ----------------------------------------------------------------------------- main

PART_FUNCTIONS = {"throughput": part_throughput, "accounting": part_accounting, "dropout": part_dropout,
                  "flipping": part_flipping, "precision": part_precision, "torchrun": part_torchrun}
SHOW = {
    "throughput": show_throughput,
    "accounting": lambda r: (f"step {r['step_ms']['plain']:.1f} ms plain; accounting x{r['accounting_over_plain']} "
                             f"(without control x{r['accounting_no_control_over_plain']})"),
    "dropout": lambda r: (f"step {r['step_ms']['plain']:.1f} ms plain; example-tied dropout "
                          f"x{r['dropout_over_plain']}"),
    "flipping": lambda r: (f"{len(r['targets'])} targets (batch 1+{r['ref_batch']}, n_eot {r['n_eot']}): identical "
                           f"{r['identical']}; batched ({r['slots']} per forward) x{r['speedup']} targets/s "
                           f"({r['targets_per_s']['sequential']:.2f} -> {r['targets_per_s']['batched']:.2f})"),
    "precision": lambda r: (f"{r['epochs']} epochs: bf16 test {r['bf16']['test']:.3f}" +
                            (f", fp32 test {r['fp32']['test']:.3f} ({r['bf16']['seconds']:.0f} s vs "
                             f"{r['fp32']['seconds']:.0f} s)" if "fp32" in r else "")),
    "torchrun": lambda r: f"1 epoch of gradient_accounting.py in {r['seconds']:.1f} s",
}


def one_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def parse_args(argv):
    """`--smoke` alone means --smoke=True; smoke sizes go between the preset and the user's arguments."""
    argv = ["--smoke=True" if a == "--smoke" else a for a in argv]
    smoke = any(a in ("--smoke=True", "--smoke=1") for a in argv)
    sizes = [f"--{k}={v!r}" for k, v in SMOKE.items()] if smoke else []
    cfg = config.parse(KNOBS, [str(REPO / PRESET), *sizes, *argv])
    # checked here, not with config.register_check, whose checks would also judge other scripts' keys
    if cfg.images not in IMAGES:
        raise UserError(f"unknown images {cfg.images!r}; valid: {', '.join(IMAGES)}")
    if not cfg.parts or not all(p in PARTS for p in cfg.parts):
        raise UserError(f"parts={cfg.parts!r} must list parts among {', '.join(PARTS)}; e.g. --parts=['throughput']")
    for key, lo in MINIMA.items():
        if getattr(cfg, key) < lo:
            raise UserError(f"{key}={getattr(cfg, key)!r} is below {lo}; pass --{key}=<{lo} or more>")
    return cfg


def main(argv=()):
    cfg = parse_args(list(argv))
    # Deterministic cuBLAS (the flipping part) needs its workspace setting before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # on a shared CPU, more threads than free cores can be ~100x slower
    out_path = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO / cfg.out
    writable_dir(out_path.parent, "out")  # before any work
    device = pick_device(cfg.device)
    cfg.device = str(device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once per shape (warm-ups run first)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpu_threads": torch.get_num_threads(), "smoke": cfg.smoke,
              "config": {k: v for k, v in vars(cfg).items() if not k.startswith("budget_")},
              "budgets_s": {p: getattr(cfg, f"budget_{p}") for p in PARTS}, "parts": {}}
    t_data = time.perf_counter()
    data, source = make_data(cfg, device)
    report["images"] = {"source": source, "train": data.n_train, "test": len(data.x_test),
                        "shape": list(data.x_train.shape[1:]), "noisy": int(data.noisy.sum()),
                        "seconds": round(time.perf_counter() - t_data, 1)}
    print(f"gpu_check on {report['gpu'] or device}, torch {torch.__version__}{' (smoke)' if cfg.smoke else ''}\n"
          f"images: {source}; {data.n_train} train x {tuple(data.x_train.shape[1:])}, {len(data.x_test)} test; "
          f"{cfg.model} width {cfg.width}, batch {cfg.batch_size}", flush=True)
    write_json(out_path, report)
    for name in cfg.parts:
        budget = Budget(getattr(cfg, f"budget_{name}"))
        entry = {"status": "ok", "reason": None, "budget_s": budget.seconds}
        print(f"[{name}] ...", flush=True)
        try:
            entry["result"], skipped = PART_FUNCTIONS[name](cfg, data, budget)
            if skipped:
                entry["status"], entry["reason"] = "partial", f"time budget: skipped {', '.join(skipped)}"
        except Exception as e:  # reported in the table; the other parts still run
            entry["status"], entry["reason"] = "failed", one_line(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        entry["seconds"] = round(budget.used(), 1)
        report["parts"][name] = entry
        write_json(out_path, report)  # after every part: a later crash loses nothing
        print(f"[{name}] {entry['status']} in {entry['seconds']} s", flush=True)
    print_table(report)
    print(f"wrote {out_path}")
    return report


def print_table(report):
    print(f"\n{'part':<11} {'status':<8} {'s':>6}  result")
    for name, e in report["parts"].items():
        text = SHOW[name](e["result"]) if "result" in e else ""
        if e["reason"]:
            text = f"{text}  [{e['reason']}]" if text else e["reason"]
        print(f"{name:<11} {e['status']:<8} {e['seconds']:>6.1f}  {text}")


def command(argv):
    """main, then exit status 1 if a part failed (after the table and the JSON)."""
    report = main(argv)
    if any(p["status"] == "failed" for p in report["parts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    from common import cli
    cli.run(command)
