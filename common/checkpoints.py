"""Bring your own checkpoints: analyze a model trained elsewhere (the shared knob `init_from`).

`init_from` names the user's per-epoch state dicts: a directory (every *.pt, *.pth, *.ckpt, *.bin
file in it whose name carries an epoch; other files are ignored) or a glob pattern (every match
must carry one). The epoch is read from the file name (EPOCH_RE, case-insensitive, the last match
counts):

    epoch_3.pt  epoch3.pt  epoch-03.pth  ckpt-epoch=03.ckpt  model_e3.pth  resnet_ep3.pt  3.pt  003.pt

Epoch 0 is the initialization (rewinding to it and layer retraining need it); epoch E, the largest,
is the final model and must equal the `epochs` knob. A file is loaded with torch.load(weights_only=True)
and holds a plain state dict, or a dict with a "state_dict", "model" or "model_state_dict" entry
holding one. Its keys may be the raw module's (as saved by `model.state_dict()` in the user's own
loop), ours (wrapped: "net." before them), or either with the prefixes "module." (DataParallel /
DistributedDataParallel), "_orig_mod." (torch.compile) or "model." (e.g. PyTorch Lightning). A file
that does not fit the model is refused with one line naming the first mismatching key.

`ImportedRun` is a run directory (config.json, labels.pt, the experiments' results) whose
checkpoints are read from the user's files instead of <run>/checkpoints/: nothing is copied, and
nothing is trained here. sources.json records which file gave which epoch (size, modification
time); a directory that analyzed other versions of the files is refused (or, with overwrite, moved
aside), so results resumed by an experiment never mix two models.
"""
import glob
import os
import re
import shutil
import time
from pathlib import Path

import torch

from . import distributed
from .cli import UserError
from .runs import Run, read_json, write_json

SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# "epoch", "ep" or "e" (not inside a word), an optional _ - = separator, the digits; or a name of digits only.
EPOCH_RE = re.compile(r"(?:^|[^a-z])(?:epoch|ep|e)[_=-]?(\d+)(?!\d)")
ENTRIES = ("state_dict", "model", "model_state_dict")  # where a wrapped state dict may sit
PREFIXES = ("module.", "_orig_mod.", "model.")          # added by DDP, torch.compile, Lightning


def epoch_of(name):
    """The epoch in a checkpoint's file name, or None."""
    stem = Path(name).name
    for suffix in SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    if stem.isdigit():
        return int(stem)
    found = EPOCH_RE.findall(stem.lower())
    return int(found[-1]) if found else None


def find(spec):
    """{epoch: path} of the user's checkpoints named by `spec` (a directory or a glob pattern)."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIXES))
        named = [(epoch_of(p.name), p) for p in files]
        named = [(e, p) for e, p in named if e is not None]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if Path(p).is_file())
        if not files:
            raise UserError(f"init_from={spec!r}: no such directory and no file matches it; give the directory "
                            f"of your per-epoch state dicts or a glob such as 'ckpts/epoch_*.pt'")
        named = [(epoch_of(p.name), p) for p in files]
        nameless = [p for e, p in named if e is None]
        if nameless:
            raise UserError(f"init_from: no epoch in the file name {nameless[0].name!r}; name the files like "
                            f"epoch_3.pt, ckpt-epoch=03.pt or model_e3.pth, or narrow the glob")
    if not named:
        raise UserError(f"init_from={spec!r}: no checkpoint file with an epoch in its name (.pt, .pth, .ckpt or .bin, "
                        f"named like epoch_3.pt, ckpt-epoch=03.pt or model_e3.pth)")
    out = {}
    for epoch, p in named:
        if epoch in out:
            raise UserError(f"init_from: two files for epoch {epoch} ({out[epoch].name}, {p.name}); keep one per epoch")
        out[epoch] = p
    return dict(sorted(out.items()))


def state_dict_of(obj, path):
    """The state dict inside a loaded checkpoint: the object itself, or its ENTRIES entry."""
    if isinstance(obj, dict):
        for key in ENTRIES:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} holds no state dict (a dict of tensors, or one under "
                    f"{' / '.join(repr(k) for k in ENTRIES)}); save model.state_dict()")


def key_map(keys, own, base):
    """{user key: model key} renaming the user's keys onto the model's, or None when no renaming
    fits: the user's prefixes (PREFIXES, in any order) removed, then `base` (the model's root
    prefix, e.g. "net.") added where the user saved the raw module."""
    keys, own = list(keys), set(own)
    stripped = [""]
    for _ in range(len(PREFIXES)):  # combinations like module._orig_mod.
        stripped += [s + p for s in stripped for p in PREFIXES if s + p not in stripped]
    for strip in stripped:
        if not all(k.startswith(strip) for k in keys):
            continue
        for add in ("", base):
            mapped = {k: add + k[len(strip):] for k in keys}
            if set(mapped.values()) == own:
                return mapped
    return None


def _first_mismatch(keys, own, base):
    """The first key that keeps the closest renaming from fitting, as 'missing X' / 'unexpected Y'."""
    best = None
    for strip in ("",) + PREFIXES:
        for add in ("", base):
            mapped = {add + k[len(strip):] if k.startswith(strip) else k for k in keys}
            score = len(mapped & set(own))
            if best is None or score > best[0]:
                best = (score, mapped)
    mapped = best[1]
    missing = [k for k in own if k not in mapped]
    extra = sorted(mapped - set(own))
    if missing:
        return f"model key {missing[0]} is missing" + (f" (the file has {extra[0]}, not in the model)" if extra else "")
    return f"{extra[0]} is not in the model"


def fit(state, model, path):
    """The user's state dict renamed onto `model`'s keys (tensors unchanged), or UserError naming
    the first mismatching key or shape."""
    from .models import root
    own = model.state_dict()
    base, _ = root(model)
    mapping = key_map(state, own, base)
    if mapping is None:
        raise UserError(f"checkpoint {path} does not fit --model: {_first_mismatch(state, own, base)}; "
                        f"give the checkpoints of this architecture (and --dataset's channels and classes)")
    out = {mapping[k]: v for k, v in state.items()}
    for k, t in own.items():
        if tuple(out[k].shape) != tuple(t.shape):
            raise UserError(f"checkpoint {path} does not fit --model: {k} has shape {tuple(out[k].shape)}, the model "
                            f"{tuple(t.shape)}; give the checkpoints of this architecture and --dataset")
    return {k: out[k] for k in own}  # the model's order


def load(path, model, mmap=False):
    """One of the user's checkpoint files as a state dict with `model`'s keys (`mmap`: tensors read
    from the file only when used, enough to check keys and shapes)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) file
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be loaded safely with torch.load(weights_only=True) (truncated, "
                        f"corrupt or not plain tensors: {reason}); re-save it with torch.save(model.state_dict(), path)")
    return fit(state_dict_of(obj, path), model, path)


