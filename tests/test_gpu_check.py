"""bench/gpu_check.py: its smoke mode runs every part on a CPU, and its image preparation."""
import gzip
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

from common.cli import UserError  # noqa: E402


def test_smoke_runs_every_part(tmp_path):
    """`--smoke`: every part reports ok, the JSON has them all with their results, and the
    flipping part found identical unit sequences."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", f"--out={out}",
                           "--images=mnist_5k", "--device=cpu"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["reason"])
        assert part["result"], name
    assert report["smoke"] is True and report["torch"] == torch.__version__ and report["date"]
    assert report["images"]["source"].startswith("mnist_5k") and report["images"]["shape"] == [3, 32, 32]
    flipping = report["parts"]["flipping"]["result"]
    assert flipping["identical"] and flipping["targets"] and all(t["identical"] for t in flipping["targets"])
    throughput = report["parts"]["throughput"]["result"]
    assert {"ours", "ours_augment", "loader_augment"} <= set(throughput)
    assert report["parts"]["torchrun"]["result"]["checkpoint"].endswith("checkpoints/epoch_001.pt")
    for name in gpu_check.PARTS:  # the table names every part
        assert name in proc.stdout


def test_a_failing_part_is_reported_and_the_others_run(tmp_path):
    """The torchrun part's script rejects its arguments: that part is failed with the reason, the
    dropout part still ran, the JSON has both, and the exit status says a part failed."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", f"--out={out}",
                           "--images=mnist_5k", "--device=cpu", "--parts=['torchrun','dropout']",
                           "--torchrun_args=['--width=-1']"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["torchrun", "dropout"]
    reason = parts["torchrun"]["reason"]  # the script's own one-line error, through torchrun
    assert parts["torchrun"]["status"] == "failed" and "result" not in parts["torchrun"]
    assert reason.startswith("RuntimeError: exit status") and "error: width=-1.0 is outside" in reason
    assert parts["dropout"]["status"] == "ok" and parts["dropout"]["result"]["dropout_over_plain"] > 0
    assert "failed" in proc.stdout and "width=-1.0" in proc.stdout


def write_idx(path, array):
    """An IDX file (MNIST format), gzipped: magic 0 0 8 ndim, big-endian dims, uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def images_cfg(**overrides):
    return SimpleNamespace(**{"images": "auto", "fashion_dir": "", "n_images": 6, "seed": 0, **overrides})


def test_fashion_idx_padded_to_32_and_3_channels(tmp_path):
    rng = np.random.default_rng(0)
    x, xt = rng.integers(1, 256, (5, 28, 28)), rng.integers(1, 256, (3, 28, 28))
    for name, a in zip(gpu_check.IDX_FILES, (x, np.arange(5) % 10, xt, np.arange(3))):
        write_idx(tmp_path / f"{name}.gz", a)
    xs, y, xts, yt, source = gpu_check.check_images(images_cfg(fashion_dir=str(tmp_path), images="fashion_mnist"))
    assert xs.shape == (6, 3, 32, 32) and xts.shape == (3, 3, 32, 32) and xs.dtype == torch.uint8
    assert str(tmp_path) in source and "repeated x2" in source  # 5 images repeated up to n_images=6
    # each output is one of the files' images, centred, in every channel, with its own label
    source_of = [next(j for j in range(5) if np.array_equal(xs[i, 0, 2:30, 2:30].numpy(), x[j])) for i in range(6)]
    assert sorted(set(source_of)) == [0, 1, 2, 3, 4] and y.tolist() == source_of
    assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 0], xs[:, 2])
    assert int(xs[:, :, :2].sum()) == 0 and int(xs[:, :, :, 30:].sum()) == 0  # zero border
    assert torch.equal(xts[:, 2, 2:30, 2:30], torch.from_numpy(xt).to(torch.uint8)) and yt.tolist() == [0, 1, 2]


def test_fallback_and_bad_folder(tmp_path):
    x, y, xt, yt, source = gpu_check.check_images(images_cfg(images="mnist_5k", n_images=5000))
    assert x.shape == (5000, 3, 32, 32) and source.startswith("mnist_5k") and "repeated x2" in source
    with pytest.raises(UserError, match="fashion_dir"):
        gpu_check.check_images(images_cfg(fashion_dir=str(tmp_path)))  # an empty folder named explicitly


@pytest.mark.parametrize("arg, match", [("--images=cifar", "unknown images"), ("--parts=['speed']", "parts="),
                                        ("--steps=0", "steps=0"), ("--budget_flipping=0", "budget_flipping")])
def test_bad_knobs_are_one_line_errors(arg, match):
    with pytest.raises(UserError, match=match):
        gpu_check.parse_args(["--smoke", arg])
