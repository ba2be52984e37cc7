"""Timing of the real training step, split by phase, and its model FLOPs utilisation (`iomm bench train-step`).

A `Trainer` is built from the config in a scratch run directory and `Trainer.train_step` runs on the
trainer's own batches; the phases are the ones the model and the trainer mark (`iomm.training.phases`).
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one more real step (forward and
backward, the frozen parts included); MFU divides them by the step's time and by this machine's matmul
peak, measured in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from iomm.config import Config
from iomm.training.distributed import Distributed
from iomm.training.precision import resolve_precision
from iomm.training.trainer import Trainer


def bench_train_step(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Seconds per step for each phase (conditioning forward, codec encode, generator forward, generator
    backward, conditioning backward, optimizer + EMA), the whole `train_step`, and the batch it was given;
    images/s of the whole step. The first `warmup` steps are not timed."""
    with tempfile.TemporaryDirectory(prefix="iomm-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), progress=False, dist=Distributed())
        timer = trainer.model.timer
        timer.enabled = True
        accum = cfg.train.grad_accum
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    timer.reset()
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
    peak = matmul_peak()
    generator_s = per_step.get("generator_forward", 0.0) + per_step.get("generator_backward", 0.0)
    return {
        "images_per_s": cfg.train.batch_size * accum / per_step["step"],
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


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul FLOP/s at the current thread count: the best of `repeats` n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
