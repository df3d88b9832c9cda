"""Several processes, one run: what `torchrun --nproc_per_node=N -m miniresnet train ...` needs.

Every process holds the whole data set and draws the same epoch permutation and augmentation
(same seed), then takes its own share of every global batch (positions rank, rank + N, ...), so
the N shares of a step are exactly the batch one process would see. The shares are equal at
every step: the global batch is a multiple of N, and the epoch's last, partial batch is cut to a
multiple of N (its last few images are left out of that epoch; see loader.BatchLoader).
DistributedDataParallel averages the gradients; with `sync_bn`, BatchNorm statistics are summed
across the processes too, so N processes compute what one computes (up to float summation order
and those few images). Evaluation is split into N contiguous shards whose logits are gathered, so
every image counts exactly once; a set smaller than N leaves some shards empty. Process 0 alone
writes files and logs. gloo on CPU, nccl on CUDA.

A single process (no torchrun) gets `Distributed()` whose collectives return their input.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (float64, so counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        """The largest value any process holds: how processes agree to stop at the same step."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self) -> None:
        """Wait for every process (gloo can abort a process that tears down while another still works)."""
        if self.enabled:
            dist.barrier()

    def shard(self, n: int) -> slice:
        """This process's contiguous share of n items (the first n % N processes get one more; with
        n < N, the last processes get none)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order (the inverse of `shard`). A process with
        an empty shard passes an empty tensor of the same shape otherwise, (0, C), so that cat fits."""
        if not self.enabled:
            return rows
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, rows.cpu())
        return torch.cat(parts)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) != 1


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up, or stay a single process."""
    if not launched_by_torchrun():
        return Distributed(), device
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Distributed(rank, world_size, local_rank, local_world), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun process without the interpreter's teardown, as multiprocessing ends its
    workers. gloo's worker threads drop their last collectives a moment after those complete; a
    drop that releases a tensor Python created needs the GIL, and once Python is finalizing, that
    aborts the whole process (SIGABRT, "terminate called without an active exception") after a
    run that finished well. Its files are written and closed by then; only the streams need a flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch: per-channel sums and sums of
    squares are all-reduced (differentiably) across processes. Works with gloo on CPU, where
    torch.nn.SyncBatchNorm does not; the same state_dict keys as BatchNorm2d, so checkpoints load
    into the plain model. Outside training, or in one process, it is a plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings

        with warnings.catch_warnings():  # its successor in torch._functional_collectives is private
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 statistics in fp32; fp64 stays fp64
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # differentiable: gradients flow back to every process's share
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        shift = self.bias - mean * scale
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for a SyncedBatchNorm2d with the same parameters and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncedBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module
