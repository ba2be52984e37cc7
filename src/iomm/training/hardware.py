"""What this machine is: CPU model and instruction-set flags, whether bf16 runs natively, and a record of both
for every result file.

"Supported" is not "fast": oneDNN accepts bf16 on any AVX512 CPU (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is True there), but without AVX512_BF16 or AMX it converts in software. Measured on an AVX512 Xeon without
either: a 512x512 matmul at 93 GFLOP/s in fp32, 29 in bf16. So a CPU counts as bf16-native only by its flags.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # the instructions that compute bf16 in hardware
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO = Path("/proc/cpuinfo")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux lists them in /proc/cpuinfo (empty where there is none)."""
    if not CPUINFO.is_file():
        return frozenset()
    for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The processor's name (Linux reports none through `platform`)."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bf16_is_native(device_type: str = "cpu") -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def bf16_reason(device_type: str = "cpu") -> str:
    """Why bf16 is or is not native here, in words for a log line."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        return f"{name} {'computes' if bf16_is_native('cuda') else 'does not compute'} bf16 natively"
    found = sorted(cpu_flags() & BF16_CPU_FLAGS)
    if found:
        return f"this CPU has {' and '.join(found)}"
    return "this CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated, about 3-100x slower)"


def machine_facts() -> dict[str, Any]:
    """The record every result file carries: CPU, its relevant flags, threads, torch, and the GPU if used."""
    facts: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in REPORTED_CPU_FLAGS if f in cpu_flags()],
        "bf16_native": bf16_is_native("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def machine() -> str:
    """`machine_facts` in one line, for benchmark files and logs."""
    facts = machine_facts()
    flags = "/".join(facts["flags"]) or torch.backends.cpu.get_cpu_capability()
    bf16 = "bf16 native" if facts["bf16_native"] else "bf16 emulated"
    gpu = f", {facts['gpu']}" if "gpu" in facts else ""
    return f"{facts['cpu']}, {facts['cores']} cores, {flags}, {bf16}, torch {facts['torch']}{gpu}"


def peak_memory_mib() -> float:
    """Peak memory of this process so far: CUDA memory allocated by torch where a GPU is in use, else the
    process's peak resident set (each `iomm bench speedups` row runs in its own process)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fastest_matmul_peak(device: torch.device) -> float:
    """The higher of the fp32 and the bf16 matmul peak, bf16 measured only where it is native (where it is
    emulated it is slower by construction)."""
    peak = matmul_peak(device, torch.float32)
    if bf16_is_native(device.type):
        peak = max(peak, matmul_peak(device, torch.bfloat16))
    return peak


def matmul_peak(device: torch.device | None = None, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """This machine's matmul FLOP/s in `dtype`: n x n products, n = 1024 on a CPU (at the
    current thread count), 8192 on a GPU; the best of `repeats`."""
    cuda = device is not None and device.type == "cuda"
    n = 8192 if cuda else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
