"""Datasets with noisy labels. The mislabeled training examples are the ones a network must memorize.

The memorized set (knob `memorized`): the mislabeled examples (noisy, the default), the clean examples
that are atypical (a hold-out score below ATYPICAL_BELOW, from the dataset's scores file (scores_path),
written by memorization_scores.py) with no label noise (atypical), or both kinds together (both).
`Data.noisy` is that set; `Data.kind` names each training example's kind (KINDS).

Every dataset is held as uint8 tensors (N, C, H, W) -- on the training device when it fits -- and
batched by indexing, so there is no per-sample PIL work. Training batches come with their example
indices: the experiments need to know which examples are noisy, and example-tied dropout ties masks
to indices.
"""
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config
from .cli import UserError
from .rng import generator

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = REPO / "data"
# Where Debian's package dataset-fashion-mnist puts the IDX files (a system location, not ours).
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist_5k", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
HOLDOUT = 0.2  # test fraction of a stratified split, for datasets shipped without a test split

config.register_check("dataset", lambda v, cfg: None if v in DATASETS or v.startswith("npz:") else
                      f"unknown dataset {v!r}; valid: {', '.join(DATASETS)}, npz:PATH")
config.range_check("noise", 0, 1, hi_open=True)

MEMORIZED = ("noisy", "atypical", "both")  # what the network must memorize (knob `memorized`)
KINDS = ("typical", "mislabeled", "atypical")  # Data.kind codes 0, 1, 2: typical clean, mislabeled, atypical clean
ATYPICAL_BELOW = 0.5  # atypical: a clean example whose hold-out score is below this (the authors' C-score cut)
config.choice_check("memorized", MEMORIZED)
config.register_check("memorized", lambda v, cfg: None if v != "atypical" or cfg.get("noise", 0) == 0 else
                      f"memorized='atypical' trains without label noise but noise={cfg['noise']!r}; pass --noise=0 "
                      f"as well, or --memorized=both for label noise plus atypical clean examples")


# ----------------------------------------------------------------------------- label noise

def apply_label_noise(labels, fraction, num_classes, seed):
    """Mislabel exactly round(fraction * N) examples, chosen with a generator seeded by `seed`.

    The new label is uniform over the other C-1 classes, never the true one. Returns
    (noisy_labels, noisy_mask). Depends only on (labels, fraction, num_classes, seed).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(labels)
    k = int(round(fraction * n))
    g = generator(seed, "label_noise")
    chosen = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)  # 1..C-1: never the true class
    noisy_labels = labels.clone()
    noisy_labels[chosen] = (labels[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy_labels, mask


def stratified_split(labels, fraction, seed):
    """Seeded, stratified (train_idx, test_idx): `fraction` of every class goes to the test side."""
    labels = torch.as_tensor(labels)
    g = generator(seed, "holdout_split")
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


# ----------------------------------------------------------------------------- raw arrays

def _nchw(x):
    """uint8 NHW or NHWC numpy array -> uint8 torch tensor NCHW."""
    x = torch.from_numpy(np.array(x))  # a writable copy
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _load_mnist_5k(seed):
    path = DATA_ROOT / "mnist_5k.npz"
    if not path.is_file():
        raise UserError(f"embedded dataset {path} is missing; restore it with `git checkout -- data/`")
    with np.load(path, allow_pickle=False) as f:
        x, y = _nchw(f["x"]), torch.from_numpy(f["y"].astype(np.int64))
    tr, te = stratified_split(y, HOLDOUT, seed)
    return x[tr], y[tr], x[te], y[te]


def _load_npz(path, seed):
    """A user's arrays: x_train uint8 NHW/NHWC, y_train integer; optional x_test, y_test."""
    if not os.path.isfile(path):
        raise UserError(f"npz file {path} not found; give an existing file as --dataset=npz:PATH")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); save it with numpy.savez")
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise UserError(f"{path} has no array {key!r} (has: {', '.join(arrays) or 'none'}); "
                            f"save x_train (uint8 NHW or NHWC) and y_train (integer labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"{path}: give both x_test and y_test, or neither (then a hold-out is used)")
    splits = [("train", arrays["x_train"], arrays["y_train"])]
    if "x_test" in arrays:
        splits.append(("test", arrays["x_test"], arrays["y_test"]))
    for name, x, y in splits:
        if x.dtype != np.uint8:
            raise UserError(f"{path}: x_{name} has dtype {x.dtype}; convert images to uint8 (0-255)")
        if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))):
            raise UserError(f"{path}: x_{name} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) "
                            f"with C in 1 or 3")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: y_{name} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise UserError(f"{path}: x_{name} has {len(x)} examples but y_{name} has {len(y)}; "
                            f"give one label per image")
        if len(y) and y.min() < 0:
            raise UserError(f"{path}: y_{name} has negative labels; labels must be 0..C-1")
    if len(splits) == 2 and splits[0][1].shape[1:] != splits[1][1].shape[1:]:
        raise UserError(f"{path}: x_train images are {splits[0][1].shape[1:]} but x_test are "
                        f"{splits[1][1].shape[1:]}; give both splits the same image shape")
    num_classes = int(arrays["y_train"].max()) + 1
    if len(splits) == 2 and len(arrays["y_test"]) and arrays["y_test"].max() >= num_classes:
        raise UserError(f"{path}: y_test has label {int(arrays['y_test'].max())}, which never occurs in "
                        f"y_train (classes 0..{num_classes - 1}); fix the labels")
    if num_classes < 2:
        raise UserError(f"{path}: y_train has a single class; label noise needs at least 2")
    x, y = _nchw(arrays["x_train"]), torch.from_numpy(arrays["y_train"].astype(np.int64))
    if len(splits) == 2:
        return x, y, _nchw(arrays["x_test"]), torch.from_numpy(arrays["y_test"].astype(np.int64))
    tr, te = stratified_split(y, HOLDOUT, seed)
    return x[tr], y[tr], x[te], y[te]


