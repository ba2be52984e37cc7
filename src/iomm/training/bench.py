"""Timing of the real training step, split by phase, and its model FLOPs utilisation (`iomm bench train-step`).

A `Trainer` is built from the config in a scratch run directory and `Trainer.train_step` runs on the
trainer's own batches; the phases are the ones the model and the trainer mark (`iomm.training.phases`).
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one more real step (forward and
backward, the frozen parts included); MFU divides them by the step's time and by this machine's matmul
peak, measured in the same run.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from iomm.config import Config
from iomm.training.distributed import Distributed
from iomm.training.precision import resolve_precision
from iomm.training.trainer import Trainer

# The paper's algorithm as written: fp32, masked tokens zeroed, the whole condition differentiated through the
# frozen LLM, the VAE and vision tower run on every image, eager blocks, AdamW's per-parameter loop.
NAIVE = ["train.mixed_precision=fp32", "masking.mode=zero", "mllm.prefix_cache=false", "data.latents=null",
         "train.compile=false", "train.fused_optimizer=false", "train.activation_checkpointing=false"]


def machine() -> str:
    """CPU model and core count (Linux reports no processor name through `platform`), and the GPU if one is used."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{name}, {os.cpu_count()} cores{gpu}"


def bench_train_step(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Seconds per step for each phase (conditioning forward, codec encode, generator forward, generator
    backward, conditioning backward, optimizer + EMA), the whole `train_step`, and the batch it was given;
    images/s of the whole step. The first `warmup` steps are not timed."""
    with tempfile.TemporaryDirectory(prefix="iomm-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), progress=False, dist=Distributed())
        timer = trainer.model.timer
        timer.enabled = True
        accum = cfg.train.grad_accum
        start = time.perf_counter()
        warmup_s = 0.0
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    timer.reset()
                    warmup_s = time.perf_counter() - start
                with timer("data"):
                    micro = [trainer.batches[step * accum + k] for k in range(accum)]
                with timer("step"):
                    trainer.train_step(micro)
                trainer.step += 1
        finally:
            timer.enabled = False
            trainer.log.close()
        per_step = {name: seconds / steps for name, seconds in timer.totals.items()}
        parameters = {name: sum(p.numel() for p in module.parameters())
                      for name, module in trainer.model.trainable().items()}
        flops = step_flops(trainer, [trainer.batches[k] for k in range(accum)])
    peak = matmul_peak(trainer.device)
    generator_s = per_step.get("generator_forward", 0.0) + per_step.get("generator_backward", 0.0)
    return {
        "images_per_s": cfg.train.batch_size * accum / per_step["step"],
        "warmup_s": warmup_s,  # the untimed first steps: torch.compile compiles there
        "peak_memory_mib": peak_memory_mib(),
        "seconds_per_step": per_step,
        "batch_size": cfg.train.batch_size,
        "grad_accum": accum,
        "threads": torch.get_num_threads(),
        "mixed_precision": resolve_precision(cfg.train.mixed_precision),
        "masking_mode": cfg.masking.mode,
        "parameters": parameters,
        "flops_per_step": flops,
        "matmul_peak_flops": peak,
        "mfu": {"step": flops["step"] / (per_step["step"] * peak),
                "generator": flops["generator"] / (generator_s * peak) if generator_s else None},
    }


COMPONENTS = ("mllm", "adapter", "connector", "generator", "codec", "token_head")


def step_flops(trainer: Trainer, micro: list) -> dict[str, int]:
    """FLOPs of one real `train_step`, whole and per component of the model."""
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(micro)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return {"step": counts.get("Global", 0), **{name: counts.get(f"IOMM.{name}", 0) for name in COMPONENTS}}


def peak_memory_mib() -> float:
    """Peak memory of this process so far: CUDA memory allocated by torch where a GPU is in use, else the
    process's peak resident set (each `iomm bench speedups` row runs in its own process)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_peak(device: torch.device | None = None, repeats: int = 10) -> float:
    """This machine's matmul FLOP/s: fp32 1024 x 1024 products on a CPU (at the current thread count), bf16
    8192 x 8192 on a GPU; the best of `repeats`."""
    cuda = device is not None and device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
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
