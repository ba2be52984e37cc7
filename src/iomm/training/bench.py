"""Timing of the real training step, split by phase (`iomm bench train-step`).

A `Trainer` is built from the config in a scratch run directory and `Trainer.train_step` runs on the
trainer's own batches; the phases are the ones the model and the trainer mark (`iomm.training.phases`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

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
    return {
        "images_per_s": cfg.train.batch_size * accum / per_step["step"],
        "seconds_per_step": per_step,
        "batch_size": cfg.train.batch_size,
        "grad_accum": accum,
        "threads": torch.get_num_threads(),
        "mixed_precision": resolve_precision(cfg.train.mixed_precision),
        "masking_mode": cfg.masking.mode,
        "parameters": parameters,
    }
