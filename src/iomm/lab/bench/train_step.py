"""Timing of the real training step, split by phase, and its model FLOPs utilisation (`iomm bench train-step`).

A `Trainer` is built from the config in a scratch run directory and `Trainer.train_step` runs on the
trainer's own batches; the phases are the ones the model and the trainer mark (`iomm.profiling`).
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one more real step (forward and
backward, the frozen parts included); MFU divides them by the step's time and by this machine's fastest matmul
peak (fp32, or native bf16 where it is faster), measured in the same run, so that a slow precision never looks
efficient by being divided by its own slow peak.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from iomm.config import Config
from iomm.training.distributed import Distributed
from iomm.training.hardware import fastest_matmul_peak, peak_memory_mib
from iomm.training.precision import resolve_precision
from iomm.training.trainer import Trainer

# The paper's algorithm as written: fp32, masked tokens zeroed, the whole condition differentiated through the
# frozen LLM, the VAE and vision tower run on every image, eager blocks, AdamW's per-parameter loop.
NAIVE = ["train.mixed_precision=fp32", "masking.mode=zero", "mllm.prefix_cache=false", "data.latents=null",
         "train.compile=false", "train.fused_optimizer=false", "train.activation_checkpointing=false"]


def bench_train_step(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Seconds per step for each phase (conditioning forward, codec encode, generator forward, generator
    backward, conditioning backward, optimizer + EMA), the whole `train_step`, and the batch it was given;
    images/s of the whole step. The first `warmup` steps are not timed."""
    with tempfile.TemporaryDirectory(prefix="iomm-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), progress=False, dist=Distributed())
        timer = trainer.timer
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
    precision = resolve_precision(cfg.train.mixed_precision, trainer.device.type)
    peak = fastest_matmul_peak(trainer.device)
    generator_s = sum(per_step.get(phase, 0.0) for phase in GENERATOR_PHASES)
    generator_flops = sum(flops.get(phase, 0) for phase in GENERATOR_PHASES)
    return {
        "images_per_s": cfg.train.batch_size * accum / per_step["step"],
        "warmup_s": warmup_s,  # the untimed first steps: torch.compile compiles there
        "peak_memory_mib": peak_memory_mib(),
        "seconds_per_step": per_step,
        "batch_size": cfg.train.batch_size,
        "grad_accum": accum,
        "threads": torch.get_num_threads(),
        "mixed_precision": precision,
        "masking_mode": cfg.masking.mode,
        "parameters": parameters,
        "flops_per_step": flops,
        "matmul_peak_flops": peak,  # the faster of fp32 and native bf16: a slow precision cannot look efficient
        "mfu": {"step": flops["step"] / (per_step["step"] * peak),
                "generator": generator_flops / (generator_s * peak) if generator_s else None},
    }


GENERATOR_PHASES = ("generator_forward", "generator_backward")


def step_flops(trainer: Trainer, micro: list) -> dict[str, int]:
    """FLOPs of one real `train_step`: the whole step and each of its phases (the timer's boundaries)."""
    timer = trainer.timer
    timer.enabled, timer.flop_counter = True, FlopCounterMode(display=False)
    timer.reset()
    try:
        with timer.flop_counter:
            with timer("step"):
                trainer.train_step(micro)
    finally:
        timer.enabled, timer.flop_counter = False, None
    return dict(timer.flop_totals)
