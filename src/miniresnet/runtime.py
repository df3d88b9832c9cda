"""Where and how a run executes: device, CPU threads and numeric precision. None of it changes
what a recipe computes, only how fast."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import MiniResNetError

        raise MiniResNetError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def available_cores() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup CPU quota
    (containers often see all of the host's cores in os.cpu_count())."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def set_threads(requested: int) -> int:
    """The process-wide CPU settings of a run: `requested` threads (0: the cores available), and
    a malloc that keeps freed memory for the next step (see `keep_freed_memory`)."""
    threads = requested or available_cores()
    torch.set_num_threads(threads)
    keep_freed_memory()
    return threads


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, instead of giving it back to the
    kernel; False where the C library has no `mallopt` (musl, macOS).

    Every step frees and allocates again the same few-MB activation and gradient buffers. By
    default glibc serves some of them with mmap and trims the heap's top, so the next step touches
    fresh pages, each one zeroed by the kernel. Heap allocations up to 32 MiB and no trimming end
    those faults (benchmarks/RESULTS.md has the counts and the speed-up). The cost: the process
    keeps its peak heap until it exits."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # The mmap threshold first: setting either one turns off glibc's adaptive thresholds.
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


# The precisions a run may ask for; `auto` resolves to one of the others (see resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-weights", "fp64")


@dataclass(frozen=True)
class Precision:
    """The numeric precision a run actually computes in (never "auto"): the autocast dtype of the
    forward pass (None: none), and the dtype of the weights and inputs (fp64: float64, for
    numerical checks; bf16-weights: bfloat16, BatchNorm aside, with no autocast; everything else:
    float32)."""

    name: str
    autocast: torch.dtype | None = None
    weights: torch.dtype = torch.float32


FP32 = Precision("fp32")

# oneDNN's ISA caps under which its bf16 convolutions are native, not emulated with fp32 arithmetic.
_NATIVE_BF16_ISAS = ("BF16", "AMX", "AVX10", "FP16", "ALL")


def cpu_has_native_bf16() -> bool:
    """Whether bf16 autocast will run on bf16 dot-product instructions here, as PyTorch will run it.

    oneDNN's own check honours an ISA cap (ONEDNN_MAX_CPU_ISA) and covers aarch64's bf16; on x86
    it also says yes for plain AVX-512, where bf16 is emulated and slower than fp32, so there the
    CPU must also have AVX-512-BF16 or AMX, and the cap must not exclude them."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return hardware and any(isa in cap for isa in _NATIVE_BF16_ISAS)


BF16_WEIGHTS = Precision("bf16-weights", weights=torch.bfloat16)
# What each precision runs as where the hardware does it well (resolve_precision decides where).
RUNS_AS = {
    "fp32": FP32,
    "bf16": Precision("bf16", torch.bfloat16),
    "fp16": Precision("fp16", torch.float16),
    "bf16-weights": BF16_WEIGHTS,
    "fp64": Precision("fp64", weights=torch.float64),
}


def model_in_precision(
    model: torch.nn.Module,
    precision: Precision,
    device: torch.device | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> torch.nn.Module:
    """`model` (in place) on `device` with its weights in the precision's dtype. Half-precision
    weights leave the BatchNorm layers in float32: their running statistics and scales need the
    resolution, and BatchNorm takes half-precision activations with float32 parameters."""
    model = model.to(device, precision.weights, memory_format=memory_format)
    if precision.weights in (torch.bfloat16, torch.float16):
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.float()
    return model


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """The precision that will run when `asked` is asked for on `device`. `auto`: bf16 where the
    hardware computes it natively (a CPU with AVX-512-BF16, AMX or aarch64 bf16; a GPU with bf16),
    fp32 elsewhere. An explicit precision the hardware cannot do well falls back to fp32, said once."""
    if asked not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {asked!r}")
    if asked == "fp64":
        return RUNS_AS[asked]
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if asked == "auto":
            return RUNS_AS["bf16"] if bf16 else FP32
        if asked in ("bf16", "bf16-weights") and not bf16:
            _note("this GPU has no bf16; using fp32")
            return FP32
        return RUNS_AS[asked]
    native_bf16 = cpu_has_native_bf16()
    if asked == "auto":
        return RUNS_AS["bf16"] if native_bf16 else FP32
    if asked == "fp16":
        _note("fp16 autocast is for CUDA; on the CPU using fp32")
        return FP32
    if asked in ("bf16", "bf16-weights") and not native_bf16:
        _note("this CPU lacks native bf16 (AVX-512-BF16, AMX or aarch64 bf16); using fp32")
        return FP32
    return RUNS_AS[asked]


def _note(message: str) -> None:
    log(f"note: {message}")


def log(message: str) -> None:
    """The project's one way to tell people something: stderr, so stdout stays clean for results."""
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    """The CPU's name as the OS gives it (Linux's /proc/cpuinfo), else what Python's platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict:
    """What a speed figure was measured on: the CPU, the instruction set PyTorch's own kernels
    dispatch to, any cap on oneDNN's (convolutions) and MKL's (matmul), whether bf16 is native,
    the threads, and the GPU if one is used."""
    machine = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "mkl_isa_cap": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)
