"""Run directories, atomic files and checkpoints.

    runs/<dataset>_<model>_noise<p>_seed<s>/     (`_mseed<m>` added when model_seed != seed)
        config.json             the training configuration that identifies the run
        labels.pt               noisy labels, true labels, noise mask (tensors)
        metrics.jsonl           one line per epoch: clean / noisy / test accuracy, loss, lr, time
        checkpoints/epoch_000.pt ... epoch_<E>.pt   model + optimizer state, epoch, config, metrics
        <experiment>.json, <experiment>_*.png      each experiment's numbers and figures

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a valid name. Checkpoints load with torch.load(weights_only=True): plain
tensors and containers, never code.

Under torchrun only rank 0 writes (every write below is a no-op on the other ranks), and rank 0
alone opens the run directory and checks its labels (the others get its verdict).
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import distributed
from .cli import UserError
from .config import train_config

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- atomic files

def _atomic(path, write):
    if not distributed.is_main():  # rank 0 writes the one copy
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it to recompute it")


def write_jsonl(path, rows):
    _atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path):
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_tensors(path, obj):
    """torch.save atomically (dicts of tensors and plain values only)."""
    _atomic(path, lambda f: torch.save(obj, f))


def load_tensors(path, what="checkpoint"):
    """torch.load(weights_only=True) with one clear error for a missing, truncated or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} cannot be loaded safely (truncated, corrupt or not a plain-tensor "
                        f"file: {reason[:160]}); delete it and re-run to recreate it")


def load_state(model, state, source):
    """model.load_state_dict with one clear error when the checkpoint is from another model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                  else f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, model has {tuple(own[shapes[0]].shape)}")
        raise UserError(f"{source} is from another model or configuration ({detail}); "
                        f"use the run directory that matches --model/--width/--dataset")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- run directories

def run_name(cfg):
    data = cfg.dataset
    if data.startswith("npz:"):
        data = "npz-" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(data[4:]).stem)
    name = f"{data}_{cfg.model}_noise{cfg.noise:g}_seed{cfg.seed}"
    return name if cfg.model_seed == cfg.seed else f"{name}_mseed{cfg.model_seed}"


def runs_root(cfg):
    root = Path(cfg.runs_dir)
    return root if root.is_absolute() else REPO / root


class Run:
    """A run directory: the identity check, labels, checkpoints and metrics of one trained model."""

    def __init__(self, cfg, directory=None, extra_keys=()):
        """`directory` defaults to runs/<run_name>; `extra_keys` of cfg join the identity (e.g. a
        variant's dropout settings) besides the training keys."""
        self.cfg = cfg
        self.dir = Path(directory) if directory else runs_root(cfg) / run_name(cfg)
        self.config = {**train_config(cfg), **{k: getattr(cfg, k) for k in extra_keys}}

    def path(self, name):
        return self.dir / name

    def ckpt_path(self, epoch):
        return self.dir / "checkpoints" / f"epoch_{epoch:03d}.pt"

    def saved_epochs(self):
        d = self.dir / "checkpoints"
        return sorted(int(m.group(1)) for p in d.glob("epoch_*.pt") if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))) \
            if d.is_dir() else []

    def is_complete(self):
        return self.ckpt_path(self.config["epochs"]).is_file()

    def check_config(self):
        """Refuse a directory trained with a different configuration (nothing is touched)."""
        saved = self.path("config.json")
        if not saved.is_file():
            return
        old = read_json(saved)
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in self.config.items() if old.get(k) != v]
        if diff:
            raise UserError(f"run directory {self.dir} holds a run with another configuration ({'; '.join(diff[:3])}); "
                            f"pass --overwrite=True to replace it (the old one is moved aside), or use another --runs_dir")

    def open(self, overwrite=False):
        """Create (or re-open) the directory for training: check or replace, then write config.json."""
        distributed.on_main(self._open, overwrite)
        return self

    def _open(self, overwrite):
        if overwrite and self.dir.exists():
            try:
                self.check_config()
            except UserError:
                aside = self.dir.with_name(f"{self.dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(self.dir), str(aside))
                print(f"moved the old run aside to {aside}")
        self.check_config()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path("config.json"), self.config)

    def save_labels(self, data):
        """Save the noise mask and both label arrays; refuse if a previous run saved different ones."""
        distributed.on_main(self._save_labels, data)

    def _save_labels(self, data):
        labels = {"y_train": data.y_train.cpu(), "y_true": data.y_true.cpu(), "noisy": data.noisy.cpu()}
        path = self.path("labels.pt")
        if path.is_file():
            old = load_tensors(path, "labels file")
            if set(old) != set(labels) or any(not torch.equal(old[k], labels[k]) for k in labels):
                raise UserError(f"{path} does not match the data loaded now (the dataset files changed?); "
                                f"pass --overwrite=True to retrain, or restore the original data")
            return
        save_tensors(path, labels)

    def load_checkpoint(self, epoch):
        ckpt = load_tensors(self.ckpt_path(epoch))
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise UserError(f"checkpoint {self.ckpt_path(epoch)} is not one of ours (no model state); "
                            f"delete it and re-run to recreate it")
        saved = ckpt.get("config", {})
        diff = [k for k, v in self.config.items() if k != "epochs" and saved.get(k) != v]
        if diff:
            raise UserError(f"checkpoint {self.ckpt_path(epoch)} is from another configuration "
                            f"({diff[0]}: {saved.get(diff[0])!r}, expected {self.config[diff[0]]!r}); "
                            f"use its own run directory or pass --overwrite=True")
        return ckpt

    def load_model(self, model, epoch):
        """Load the model weights of checkpoint `epoch` into `model` (in place); returns the model."""
        load_state(model, self.load_checkpoint(epoch)["model"], self.ckpt_path(epoch))
        return model

    def save_checkpoint(self, epoch, model, optimizer, metrics):
        save_tensors(self.ckpt_path(epoch), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "config": self.config, "metrics": metrics, "rng": torch.get_rng_state()})

    def prune_checkpoints(self, keep):
        """Delete every checkpoint whose epoch is not in `keep` (only for a complete run)."""
        if not self.is_complete() or not distributed.is_main():
            return
        for epoch in self.saved_epochs():
            if epoch not in keep:
                self.ckpt_path(epoch).unlink()

    def metrics(self):
        return read_jsonl(self.path("metrics.jsonl"))

    def write_metrics(self, rows):
        write_jsonl(self.path("metrics.jsonl"), rows)
