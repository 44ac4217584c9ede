"""Training under torchrun (CPU, Gloo, 2 processes) equals training in one process with the same global batch.

The file is also the torchrun worker: `python -m torch.distributed.run --nproc_per_node=2 --standalone
tests/test_distributed.py OUT_DIR NPZ RUNS_ROOT` trains the tiny run on every rank and saves, per
rank, its final weights, predictions, metrics-side numbers and the files it wrote (rank 0 alone may).
"""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import distributed  # noqa: E402

# 256 of the tiny digits in batches of 49: every batch splits 25 / 24 (uneven shares), the last one
# (11 examples) 6 / 5.
RUN = dict(model="cnn", width=0.25, epochs=2, batch_size=49, lr=0.05, device="cpu")
N_TRAIN, N_TEST = 256, 128


def tiny_cfg(npz, runs_dir, **overrides):
    from conftest import TINY
    return SimpleNamespace(**{**TINY, **RUN, "dataset": f"npz:{npz}", "runs_dir": str(runs_dir), **overrides})


def train(cfg, mode):
    """The tiny run in float64 (so that both sides are exact to ~1e-12 per step; in float32 the CPU
    BatchNorm kernel alone is off by ~5e-5, which training amplifies), trained plainly (DDP) or
    with gradient accounting's two-pass backward hook (explicit all-reduce of the gradients)."""
    from common.accounting import GradientAccountant
    from common.data import load_data
    from common.models import model_for
    from common.training import pick_device, train_run
    data = load_data(cfg, pick_device(cfg.device)).subset(N_TRAIN, N_TEST)
    batch = data.batch
    data.batch = lambda *args, **kwargs: batch(*args, **kwargs).double()
    model = model_for(cfg, data).double()
    if mode == "plain":
        return train_run(cfg, data=data, model=model, quiet=True)
    accountant = GradientAccountant(model, data.noisy)
    return train_run(cfg, data=data, model=model, backward=accountant.backward, on_epoch=accountant.end_epoch,
                     quiet=True)


def mode_cfg(npz, root, mode, **overrides):
    return tiny_cfg(npz, Path(root) / mode, **overrides)


# ----------------------------------------------------------------------------- the torchrun worker

def worker(out, npz, root):
    """One rank: train plainly, resume, train with gradient accounting, hit a refused configuration; save what it saw."""
    from common.cli import UserError
    from common.evaluation import predict
    from common.runs import Run
    import conftest  # noqa: F401  (sets 2 threads: one per rank instead, on 2 cores)
    torch.set_num_threads(1)
    writes = []
    replace = os.replace

    def recording_replace(src, dst, *args, **kwargs):  # every file that common.runs writes ends here
        writes.append(str(dst))
        return replace(src, dst, *args, **kwargs)
    os.replace = recording_replace
    result = {}
    for mode in ("plain", "accounting"):
        cfg = mode_cfg(npz, root, mode)
        model, data, run = train(cfg, mode)
        result[mode] = {"state": model.state_dict(), "train_pred": predict(model, data, "train"),
                        "test_pred": predict(model, data, "test"),
                        "bn": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})}
        if mode == "plain":
            if distributed.is_main():
                run.ckpt_path(cfg.epochs).unlink()  # as if killed during the last epoch
            distributed.barrier()
            result["resumed"] = train(cfg, mode)[0].state_dict()
    try:  # another lr forced into the plain run's directory
        from common.training import train_run
        other = mode_cfg(npz, root, "plain", lr=0.01)
        train_run(other, quiet=True, run=Run(other, directory=Run(mode_cfg(npz, root, "plain")).dir))
    except UserError as e:
        result["error"] = str(e)
    result.update(world=distributed.world_size(), writes=writes)
    torch.save(result, Path(out) / f"rank{distributed.rank()}.pt")
    # both ranks done before either tears Gloo down: one CI run aborted a rank ("terminate called without
    # an active exception") at exit; not reproduced in 5 runs since, so only made less likely here
    distributed.barrier()
    torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def two_ranks(tiny_npz, tmp_path_factory):
    """Both ranks' results of the worker under torchrun, and the directory of their runs."""
    out, root = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("dist_runs")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__)), str(out), str(tiny_npz), str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)], root


def same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def close(a, b):
    """Float64 training with float32 losses: measured max deviation 8e-7 on a BatchNorm variance of 3.9."""
    return list(a) == list(b) and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.parametrize("mode", ["plain", "accounting"])
