"""Data path: one training epoch of the default run fed from tensors vs a torchvision DataLoader.

Ours: the whole dataset is one uint8 tensor, batches are made by indexing and normalized in one op.
Baseline: the usual torchvision pipeline -- a Dataset of PIL images with per-sample ToTensor and
Normalize, batched by a DataLoader (num_workers=0, as on a laptop; a worker pool only adds processes).
Same model, same batches, same steps; timed alternately, medians reported as ratios.

    python bench/bench_data_path.py [--repeats=3] [--batch_size=128]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import config  # noqa: E402
from common.data import load_data  # noqa: E402
from common.models import model_for  # noqa: E402
from common.training import make_optimizer  # noqa: E402

KNOBS = dict(dataset="mnist_5k", model="resnet9", width=0.25, noise=0.1, seed=0, model_seed=0, batch_size=128,
             lr=0.05, momentum=0.9, weight_decay=5e-4, repeats=3)


class PILDataset(torch.utils.data.Dataset):
    """The per-sample path: uint8 array -> PIL image -> ToTensor -> Normalize."""

    def __init__(self, data):
        import torchvision.transforms as T
        self.x, self.y = data.x_train.cpu(), data.y_train.cpu()
        self.to_pil = T.ToPILImage()
        self.transform = T.Compose([T.ToTensor(), T.Normalize(data.mean.flatten().tolist(), data.std.flatten().tolist())])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.to_pil(self.x[i])), self.y[i], i


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
    opt.step()


def epoch_ours(model, opt, data, order, bs):
    for idx in order.split(bs):
        step(model, opt, data.batch(idx), data.labels(idx))


def epoch_loader(model, opt, loader):
    for x, y, _ in loader:
        step(model, opt, x, y)


def data_only_ours(data, order, bs):
    for idx in order.split(bs):
        data.batch(idx), data.labels(idx)


def data_only_loader(loader):
    for _ in loader:
        pass


def main(argv):
    cfg = config.parse(KNOBS, argv)
    data = load_data(cfg)
    model = model_for(cfg, data)
    opt = make_optimizer(model.parameters(), cfg)
    order = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(PILDataset(data), batch_size=cfg.batch_size,
                                         sampler=order.tolist(), num_workers=0)
    cases = {"train epoch": (lambda: epoch_ours(model, opt, data, order, cfg.batch_size),
                             lambda: epoch_loader(model, opt, loader)),
             "data only": (lambda: data_only_ours(data, order, cfg.batch_size), lambda: data_only_loader(loader))}
    print(f"{cfg.dataset} ({data.n_train} train), {cfg.model} x{cfg.width}, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads, {cfg.repeats} alternating repeats")
    for name, (ours, theirs) in cases.items():
        ours(), theirs()  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(cfg.repeats):
            for fn, times in ((ours, t_ours), (theirs, t_theirs)):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        a, b = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"{name:12s} tensors {a:7.3f}s  DataLoader {b:7.3f}s  speed-up x{b / a:.2f}")


if __name__ == "__main__":
    from common import cli
    cli.run(main)
