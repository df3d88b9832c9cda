"""BatchNorm, the residual add and ReLU as one CPU kernel for training, where it applies.

`batchnorm_relu(bn, x, skip)` computes relu(bn(x) + skip). On the CPU in fp32 or fp64, a
training-mode BatchNorm2d on channels_last inputs runs as one C++ kernel (batchnorm_relu.cpp),
two passes over memory forward and two back. Everywhere else, or where the kernel could not be
built, it runs PyTorch's own ops. Both compute the same arithmetic (the tests compare them in
float64). Where training runs in fp32 (CPUs without native bf16), BatchNorm and ReLU are the
largest cost beside the convolutions, and PyTorch's ops take several more passes over memory.

The kernel is compiled on first use with the system's C++ compiler, by torch.utils.cpp_extension,
and kept in its cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch
from torch import nn

from .runtime import log

SOURCE = Path(__file__).with_name("batchnorm_relu.cpp")


def compiler_flags() -> list[str]:
    """AVX2 and FMA where PyTorch's own kernels run at least AVX2 (it checks the CPU and honours
    ATEN_CPU_CAPABILITY), so a capped run is capped here too; otherwise the compiler's baseline."""
    flags = ["-O3"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        flags += ["-mavx2", "-mfma"]
    return flags + ["-fopenmp"]  # at::parallel_for runs on OpenMP threads


def kernel_registered() -> bool:
    """Whether this process has loaded the kernel already (a second copy, say from another cache
    directory, would abort the process: its operators may be registered only once)."""
    return hasattr(torch.ops.miniresnet, "batchnorm_relu_forward")


@functools.cache
def kernel_available() -> bool:
    """Build (or load the cached build of) the kernel once per process; False, said once, where
    that fails (no C++ compiler, no ninja, another platform's compiler flags)."""
    if kernel_registered():
        return True
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        load(
            "miniresnet_batchnorm_relu",
            [str(SOURCE)],
            extra_cflags=compiler_flags(),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        if time.perf_counter() - start > 2:  # compiled, not loaded from the cache
            log(f"built the fused BatchNorm+ReLU kernel in {time.perf_counter() - start:.0f} s (cached for later runs)")
        return True
    except Exception as error:  # a build can fail in many ways; any of them means PyTorch's ops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        log(f"note: the fused BatchNorm+ReLU kernel could not be built ({first_line}); using PyTorch's ops")
        return False


def fused_kernel_wanted(asked: bool, compile: bool, device: torch.device) -> bool:
    """Whether a run trains with the kernel: asked for, on the CPU, not under torch.compile (which
    fuses on its own and cannot trace the kernel), and built (here, before training starts)."""
    return asked and not compile and device.type == "cpu" and kernel_available()


class FusedBatchNormReLU(torch.autograd.Function):
    """relu(batch_norm(x) + skip) with batch statistics, forward and backward in the C++ kernel.
    Returns y and the batch's mean and biased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, skip, weight, bias, eps):
        y, mean, var, invstd = torch.ops.miniresnet.batchnorm_relu_forward(x, skip, weight, bias, eps)
        ctx.save_for_backward(x, y, weight, mean, invstd)
        ctx.with_skip = skip is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, y, weight, mean, invstd = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)  # e.g. the pooling's expanded gradient
        dx, dskip, dweight, dbias = torch.ops.miniresnet.batchnorm_relu_backward(
            dy, x, y, weight, mean, invstd, ctx.with_skip
        )
        return dx, dskip if ctx.with_skip else None, dweight, dbias, None


def fused_kernel_applies(bn: nn.Module, x: torch.Tensor, skip: torch.Tensor | None) -> bool:
    """A plain BatchNorm2d in training mode (batch statistics), on channels_last CPU tensors in
    fp32 or fp64, with more than one value per channel; and the kernel built."""
    return (
        type(bn) is nn.BatchNorm2d  # not a subclass such as the distributed SyncedBatchNorm2d
        and bn.training
        and bn.affine
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dtype == bn.weight.dtype
        and x.dim() == 4
        and x.numel() > x.shape[1]
        and x.is_contiguous(memory_format=torch.channels_last)
        and (skip is None or (skip.shape == x.shape and skip.dtype == x.dtype))
        and (skip is None or skip.is_contiguous(memory_format=torch.channels_last))
        and kernel_available()
    )


def batchnorm_relu(bn: nn.BatchNorm2d, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(x) + skip), or relu(bn(x)) without a skip: the fused kernel where it applies,
    updating bn's running statistics as BatchNorm2d does; PyTorch's ops elsewhere."""
    if not fused_kernel_applies(bn, x, skip):
        out = bn(x)
        return torch.relu_(out if skip is None else out.add_(skip))
    y, mean, var = FusedBatchNormReLU.apply(x, skip, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            per_channel = x.numel() // x.shape[1]
            bn.running_mean.lerp_(mean, factor)
            bn.running_var.lerp_(var * (per_channel / (per_channel - 1)), factor)  # unbiased, as BatchNorm2d keeps
    return y