def test_two_processes_equal_one(mode, two_ranks, tiny_npz, tmp_path):
    from common.accounting import KEY
    from common.evaluation import predict
    from common.runs import Run, load_tensors
    (r0, r1), root = two_ranks
    assert r0["world"] == r1["world"] == 2
    assert r0[mode]["bn"] == ["SyncedBatchNorm2d"]  # BatchNorm over the global batch
    model, data, run = train(mode_cfg(tiny_npz, tmp_path, mode), mode)  # one process, same global batches

    # the same weights on both ranks, equal to the single process's
    assert same(r0[mode]["state"], r1[mode]["state"])
    single = model.state_dict()
    assert close(r0[mode]["state"], single), max(float((r0[mode]["state"][k] - single[k]).abs().max()) for k in single)
    # the checkpoint holds the unwrapped model ('layers.*', no 'module.' prefix)
    drun = Run(mode_cfg(tiny_npz, root, mode))
    ckpt = load_tensors(drun.ckpt_path(2))
    assert same(ckpt["model"], r0[mode]["state"])

    # the same metrics, epoch by epoch (accuracies from sharded evaluation)
    rows, drows = run.metrics(), drun.metrics()
    assert [r["epoch"] for r in drows] == [0, 1, 2]
    for a, b in zip(rows, drows):
        for key in ("clean", "noisy", "noisy_true", "test", "train"):
            assert a[key] == b[key], (key, a, b)
        if a["epoch"] > 0:
            assert b["lr"] == a["lr"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # float32 losses
        if mode == "accounting" and a["epoch"] > 0:  # the ranks' sums, all-reduced, are the single process's
            acc, dacc = a[KEY], b[KEY]
            assert (dacc["n_clean"], dacc["n_noisy"]) == (acc["n_clean"], acc["n_noisy"]) == \
                (int((~data.noisy).sum()), int(data.noisy.sum()))
            for key in ("norm_total", "norm_clean", "norm_noisy", "cosine"):
                assert dacc[key] == pytest.approx(acc[key], rel=1e-6, abs=1e-6), key

    # sharded, gathered evaluation: every rank has every prediction, the single process's
    model.load_state_dict(r0[mode]["state"])
    for split in ("train", "test"):
        assert torch.equal(r0[mode][f"{split}_pred"], r1[mode][f"{split}_pred"])
        assert torch.equal(r0[mode][f"{split}_pred"], predict(model, data, split))

    # one set of files, the single process's (no temporaries left), all written by rank 0
    files = sorted(str(p.relative_to(drun.dir)) for p in drun.dir.rglob("*"))
    assert files == sorted(str(p.relative_to(run.dir)) for p in run.dir.rglob("*"))
    assert r1["writes"] == [] and str(drun.ckpt_path(2)) in r0["writes"]


def test_resume_and_errors_under_torchrun(two_ranks):
    (r0, r1), root = two_ranks
    # killed during the last epoch: resuming under torchrun continues exactly
    assert same(r0["resumed"], r0["plain"]["state"]) and same(r1["resumed"], r0["plain"]["state"])
    # a refused configuration is rank 0's verdict, raised on every rank as the same one-line UserError
    assert r0["error"] == r1["error"] and "another configuration" in r0["error"] and "\n" not in r0["error"]


def test_single_process_is_untouched(tiny_npz):
    """Without torchrun every helper is the identity: no process group, rank 0, whole batches."""
    assert not distributed.launched() and not distributed.active()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard_bounds(51) == (0, 51)
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0))
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    assert distributed.wrap(model) is model and distributed.sync_batchnorm_(model) == 0
    assert type(model[0]) is torch.nn.BatchNorm2d
    assert distributed.on_main(lambda x: x + 1, 1) == 2


def test_shards_tile_every_batch(monkeypatch):
    for world in (2, 3, 8):
        for n in (2, 8, 51, 512):
            if n < world:
                continue
            bounds = []
            for r in range(world):
                monkeypatch.setattr(distributed, "world_size", lambda: world)
                monkeypatch.setattr(distributed, "rank", lambda: r)
                bounds.append(distributed.shard_bounds(n))
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, disjoint, in rank order
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


if __name__ == "__main__":
    worker(*sys.argv[1:])
