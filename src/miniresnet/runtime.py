"""Where and how a run executes: device, CPU threads and numeric precision. None of it changes
what a recipe computes, only how fast."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
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
    fresh pages: ~4,000 page faults (each a kernel zeroing a page) per fp32 step of batch 100 here.
    Heap allocations up to 32 MiB and no trimming bring that under 100 and make fp32 steps ~8%
    faster (bf16 ones not measurably; the README's speed section has the figures). The cost: the
    process keeps its peak heap until it exits."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # The mmap threshold first: setting either one turns off glibc's adaptive thresholds.
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def cpu_has_native_bf16() -> bool:
    """bf16 autocast only pays on CPUs with bf16 dot-product instructions (AVX-512-BF16, AMX);
    elsewhere PyTorch emulates it, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32; falls back to fp32 with a message
    where the hardware cannot do the asked-for precision well."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            print("note: this GPU has no bf16; using fp16 autocast instead", file=sys.stderr)
            return torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        print("note: fp16 autocast is for CUDA; on the CPU using fp32", file=sys.stderr)
        return None
    if not cpu_has_native_bf16():
        print("note: this CPU lacks native bf16 (AVX-512-BF16/AMX); using fp32", file=sys.stderr)
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