class ImportedRun(Run):
    """A run whose checkpoints are the user's files (init_from): epochs, paths and model states
    come from them, renamed onto the configured model; everything else is a Run's."""

    def __init__(self, cfg, model):
        """`model`: the configured model (its keys and shapes are what the files must fit)."""
        super().__init__(cfg)
        self.files = find(cfg.init_from)
        self.model = model
        last = max(self.files)
        if last != cfg.epochs:
            raise UserError(f"init_from has epochs {_epochs(self.files)}, the last is {last}, but epochs={cfg.epochs}; "
                            f"pass --epochs={last} (the final model is the last epoch)")

    def ckpt_path(self, epoch):
        return self.files.get(epoch, Path(self.cfg.init_from) / f"epoch_{epoch}.pt")

    def saved_epochs(self):
        return list(self.files)

    def is_complete(self):
        return True

    def load_checkpoint(self, epoch):
        if epoch not in self.files:
            raise UserError(f"init_from has no checkpoint for epoch {epoch} (has {_epochs(self.files)})"
                            + ("; epoch 0 is the initialization: save it before training" if epoch == 0 else ""))
        return {"model": load(self.files[epoch], self.model), "epoch": epoch, "config": self.config, "metrics": {}}

    def save_checkpoint(self, *args, **kwargs):
        raise UserError(f"run {self.dir.name} analyzes the checkpoints of init_from; it is not trained here "
                        f"(drop --init_from to train the model here)")

    def sources(self):
        return {"init_from": self.cfg.init_from, "checkpoints": {
            str(e): {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime": p.stat().st_mtime}
            for e, p in self.files.items()}}

    def check_files(self):
        """Every file fits the model (keys and shapes; read lazily): errors before anything is written."""
        for path in self.files.values():
            load(path, self.model, mmap=True)

    def changed_sources(self):
        """What differs from the files whose results this run directory holds (sources.json), or None."""
        path = self.path("sources.json")
        results = [p for p in self.dir.glob("*.json") if p.name not in ("config.json", "sources.json")]
        if not path.is_file() or not results:
            return None
        old, now = read_json(path)["checkpoints"], self.sources()["checkpoints"]
        for e in sorted(set(old) | set(now), key=int):
            if old.get(e) != now.get(e):
                return f"epoch {e}: " + ("new" if e not in old else "gone" if e not in now else
                                         f"{Path(now[e]['path']).name} changed")
        return None

    def open_sources(self, overwrite=False):
        """Open the run directory for these files: results of other (or changed) files are never mixed
        in; with `overwrite` such a directory is moved aside. Writes sources.json."""
        changed = self.changed_sources()
        if changed and not overwrite:
            raise UserError(f"the checkpoints of init_from changed since {self.dir} analyzed them ({changed}); pass "
                            f"--overwrite=True to move that directory aside and start over")
        if changed:
            aside = self.dir.with_name(f"{self.dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(self.dir), str(aside))
            print(f"moved the old run aside to {aside}")
        self.open(overwrite=overwrite)
        write_json(self.path("sources.json"), self.sources())


def _epochs(files):
    e = sorted(files)
    return f"{e[0]}..{e[-1]}" if e == list(range(e[0], e[-1] + 1)) and len(e) > 2 else str(e)


def imported_run(cfg, data):
    """trained_run for init_from: (model, data, run) with the final model loaded from the user's files;
    `data` is the loaded dataset (trained_run loads it on its device)."""
    from .models import model_for
    from .precision import set_deterministic
    set_deterministic(getattr(cfg, "deterministic", False))
    model = model_for(cfg, data)
    run = ImportedRun(cfg, model)
    run.check_files()
    with run.lock():
        distributed.on_main(run.open_sources, getattr(cfg, "overwrite", False))
        run.save_labels(data)
    run.load_model(model, cfg.epochs)
    return model, data, run