def _read_idx(path):
    """An IDX file (MNIST format), gzipped or not -> numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_idx_dir():
    """The first folder holding Fashion-MNIST's four gzipped IDX files: data/fashion-mnist/ (e.g. copied
    there to travel with the working tree), then the Debian package's; None if neither does."""
    for d in (DATA_ROOT / "fashion-mnist", SYSTEM_FASHION_MNIST):
        if (d / "t10k-labels-idx1-ubyte.gz").is_file():
            return d
    return None


def _load_idx_fashion_mnist(d):
    x = _read_idx(d / "train-images-idx3-ubyte.gz")
    y = _read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = _read_idx(d / "t10k-images-idx3-ubyte.gz")
    yt = _read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return _nchw(x), torch.from_numpy(y), _nchw(xt), torch.from_numpy(yt)


_HOW_TO_GET = {
    "mnist": "run once online (download=True), or put MNIST/raw/*-ubyte files under data/",
    "fashion_mnist": "install the Debian package dataset-fashion-mnist, run once online, "
                     "or put FashionMNIST/raw/*-ubyte files under data/",
    "cifar10": "run once online (download=True), or extract cifar-10-python.tar.gz into data/",
    "cifar100": "run once online (download=True), or extract cifar-100-python.tar.gz into data/",
    "svhn": "run once online (download=True), or put train_32x32.mat and test_32x32.mat in data/ "
            "(SVHN also needs `pip install scipy`)",
}


def _load_torchvision(name, download):
    import torchvision.datasets as tvd

    def get(download):
        if name == "svhn":
            tr = tvd.SVHN(DATA_ROOT, split="train", download=download)
            te = tvd.SVHN(DATA_ROOT, split="test", download=download)
            return tr.data, tr.labels, te.data, te.labels  # already NCHW
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST,
               "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
        tr, te = cls(DATA_ROOT, train=True, download=download), cls(DATA_ROOT, train=False, download=download)
        return tr.data, tr.targets, te.data, te.targets

    def as_tensors(x, y, xt, yt):
        def conv(a):
            a = np.asarray(a)
            return torch.from_numpy(a) if a.ndim == 4 and a.shape[1] in (1, 3) else _nchw(a)
        return (conv(x), torch.as_tensor(np.asarray(y), dtype=torch.long),
                conv(xt), torch.as_tensor(np.asarray(yt), dtype=torch.long))

    try:
        return as_tensors(*get(False))
    except (RuntimeError, FileNotFoundError, OSError):
        pass  # not in data/ yet
    except ImportError as e:
        raise UserError(f"{name} needs a missing package ({e}); {_HOW_TO_GET[name]}")
    if name == "fashion_mnist" and _fashion_mnist_idx_dir():
        return _load_idx_fashion_mnist(_fashion_mnist_idx_dir())
    where = f"{DATA_ROOT}" + (f", {DATA_ROOT / 'fashion-mnist'} and {SYSTEM_FASHION_MNIST}"
                              if name == "fashion_mnist" else "")
    if not download:
        raise UserError(f"dataset {name} not found in {where} and download=False; {_HOW_TO_GET[name]}")
    try:
        return as_tensors(*get(True))
    except ImportError as e:
        raise UserError(f"{name} needs a missing package ({e}); {_HOW_TO_GET[name]}")
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"dataset {name} not found in {where} and download failed ({reason}); "
                        f"{_HOW_TO_GET[name]}")


