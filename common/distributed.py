"""Data-parallel training under torchrun: one process per GPU (or CPU process), one global batch.

    torchrun --nproc_per_node=N script.py [configs/preset.py] [--key=value ...]

Nothing changes in a single process: every function here is the identity or a no-op unless the
process group is up with more than one process (`active()`).

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment), `setup` -- called by
training.pick_device -- starts the process group (NCCL on CUDA, Gloo on CPU) and gives rank r the
device cuda:LOCAL_RANK. `batch_size` stays the GLOBAL batch: every rank draws the same seeded
permutation and takes its contiguous slice of each batch (`shard_bounds`), so N x local = global and
example indices stay global (example-tied dropout ties its masks to them). Each rank backpropagates
its *share* of the global mean loss, sum(local losses) / B_global, and the ranks' gradients are
summed (a DDP communication hook that sums, or `all_reduce_grads` after a custom backward): the
result is the gradient of the global batch mean, also when shards are uneven. BatchNorm normalizes
with statistics of the global batch (`sync_batchnorm_`), otherwise the gradient would differ.
Only rank 0 writes files (common.runs); evaluation is sharded and gathered (common.evaluation).
"""
import atexit
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .cli import UserError


# ----------------------------------------------------------------------------- the process group

def launched():
    """True when started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active():
    """True when a process group with more than one process is up: collectives are needed."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """Rank 0, the only process that writes files (always True in a single process)."""
    return rank() == 0


def setup(device):
    """Under torchrun: start the process group once and return this rank's device; else `device`.

    CUDA -> NCCL on cuda:LOCAL_RANK (an explicit cuda:N is replaced: torchrun assigns the GPUs);
    CPU -> Gloo. MPS has no multi-process backend."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                            f"use --nproc_per_node=<number of GPUs on this node> or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"device {device.type!r} cannot train with several processes; "
                        f"use --device=cuda (NCCL) or --device=cpu (Gloo) under torchrun")
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_teardown)
    return device


def _teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (e.g. until rank 0 has written what the others read next)."""
    if active():
        dist.barrier()


def on_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on rank 0 only; every rank gets its (picklable) result, or its error.

    For work that reads and writes the run directory (checks, move-aside, labels): one process
    decides, so ranks never race on files, and a UserError is raised on every rank alike."""
    if not active():
        return fn(*args, **kwargs)
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except UserError as e:
            box[0] = ("user", str(e))
        except Exception as e:  # re-raised here; the other ranks get a RuntimeError naming it
            box[0] = ("crash", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# ----------------------------------------------------------------------------- sharding and reductions

def shard_bounds(n):
    """[lo, hi) of this rank's contiguous slice of n items (sizes differ by at most one)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (r < extra)


def all_reduce_sum_(tensor):
    """Sum `tensor` over the ranks in place (a no-op in a single process); returns it.

    For statistics each rank accumulated over its own examples, e.g. gradient accounting's clean
    and noisy gradient sums: summed, they equal a single process's over the whole batch."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def all_gather_cat(local, n):
    """Concatenate every rank's `local` slice (this rank's is shard_bounds(n) of n items) in rank order."""
    if not active():
        return local
    w, base, extra = world_size(), *divmod(n, world_size())
    width = base + (extra > 0)
    padded = local.new_zeros((width,) + tuple(local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:base + (r < extra)] for r, p in enumerate(parts)])


@torch.no_grad()
def all_reduce_grads(params):
    """Sum the parameters' gradients over the ranks (one flat all-reduce per dtype and device).

    Used after a custom `backward` hook, which may call backward more than once per forward (DDP's
    reducer synchronizes only one backward per forward)."""
    if not active():
        return
    groups = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()


def _sum_hook(process_group, bucket):
    """DDP communication hook: SUM the bucket (the default averages; each rank's loss is already its share)."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(model):
    """Synced BatchNorm, then DistributedDataParallel summing gradients; `model` itself in a single process.

    The wrapper is for the training forward/backward only: checkpoints, evaluation and hooks use
    `model` (its state_dict has no 'module.' prefix)."""
    if not active():
        return model
    sync_batchnorm_(model)
    device = next(model.parameters()).device
    # BatchNorm buffers are identical on every rank (global statistics): no per-step broadcast.
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              forward_sync_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- BatchNorm over the global batch

class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class _SyncedBN:
    """BatchNorm whose training statistics are those of the global batch (all ranks together), for
    devices without nn.SyncBatchNorm (CPU, Gloo): every rank's per-channel count, mean and sum of
    squared deviations, pooled through one differentiable all-reduce, so the gradient also flows
    through the other ranks' examples. Eval mode, or a single process: exactly the plain BatchNorm."""

    def forward(self, x):
        if not (self.training and active()):
            return super().forward(x)
        return self._synced_forward(x)

    def _synced_forward(self, x):
        self._check_input_dim(x)
        c, w = x.shape[1], world_size()
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16/fp16: statistics in fp32
        # This rank's count, mean and sum of squared deviations (two passes: exact even when
        # |mean| >> std, e.g. a constant image background), placed in row `rank` of a zero table:
        # the all-reduce is then an all-gather that autograd differentiates.
        n_local = x.numel() // c
        mean_local = xf.sum(dims) / max(n_local, 1)
        m2_local = ((xf - mean_local.view(shape)) ** 2).sum(dims)
        table = xf.new_zeros(w, 2 * c + 1)
        table[rank()] = torch.cat([mean_local, m2_local, mean_local.new_full((1,), float(n_local))])
        table = _AllReduceSum.apply(table)
        means, m2s, counts = table[:, :c], table[:, c:2 * c], table[:, -1:].detach()
        n = float(counts.sum())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)}")
        mean = (counts * means).sum(0) / n  # Chan et al.: pooled mean and sum of squares
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalizes
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)), alpha=f)
        return y.to(x.dtype)


class SyncedBatchNorm1d(_SyncedBN, nn.BatchNorm1d):
    pass


class SyncedBatchNorm2d(_SyncedBN, nn.BatchNorm2d):
    pass


class _CudaSyncedBN(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (its CUDA kernels, NCCL) for a module that stays a BatchNorm{1,2}d."""
    process_group = None  # the default group


class CudaSyncedBatchNorm1d(_CudaSyncedBN, nn.BatchNorm1d):
    pass


class CudaSyncedBatchNorm2d(_CudaSyncedBN, nn.BatchNorm2d):
    pass


# 1d for the users' own models (e.g. a BatchNorm1d head); no model here has 3d inputs.
_SYNCED = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d}
_CUDA_SYNCED = {nn.BatchNorm1d: CudaSyncedBatchNorm1d, nn.BatchNorm2d: CudaSyncedBatchNorm2d}


def sync_batchnorm_(model):
    """Make the model's BatchNorm layers normalize over the global batch (in place; a no-op in a single process).

    The modules keep their identity, parameters, buffers and state_dict keys (only their class
    changes, to a subclass of their own class: nn.SyncBatchNorm's kernels on CUDA, `_SyncedBN`
    elsewhere), so references held by callers (optimizers, frozen-norm lists) stay valid.
    Returns the number of layers changed."""
    if not active():
        return 0
    changed = 0
    for m in model.modules():
        cuda = any(t.is_cuda for t in m.buffers()) or any(t.is_cuda for t in m.parameters())
        synced = (_CUDA_SYNCED if cuda else _SYNCED).get(type(m))
        if synced is not None:
            m.__class__ = synced
            changed += 1
    return changed
