"""Trainable weights on disk: the sharded training state of a checkpoint.

A training checkpoint keeps its tensors in `weights/`, written by `torch.distributed.checkpoint` in the
safetensors format (`HuggingFaceStorageWriter`, one file per rank): every rank writes its own shards of the
weights, EMA and optimizer state, nothing is gathered on one rank, and any world size reads them back (DCP
reshards on load; no pickle is read). Keys: `model.<name>`, `ema.<name>`, `optim.<name>.<state>`.

`iomm export` consolidates it into a diffusers pipeline directory (iomm.inference.export).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from iomm.checkpointing.checkpoint import CheckpointError, resolve_checkpoint
from iomm.config import Config
from iomm.ema import EMA
from iomm.generator.lora import add_lora
from iomm.model import IOMM

WEIGHTS_DIR = "weights"
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


def _module_state(model: IOMM) -> dict[str, torch.Tensor]:
    """Every trainable module's state dict under `<module>.`: DTensor shards under FSDP2."""
    return {f"{name}.{k}": v for name, module in model.trainable().items() for k, v in module.state_dict().items()}


def _load_module_state(model: IOMM, state: dict[str, torch.Tensor]) -> None:
    """Each trainable module's `<module>.`-prefixed entries of `state`."""
    for name, module in model.trainable().items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")})


@contextlib.contextmanager
def _dcp() -> Iterator[bool]:
    """Whether DCP runs without a process group (one process), without its warning that it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield not (dist.is_available() and dist.is_initialized())


def _stored_keys(path: Path) -> set[str]:
    """The flattened keys (`optim.<name>.<state>`, ...) a checkpoint's weights hold."""
    return set(HuggingFaceStorageReader(str(path / WEIGHTS_DIR)).read_metadata().state_dict_metadata)


def _load(state: dict, path: Path) -> None:
    with _dcp() as no_dist:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / WEIGHTS_DIR)), no_dist=no_dist)


def save_training_state(model: IOMM, ema: EMA, optimizers: list[torch.optim.Optimizer], out: Path) -> bool:
    """Called by every rank: writes its shards to `out/weights`. Returns whether optimizer state was written
    (none before the first step: DCP would make it up with a zero step, and the resumed run would differ)."""
    state: dict = {"model": _module_state(model), "ema": ema.state_dict()}
    has_optimizer = all(optimizer.state for optimizer in optimizers)
    if has_optimizer:
        state["optim"] = get_optimizer_state_dict(model, optimizers, options=TRAINABLE_ONLY)["state"]
    with _dcp() as no_dist:
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(out / WEIGHTS_DIR), save_distributed=True),
                 no_dist=no_dist)
    return has_optimizer


def load_training_state(model: IOMM, ema: EMA, optimizers: list[torch.optim.Optimizer], path: Path, *,
                        has_optimizer: bool) -> None:
    """Called by every rank: weights, EMA and optimizer state into this rank's (possibly sharded) tensors."""
    state: dict = {"model": _module_state(model), "ema": ema.state_dict()}
    groups, options = None, TRAINABLE_ONLY
    if has_optimizer:
        full = get_optimizer_state_dict(model, optimizers, options=TRAINABLE_ONLY)
        stored = _stored_keys(path)
        # A parameter that never had a gradient (the token head of a run on pairs alone) has no optimizer state
        # in the checkpoint: it stays without one, as in the run that wrote it.
        state["optim"] = {name: entry for name, entry in full["state"].items()
                          if all(f"optim.{name}.{key}" in stored for key in entry)}
        groups = full["param_groups"]
        if len(state["optim"]) < len(full["state"]):
            options = StateDictOptions(ignore_frozen_params=True, strict=False)
    _load(state, path)
    _load_module_state(model, state["model"])
    ema.load_state_dict(state["ema"])
    if has_optimizer:
        set_optimizer_state_dict(model, optimizers, {"state": state["optim"], "param_groups": groups},
                                 options=options)


def load_trainable(model: IOMM, path: Path, *, use_ema: bool) -> None:
    """Trainable weights of a checkpoint (the EMA ones if `use_ema`) into an unsharded model."""
    if not (path / WEIGHTS_DIR).is_dir():
        raise CheckpointError(f"{path}: not a training checkpoint (no {WEIGHTS_DIR}/)")
    state: dict = {"model": {k: v.clone() for k, v in _module_state(model).items()}}
    if use_ema:
        state["ema"] = {name: p.detach().clone().float() for name, p in model.trainable_parameters().items()}
    _load(state, path)
    _load_module_state(model, state["model"])
    if use_ema:
        with torch.no_grad():
            for name, p in model.trainable_parameters().items():
                p.copy_(state["ema"][name].to(p.dtype))


def build_model(cfg: Config, model_fn: Callable[[Config], IOMM] = IOMM.from_config) -> IOMM:
    """The model a config trains: with `train.lora`, the base weights frozen and LoRA adapters on the generator.
    The base is `train.lora.base` (its EMA weights: adapter and connector frozen too, the adapters the only trained
    parameters), or else the generator alone (`generator.pretrained`, e.g. Qwen-Image's), beside a new adapter
    and connector that train in full."""
    model = model_fn(cfg)
    lora = cfg.train.lora
    if lora.enabled:
        if lora.base is not None:
            load_trainable(model, resolve_checkpoint(lora.base), use_ema=True)
            for module in model.trainable().values():
                module.requires_grad_(False)
        add_lora(model.generator, lora)
    return model