def load_arrays(name, seed=0, download=True):
    """(x_train, y_train, x_test, y_test) as uint8 NCHW images and int64 labels."""
    if name == "mnist_5k":
        return _load_mnist_5k(seed)
    if name.startswith("npz:"):
        return _load_npz(name[4:], seed)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, npz:PATH")
    return _load_torchvision(name, download)


# ----------------------------------------------------------------------------- hold-out scores

def seeded_split(name):
    """Whether the dataset's train/test split is drawn by `seed` from one pool of images (the
    embedded default, and an npz file without a test split)."""
    if name == "mnist_5k":
        return True
    if name.startswith("npz:") and os.path.isfile(name[4:]):
        with np.load(name[4:], allow_pickle=False) as f:
            return "x_test" not in f.files
    return False


def score_pool(name, download=True):
    """(x, y): every image a training example of `name` can be, under any seed, in file order. A
    hold-out score belongs to an image of this pool, so one scores file serves every seed."""
    if not seeded_split(name):
        x, y, _, _ = load_arrays(name, 0, download)
        return x, y
    path = DATA_ROOT / "mnist_5k.npz" if name == "mnist_5k" else name[4:]
    load_arrays(name, 0, download)  # validates the file (one-line errors)
    with np.load(path, allow_pickle=False) as f:
        x, y = (f["x"], f["y"]) if name == "mnist_5k" else (f["x_train"], f["y_train"])
        return _nchw(x), torch.from_numpy(y.astype(np.int64))


def pool_positions(name, seed, y_pool):
    """The position in the pool (score_pool) of each training example of split `seed`."""
    return stratified_split(y_pool, HOLDOUT, seed)[0] if seeded_split(name) else torch.arange(len(y_pool))


def scores_path(name):
    """Where the dataset's hold-out scores live: data/<dataset>_holdout_scores.npz, or beside the file
    of an npz:PATH dataset (PATH without .npz + _holdout_scores.npz)."""
    if name.startswith("npz:"):
        path = Path(name[4:])
        return path.with_name(path.stem + "_holdout_scores.npz")
    return DATA_ROOT / f"{name}_holdout_scores.npz"


def load_scores(name):
    """The dataset's hold-out scores {score, se, n_held, labels (pool order), meta (dict)}, or None."""
    import json
    path = scores_path(name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in ("score", "se", "n_held", "labels")}
            out["meta"] = json.loads(str(f["meta"]))
    except Exception as e:
        raise UserError(f"hold-out scores {path} cannot be read ({type(e).__name__}: {e}); delete it and run "
                        f"python memorization_scores.py --dataset={name} to recompute them")
    return out


def training_scores(name, seed, y_train):
    """Hold-out score of each training example of split `seed` (float tensor), refusing scores whose
    labels do not match the dataset's (another order or another dataset)."""
    scores = load_scores(name)
    if scores is None:
        raise UserError(f"no hold-out scores for dataset {name} ({scores_path(name)} is missing); compute them "
                        f"with: python memorization_scores.py --dataset={name}")
    y_pool = torch.from_numpy(scores["labels"].astype(np.int64))
    pos = pool_positions(name, seed, y_pool)
    if len(pos) != len(y_train) or not torch.equal(y_pool[pos], y_train.cpu()):
        raise UserError(f"hold-out scores {scores_path(name)} do not match dataset {name} (labels differ: another "
                        f"order or dataset); delete the file and run python memorization_scores.py --dataset={name}")
    return torch.from_numpy(scores["score"].astype(np.float32))[pos]


