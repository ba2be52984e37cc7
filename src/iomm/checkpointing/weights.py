"""Trainable weights on disk: the generator in diffusers format, adapter + connector (+ token head), and their EMA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from iomm.checkpointing.checkpoint import load_tensors, save_tensors
from iomm.model import IOMM
from iomm.training.ema import EMA

CONDITIONER = "conditioner.safetensors"
EMA_FILE = "ema.safetensors"
GENERATOR_DIR = "generator"


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-step, rank); stable across processes and runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _conditioner_modules(model: IOMM) -> dict[str, torch.nn.Module]:
    """The trainable modules besides the generator (adapter, connector, token head), saved together."""
    return {name: module for name, module in model.trainable().items() if name != "generator"}


def _conditioner_state(model: IOMM) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in _conditioner_modules(model).items()
            for k, v in module.state_dict().items()}


def trainable_state(model: IOMM, ema: EMA | None, out: Path) -> None:
    model.generator.save_pretrained(out / GENERATOR_DIR, safe_serialization=True)
    save_tensors(_conditioner_state(model), out / CONDITIONER)
    if ema is not None:
        save_tensors(ema.state_dict(), out / EMA_FILE)


def load_trainable(model: IOMM, path: Path, *, use_ema: bool, ema: EMA | None = None) -> None:
    """Load trainable weights from a checkpoint dir; `use_ema` puts the EMA weights into the model."""
    generator = type(model.generator).from_pretrained(path / GENERATOR_DIR)
    model.generator.load_state_dict(generator.state_dict())
    conditioner = load_tensors(path / CONDITIONER)
    for name, module in _conditioner_modules(model).items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in conditioner.items() if k.startswith(f"{name}.")})
    if not (path / EMA_FILE).is_file():
        return
    shadow = load_tensors(path / EMA_FILE)
    if ema is not None:
        ema.load_state_dict(shadow)
    if use_ema:
        params = {f"{name}.{n}": p for name, m in model.trainable().items() for n, p in m.named_parameters()}
        with torch.no_grad():
            for name, value in shadow.items():
                if name in params:
                    params[name].copy_(value.to(params[name].dtype))
