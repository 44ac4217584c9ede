"""Numeric precision: bf16 autocast (training and evaluation), strict fp32 for searches that compare
scores, and PyTorch's deterministic mode.

`amp` (a shared knob) asks for bf16 autocast; it takes effect on the device types of AUTOCAST_DEVICES
(CUDA), so the run's identity records the precision that was actually used (`precision(cfg)`): a bf16
GPU run and an fp32 CPU run never share a run directory or results. Tests add "cpu" to
AUTOCAST_DEVICES to run the very same code path on the CPU (torch.autocast("cpu", dtype=torch.bfloat16)).
"""
import contextlib
import os

import torch


AUTOCAST_DEVICES = ("cuda",)  # where amp autocasts; on a CPU bf16 is slower than fp32, so only tests add "cpu"


def autocast(device, enabled=True):
    """bf16 autocast on the AUTOCAST_DEVICES when `enabled` (no loss scaling needed); a no-op elsewhere.

    Without autocast's weight cache: it keeps each weight's bf16 copy for the life of a region, so a
    weight changed in place inside one (a rewind, a reset, a zeroed unit) would go unseen. Callers also
    open one region per forward and change weights outside it; each weight is cast once per forward
    either way."""
    if enabled and device.type in AUTOCAST_DEVICES:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _device_type(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name).type


def precision(cfg):
    """'bf16' where training autocasts (amp on an AUTOCAST_DEVICES device), else 'fp32'."""
    on = getattr(cfg, "amp", True) and _device_type(getattr(cfg, "device", "auto")) in AUTOCAST_DEVICES
    return "bf16" if on else "fp32"


@contextlib.contextmanager
def strict_fp32():
    """Full fp32 matmuls and convolutions (TF32 off on CUDA) inside the block; previous settings after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def set_deterministic(on):
    """PyTorch's deterministic algorithms and cuDNN without autotuning. Ops flagged as having no
    deterministic CUDA kernel warn instead of failing: ResNet-9's global AdaptiveMaxPool2d is flagged,
    though with one output per channel its backward never adds two values into one place."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = on