def mark_memorized(data, memorized, atypical=None):
    """Set the memorized set of `data` (in place): Data.kind from the label-noise mask and, unless
    memorized == 'noisy', the `atypical` mask (those of them that are clean); Data.noisy = the memorized set."""
    kind = data.mislabeled.long()  # typical 0, mislabeled 1
    if memorized != "noisy":
        kind[(~data.mislabeled) & atypical.to(kind.device)] = KINDS.index("atypical")
    data.kind, data.memorized = kind, memorized
    data.noisy = kind > 0
    data.clean_idx = torch.nonzero(~data.noisy).flatten()
    data.noisy_idx = torch.nonzero(data.noisy).flatten()
    return data


# ----------------------------------------------------------------------------- the dataset object

class Data:
    """Train (with noisy labels) and test sets as tensors; batches are float, normalized, on `device`.

    y_train: the labels trained on (noisy where `noisy`); y_true: the original labels.
    """

    def __init__(self, name, x_train, y_train, y_true, noisy, x_test, y_test, num_classes, device="cpu"):
        self.name, self.num_classes, self.device = name, num_classes, torch.device(device)
        nbytes = x_train.numel() + x_test.numel()
        self.store = self.device if _fits_on(self.device, nbytes) else torch.device("cpu")
        self.x_train, self.x_test = x_train.to(self.store), x_test.to(self.store)
        self.y_train, self.y_true, self.noisy = y_train.to(self.device), y_true.to(self.device), noisy.to(self.device)
        self.mislabeled = self.noisy  # the label-noise mask; `noisy` is the memorized set (mark_memorized)
        self.kind, self.memorized = self.noisy.long(), "noisy"
        self.y_test = y_test.to(self.device)
        x = x_train.double() / 255
        self.mean = x.mean(dim=(0, 2, 3), keepdim=True).float().to(self.device)
        self.std = x.std(dim=(0, 2, 3), keepdim=True).float().clamp_min(1e-3).to(self.device)
        self.clean_idx = torch.nonzero(~noisy).flatten()
        self.noisy_idx = torch.nonzero(noisy).flatten()

    in_channels = property(lambda self: self.x_train.shape[1])
    image_size = property(lambda self: self.x_train.shape[2])
    n_train = property(lambda self: len(self.x_train))

    def batch(self, idx, split="train", augment=False, gen=None):
        """Normalized float images for example indices `idx` of a split, on the training device."""
        x = (self.x_train if split == "train" else self.x_test)[idx.to(self.store)]
        x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        x = random_crop_flip(x, gen) if augment else x
        return x.contiguous(memory_format=torch.channels_last)

    def labels(self, idx, split="train"):
        return (self.y_train if split == "train" else self.y_test)[idx.to(self.device)]

    def subset(self, n_train=None, n_test=None, seed=0):
        """A seeded random subset of each split (tests and smoke runs); labels and noise mask kept."""
        def pick(n, total, tag):
            if n is None or n >= total:
                return torch.arange(total)
            return torch.sort(torch.randperm(total, generator=generator(seed, "subset", tag))[:n]).values
        a, b = pick(n_train, self.n_train, "train"), pick(n_test, len(self.x_test), "test")
        cpu = lambda t, i: t.cpu()[i]
        sub = Data(self.name, cpu(self.x_train, a), cpu(self.y_train, a), cpu(self.y_true, a), cpu(self.mislabeled, a),
                   cpu(self.x_test, b), cpu(self.y_test, b), self.num_classes, self.device)
        if self.memorized != "noisy":
            sub = mark_memorized(sub, self.memorized, cpu(self.kind, a) == KINDS.index("atypical"))
        return sub


def _fits_on(device, nbytes):
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free // 4


def random_crop_flip(x, gen, pad=4):
    """Batched augmentation: random crop after zero padding, and horizontal flip with p=0.5."""
    b, c, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (shift[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shift[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def load_data(cfg, device="cpu"):
    """The configured dataset with its label noise (seeded by cfg.seed) as a Data object."""
    x, y, xt, yt = load_arrays(cfg.dataset, cfg.seed, getattr(cfg, "download", True))
    num_classes = int(max(y.max(), yt.max() if len(yt) else 0)) + 1
    noisy_y, mask = apply_label_noise(y, cfg.noise, num_classes, cfg.seed)
    data = Data(cfg.dataset, x, noisy_y, y, mask, xt, yt, num_classes, device)
    memorized = getattr(cfg, "memorized", "noisy")
    if memorized == "noisy":
        return data
    score = training_scores(cfg.dataset, cfg.seed, y)
    return mark_memorized(data, memorized, score < ATYPICAL_BELOW)
