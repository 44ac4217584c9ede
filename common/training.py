"""One training loop for every script: SGD, lr schedules, checkpoints every epoch, exact resume.

Randomness is local and derived from cfg.model_seed and the epoch (batch order, augmentation,
dropout), so resuming after the last complete epoch continues exactly as an uninterrupted run.

Hook: `backward(losses, idx)` replaces `losses.mean().backward()`; it receives the per-example
losses of the batch and their example indices and must leave in `.grad` the gradient of
`losses.mean()` (gradient accounting splits it into clean and noisy parts).

Under torchrun (common/distributed.py) `batch_size` is the global batch: each rank trains on its
slice of every batch, and the hook gets that slice's losses multiplied by b/B (b of the B examples
of the batch are this rank's), so that `losses.mean()` is the rank's share of the batch mean; the
ranks' gradients are summed after the hook. A hook must run the same collectives (e.g. the same
number of backward passes through synced BatchNorm) on every rank.
"""
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm  # tqdm.write: a line that does not break a progress bar

from . import config, distributed
from .cli import UserError, progress
from .data import load_data
from .evaluation import accuracies
from .precision import autocast, set_deterministic
from .models import model_for
from .rng import derive_seed, generator
from .runs import Run

SCHEDULES = ("cosine", "triangle", "constant")
config.choice_check("schedule", SCHEDULES)
config.range_check("lr", 0, None, lo_open=True)
config.range_check("epochs", 1, None)
config.range_check("batch_size", 1, None)
config.range_check("warmup", 0, 1)
config.range_check("momentum", 0, 1, hi_open=True)
config.range_check("weight_decay", 0, None)
config.register_check("device", lambda v, cfg: None if v in ("auto", "cpu", "mps") or v == "cuda" or v.startswith("cuda:")
                      else f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N, mps")


def pick_device(name="auto"):
    """cuda > mps > cpu for 'auto'; a named device must exist.

    Under torchrun: also starts the process group and returns this rank's device (cuda:LOCAL_RANK)."""
    return distributed.setup(_pick_device(name))


def _pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here; use --device=auto or --device=cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device 'mps' requested but not available here; use --device=auto or --device=cpu")
    return dev


def lr_factor(progress, schedule, warmup):
    """Multiplier of the peak lr at `progress` in [0, 1] of training.

    cosine: linear warm-up over `warmup`, then cosine to 0; triangle: linear up to the peak at
    `warmup`, then linear down to 0 (one-cycle); constant: 1."""
    if schedule == "constant":
        return 1.0
    if progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / max(1e-12, 1 - warmup)
    return 0.5 * (1 + math.cos(math.pi * rest)) if schedule == "cosine" else 1 - rest


def make_optimizer(params, cfg):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batch_order(indices, batch_size, seed, epoch):
    """This epoch's minibatches of `indices`: a seeded permutation, last partial batch kept (unless size 1)."""
    perm = indices[torch.randperm(len(indices), generator=generator(seed, "batches", epoch)).to(indices.device)]
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on a single example
        batches.pop()
    return batches


def train_epoch(model, data, indices, optimizer, cfg, epoch, step0=0, total_steps=None, backward=None,
                seed=None, desc="train", on_batch=None):
    """One epoch over `indices` (training examples) with the lr schedule; returns the mean loss.

    `step0`/`total_steps` place the epoch in the schedule; `seed` (default cfg.model_seed) drives
    batch order, augmentation and dropout; `on_batch(idx)` observes each batch's indices.

    Under torchrun: the same global batches and schedule; this rank trains on its slice of each, on
    its share of the batch mean loss, and the gradients are summed over the ranks (by DDP when
    `model` is wrapped and there is no hook, else by one all-reduce after the backward). In a single
    process the slice is the whole batch and every collective is a no-op."""
    seed = cfg.model_seed if seed is None else seed
    batches = batch_order(indices, cfg.batch_size, seed, epoch)
    world = distributed.world_size()
    if min(len(b) for b in batches) < world:
        raise UserError(f"batch_size={cfg.batch_size} leaves a batch of {min(len(b) for b in batches)} examples, fewer "
                        f"than the {world} processes; choose a batch_size whose last batch "
                        f"({len(indices)} mod batch_size) is 0 or at least {world}")
    total_steps = total_steps or len(batches)
    aug_gen = generator(seed, "augment", epoch)
    augment, amp = getattr(cfg, "augment", False), getattr(cfg, "amp", True)
    net, model = model, distributed.unwrap(model)
    distributed.sync_batchnorm_(model)
    ddp = net is not model and backward is None
    devices = [data.device.index or 0] if data.device.type == "cuda" else []
    # Dropout randomness per (seed, epoch), and per rank (the ranks' examples differ); caller's RNG untouched.
    dropout_seed = derive_seed(seed, "dropout", epoch, *(("rank", distributed.rank()) if distributed.active() else ()))
    net.train()
    loss_sum = torch.zeros((), device=data.device)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(dropout_seed)
        for i, idx in enumerate(progress(batches, every=60, desc=desc, leave=False, disable=not distributed.is_main())):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor((step0 + i) / total_steps, cfg.schedule, cfg.warmup)
            if on_batch:
                on_batch(idx)
            lo, hi = distributed.shard_bounds(len(idx))
            mine = idx[lo:hi]  # global example indices
            if augment:  # the global batch's augmentation draws, as in one process; then this rank's rows
                x = data.batch(idx, augment=True, gen=aug_gen)[lo:hi]
            else:
                x = data.batch(mine)
            y = data.labels(mine)
            optimizer.zero_grad(set_to_none=True)
            with autocast(data.device, amp):
                logits = (net if ddp else model)(x, index=mine)
            losses = F.cross_entropy(logits.float(), y, reduction="none")
            shares = losses * (len(mine) / len(idx)) if distributed.active() else losses  # .mean() = sum(local) / B
            if backward is None:
                shares.mean().backward()
            else:
                backward(shares, mine)
            if not ddp:
                distributed.all_reduce_grads(model.parameters())
            optimizer.step()
            loss_sum += losses.detach().sum()
    return float(distributed.all_reduce_sum_(loss_sum)) / sum(len(b) for b in batches)


def train_run(cfg, data=None, backward=None, on_epoch=None, restart_from=None, quiet=False, model=None, run=None):
    """Train the configured run in its run directory, resuming after the last complete epoch.

    Saves checkpoints at initialization and after every epoch and one metrics line per epoch.
    `on_epoch(epoch)` may return a dict stored with that epoch's metrics (inside the checkpoint, so
    a crash cannot separate them). `restart_from=k` recomputes epochs after k even if saved.
    `model` (freshly initialized) and `run` replace the configured ones (e.g. a dropout variant in
    its own directory). Returns (model, data, run) with the final weights loaded.

    Under torchrun every rank runs this; rank 0 alone decides on and writes the run directory.
    Holds the run's lock throughout: one process trains a run directory at a time.
    """
    if getattr(cfg, "init_from", ""):
        raise UserError(f"init_from={cfg.init_from!r}: this experiment trains its models here; the user's own "
                        f"checkpoints serve layer_rewinding, layer_retraining and neuron_flipping (drop --init_from)")
    run = run or Run(cfg)
    with run.lock():
        return _train_run(cfg, data, backward, on_epoch, restart_from, quiet, model, run)


def _train_run(cfg, data, backward, on_epoch, restart_from, quiet, model, run):
    set_deterministic(getattr(cfg, "deterministic", False))
    device = pick_device(cfg.device)
    quiet = quiet or not distributed.is_main()
    amp = getattr(cfg, "amp", True)
    data = data or load_data(cfg, device)
    model = model or model_for(cfg, data)  # first: a model that cannot be built leaves no run files behind
    run.open(overwrite=getattr(cfg, "overwrite", False))
    run.save_labels(data)
    optimizer = make_optimizer(model.parameters(), cfg)
    saved = distributed.on_main(run.saved_epochs)  # one listing for all ranks
    if 0 not in saved:
        run.save_checkpoint(0, model, optimizer, {"epoch": 0, **accuracies(model, data, amp=amp)})
        saved = [0]
    distributed.barrier()  # checkpoint 0 is on disk before any rank loads it
    start = max(saved) if restart_from is None else restart_from
    start = min(start, cfg.epochs)
    ckpt = run.load_checkpoint(start)
    run.load_model(model, start)
    optimizer.load_state_dict(ckpt["optimizer"])
    # Rows by epoch: a restart replaces the rows of re-trained epochs one by one and keeps the later
    # ones meanwhile, so an interrupted restart never leaves a complete run with missing rows.
    rows = {r["epoch"]: r for r in run.metrics()}
    rows[start] = ckpt["metrics"]
    steps_per_epoch = len(batch_order(torch.arange(data.n_train), cfg.batch_size, cfg.model_seed, 0))
    if start < cfg.epochs and not quiet:
        ranks = f" x {distributed.world_size()} processes" if distributed.active() else ""
        print(f"training {run.dir.name} on {device}{ranks}: epochs {start + 1}..{cfg.epochs}")
    net = distributed.wrap(model) if backward is None else model  # DDP under torchrun, else `model`
    clock = None if quiet else cost_clock(cfg.epochs - start, steps_per_epoch, device)
    t_train = time.time()
    for epoch in progress(range(start + 1, cfg.epochs + 1), desc="epochs", disable=quiet or not sys.stderr.isatty()):
        t0 = time.time()
        loss = train_epoch(net, data, torch.arange(data.n_train, device=data.device), optimizer, cfg, epoch,
                           step0=(epoch - 1) * steps_per_epoch, total_steps=cfg.epochs * steps_per_epoch,
                           backward=backward, desc=f"epoch {epoch}", on_batch=clock if epoch == start + 1 else None)
        metrics = {"epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"], **accuracies(model, data, amp=amp),
                   "seconds": round(time.time() - t0, 3)}
        if on_epoch:
            metrics.update(on_epoch(epoch) or {})
        run.save_checkpoint(epoch, model, optimizer, metrics)
        rows[epoch] = metrics
        run.write_metrics([rows[e] for e in sorted(rows)])
        if not quiet:
            left = (time.time() - t_train) / (epoch - start) * (cfg.epochs - epoch)
            tqdm.write(f"epoch {epoch:3d}  loss {loss:.3f}  clean {metrics['clean']:.3f}  "
                       f"noisy {metrics['noisy']:.3f}  test {metrics['test']:.3f}  ({metrics['seconds']:.0f}s"
                       + (f"; ~{duration(left)} left)" if epoch < cfg.epochs else ")"))
    run.write_metrics([rows[e] for e in sorted(rows)])
    if start == cfg.epochs:
        run.load_model(model, cfg.epochs)
    distributed.barrier()  # rank 0's files are complete before any rank reads them
    return model, data, run


