"""Run directories, atomic files, checkpoints and the one-writer lock.

    runs/<dataset>_<model>_w<width>_noise<p>_seed<s>[_mseed<m>]_<hash>/
        (a readable prefix, then 8 hex digits of the SHA-256 of the whole identity: two configurations
        never share a directory, whatever defaults a script was edited to; the default run is
        mnist_5k_resnet9_w0.25_noise0.1_seed0_<hash>. A directory under the names of earlier releases,
        dataset_model[_w<width>]_noise<p>_seed<s>[_<key><value> ...], is still found and reused.)
        config.json             the training configuration that identifies the run
        labels.pt               noisy labels, true labels, noise mask (tensors)
        metrics.jsonl           one line per epoch: clean / noisy / test accuracy, loss, lr, time
        checkpoints/epoch_000.pt ... epoch_<E>.pt   model + optimizer state, epoch, config, metrics
        <experiment>.json, <experiment>_*.png      each experiment's numbers and figures

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under a valid name. Checkpoints load with torch.load(weights_only=True): plain
tensors and containers, never code.

Only one process trains a run: training holds an exclusive lock on `<run>/.lock` (fcntl.flock;
the kernel releases it when the process dies, so a dead process's lock is simply taken over). A
second process that needs the same run waits, says once which process it waits for, then reuses
the finished run.

Under torchrun only rank 0 writes (every write below is a no-op on the other ranks), and rank 0
alone opens the run directory and checks its labels (the others get its verdict).
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import distributed
from .cli import UserError
from . import config
from .config import train_config

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- atomic files

def writable_dir(path, knob="runs_dir"):
    """Create `path` (and parents) or fail with one line naming the knob to change."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"cannot write to {path} ({e.strerror or e}); pass --{knob}=<a writable directory>")
    return path


def atomic_write(path, data):
    """Write `data` (bytes, str, or a function writing to a binary file) to `path` through a temporary
    file renamed into place: a crash never leaves a half-written file under a valid name."""
    if not distributed.is_main():  # rank 0 writes the one copy
        return
    path = Path(path)
    writable_dir(path.parent, "runs_dir" if path.suffix != ".md" else "reports_dir")
    write = data if callable(data) else (lambda f: f.write(data.encode() if isinstance(data, str) else data))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); check the directory's permissions and free space")
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def sole_writer(directory, knob):
    """Exclusive right to write `directory` (a lock file in it) for the block; held by another process:
    one line naming it and the knob to change, instead of two writers clobbering each other's files."""
    path = writable_dir(directory, knob) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{directory} is being written by process {f.read().strip() or '?'}; wait for it or "
                            f"pass another --{knob}")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it to recompute it")


def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_tensors(path, obj):
    """torch.save atomically (dicts of tensors and plain values only)."""
    atomic_write(path, lambda f: torch.save(obj, f))


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

def _safe(text):
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(text)).strip("._") or "_"


def _empty(value):
    return value is None or value is False or (isinstance(value, (str, list, tuple)) and len(value) == 0)


def identity_hash(ident):
    """8 hex digits of the SHA-256 of an identity (JSON, sorted keys). Keys with an empty value (None,
    "", False, []) are left out, so a key added later with an empty default keeps every name; a float
    key given as an int (width=1) hashes as the float it is."""
    defaults = config.identity_defaults()
    norm = {k: float(v) if isinstance(defaults.get(k), float) and type(v) is int else v
            for k, v in ident.items() if not _empty(v)}
    return hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:8]


def _prefix(cfg):
    data = cfg.dataset
    if data.startswith("npz:"):
        data = "npz-" + _safe(Path(data[4:]).stem)
    from . import models
    return [data, getattr(models, "model_tag", _safe)(cfg.model)]


def run_name(cfg):
    """<dataset>_<model>_w<width>_noise<p>_seed<s>[_mseed<m>][_from-<dir>]_<hash of the whole identity>."""
    parts = _prefix(cfg) + [f"w{cfg.width:g}", f"noise{cfg.noise:g}", f"seed{cfg.seed}"]
    if cfg.model_seed != cfg.seed:
        parts.append(f"mseed{cfg.model_seed}")
    if getattr(cfg, "init_from", ""):  # the user's own weights: say whose, readably
        parts.append("from-" + _safe(Path(str(cfg.init_from).rstrip("/*")).name))
    return "_".join(parts + [identity_hash(train_config(cfg))])


# The names of earlier releases: every identity key that differs from the shared defaults, tagged.
LEGACY_TAGS = {"width": "w", "epochs": "e", "batch_size": "bs", "lr": "lr", "schedule": "", "warmup": "wu",
               "momentum": "mom", "weight_decay": "wd", "augment": "", "precision": "", "init_from": "from-"}


def legacy_name(cfg):
    """dataset_model[_w<width>]_noise<p>_seed<s>[_mseed<m>][_<key><value> ...] (earlier releases)."""
    def tag(key, value):
        if isinstance(value, bool):
            return key if value else f"no{key}"
        if key == "init_from":
            value = Path(str(value).rstrip("/*")).name
        t = LEGACY_TAGS.get(key, key)
        return f"{t}{value:g}" if isinstance(value, float) else f"{t}{_safe(value)}"
    ident, defaults = train_config(cfg), config.identity_defaults()
    parts = _prefix(cfg)
    if ident.get("width", defaults["width"]) != defaults["width"]:
        parts.append(tag("width", ident["width"]))
    parts += [f"noise{cfg.noise:g}", f"seed{cfg.seed}"]
    if cfg.model_seed != cfg.seed:
        parts.append(f"mseed{cfg.model_seed}")
    named = {"dataset", "model", "width", "noise", "seed", "model_seed"}
    parts += [tag(k, v) for k, v in ident.items() if k not in named and v != defaults.get(k)]
    return "_".join(parts)


def run_dir(cfg):
    """runs/<run_name>, or the directory of an earlier release's name when it holds this very run."""
    root = runs_root(cfg)
    new, old = root / run_name(cfg), root / legacy_name(cfg)
    if not new.exists() and (old / "config.json").is_file():
        saved = config.with_identity_defaults(read_json(old / "config.json"))
        if all(saved.get(k) == v for k, v in train_config(cfg).items()):
            return old
    return new


def runs_root(cfg):
    root = Path(cfg.runs_dir)
    return root if root.is_absolute() else REPO / root


_HELD = set()  # run directories whose lock this process holds


class Run:
    """A run directory: the identity check, labels, checkpoints and metrics of one trained model."""

    def __init__(self, cfg, directory=None, extra_keys=()):
        """`directory` defaults to run_dir(cfg); `extra_keys` of cfg join the identity (e.g. a
        variant's dropout settings) besides the training keys."""
        self.cfg = cfg
        self.dir = Path(directory) if directory else run_dir(cfg)
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
        old = config.with_identity_defaults(read_json(saved))
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
        writable_dir(self.dir)
        write_json(self.path("config.json"), self.config)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive right to train this run (re-entrant in a process; rank 0 only under torchrun).
        Another process holding it: say once that we wait for it, then wait."""
        key = str(self.dir)
        if not distributed.is_main() or key in _HELD:  # the other ranks follow rank 0; a nested hold
            yield
            return
        path = writable_dir(self.dir) / ".lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                print(f"{self.dir.name} is being trained by process {holder}: waiting for it to finish", flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)

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
        saved = config.with_identity_defaults(ckpt.get("config", {}))
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
