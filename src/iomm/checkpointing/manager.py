"""The one checkpoint manager of a training run, as torchtitan's `components/checkpoint.py`: what a checkpoint
holds, and how the trainer's state goes into one and comes back.

`run/checkpoints/step_N/` holds the weights, EMA and optimizer state as DCP shards (`weights/`, every rank its own:
iomm.checkpointing.weights), the EMA's LoRA adapters in diffusers' format when LoRA trains, the schedulers and
the trainer's own state (`state.json`: step, counters, data position) and the config. It is written into a
temporary folder on every rank and published atomically with its manifest (iomm.checkpointing.checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iomm.checkpointing.checkpoint import Group, latest_checkpoint, save_checkpoint
from iomm.checkpointing.weights import load_training_state, save_training_state
from iomm.config import Config, save_config
from iomm.ema import EMA
from iomm.generator.lora import lora_state, save_lora
from iomm.model import IOMM

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


def run_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer's own state saved in `checkpoint` (step, counters, data position, stream); empty where the
    checkpoint has none."""
    state = checkpoint / STATE_FILE
    return json.loads(state.read_text(encoding="utf-8")) if state.is_file() else {}


class CheckpointManager:
    def __init__(self, run_dir: Path, cfg: Config, model: IOMM, ema: EMA, optimizers: list[torch.optim.Optimizer],
                 schedulers: list[Any], group: Group, log: Callable[[str], None] = print) -> None:
        self.run_dir, self.cfg, self.model, self.ema = run_dir, cfg, model, ema
        self.optimizers, self.schedulers, self.group, self.log = optimizers, schedulers, group, log

    def save(self, step: int, run_state: dict[str, Any]) -> Path:
        """Every rank of the group calls this; `run_state` (the trainer's JSON-able state) is written by the main
        rank beside `step`, the schedulers and whether optimizer state was written."""
        def write(tmp: Path) -> None:
            has_optimizer = save_training_state(self.model, self.ema, self.optimizers, tmp)
            if self.cfg.train.lora.enabled:  # the EMA adapters in diffusers' LoRA format, loadable by plain diffusers
                with self.ema.applied():
                    adapters = lora_state(self.model.generator)
                if self.group.main:
                    save_lora(adapters, self.cfg.generator.kind, tmp)
            if not self.group.main:
                return
            state = {"step": step, **run_state, "schedulers": [s.state_dict() for s in self.schedulers],
                     "optimizer_state": has_optimizer}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            save_config(self.cfg, tmp / CONFIG_FILE)

        t = self.cfg.train
        return save_checkpoint(self.run_dir, step, write, keep_last=t.keep_last, keep_every=t.keep_every,
                               group=self.group)

    def latest(self) -> Path | None:
        """The newest intact checkpoint of the run (damaged ones are reported and passed over)."""
        return latest_checkpoint(self.run_dir, log=self.log)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Every rank: weights, EMA, optimizer and scheduler state into this rank's objects; returns the saved state
        (`step` and the trainer's own)."""
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        load_training_state(self.model, self.ema, self.optimizers, checkpoint, has_optimizer=state["optimizer_state"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        return state