def duration(seconds):
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def cost_clock(epochs, steps_per_epoch, device, warm=1, timed=3):
    """An on_batch hook for the first epoch trained: after `warm` + `timed` steps it prints, once, what
    the training steps of all `epochs` will take at the measured pace (before the long part starts)."""
    stamps = []

    def on_batch(idx):
        stamps.append(time.time())
        if len(stamps) == warm + timed + 1 and epochs * steps_per_epoch > 2 * len(stamps):
            per_step = (stamps[-1] - stamps[warm]) / timed
            tqdm.write(f"expected: about {duration(per_step * epochs * steps_per_epoch)} of training for {epochs} "
                       f"epochs on {device} (measured on {timed} steps; each epoch's evaluation adds to it)")
    return on_batch


def trained_run(cfg, data=None, quiet=False):
    """The configured run's final model (training it first if the run is not complete; if another
    process is training it, waiting for that process and reusing its run).

    Returns (model, data, run); `data` defaults to the configured dataset (tests pass a subset).
    With init_from: the user's own checkpoints, nothing trained (common/checkpoints.py)."""
    if getattr(cfg, "init_from", ""):
        from .checkpoints import imported_run
        return imported_run(cfg, data or load_data(cfg, pick_device(cfg.device)))
    run = Run(cfg)
    if not distributed.on_main(run.is_complete):
        with run.lock():
            if not distributed.on_main(run.is_complete):  # nobody finished it while we waited
                if not quiet:
                    print(f"{run.dir} has no finished run yet: training it first")
                return train_run(cfg, data=data, quiet=quiet, run=run)
    set_deterministic(getattr(cfg, "deterministic", False))
    distributed.on_main(run.check_config)
    data = data or load_data(cfg, pick_device(cfg.device))
    run.save_labels(data)
    model = model_for(cfg, data)
    run.load_model(model, cfg.epochs)
    return model, data, run
