"""The optimizers of a run: AdamW for everything (the paper's B and L), or Muon for the 2-D weight matrices of the
generator's blocks with AdamW for the rest (the paper's XL). Both step the same LR schedule.

`torch.optim.Muon` runs with `adjust_lr_fn="match_rms_adamw"` (Moonlight's scaling), so one `train.lr` suits
both optimizers.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from iomm.config import TrainConfig
from iomm.training.parallel import generator_blocks


def lr_factor(step: int, *, steps: int, warmup: int, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warm-up, constant, then a linear fall to 0 over the final `decay_fraction`."""
    factor = min(1.0, (step + 1) / max(warmup, 1))
    if decay_fraction > 0:
        factor = min(factor, max(steps - step, 0) / max(decay_fraction * steps, 1.0))
    return factor


def muon_parameters(generator: nn.Module, params: dict[str, nn.Parameter], prefix: str = "generator.") -> set[str]:
    """Names of the 2-D weights inside the generator's blocks (not embeddings, norms, biases or the output)."""
    blocks = {id(m) for m in generator_blocks(generator)}
    inside = [f"{prefix}{name}." for name, m in generator.named_modules() if id(m) in blocks]
    return {name for name, p in params.items() if p.ndim == 2 and any(name.startswith(b) for b in inside)}


def build_optimizers(params: dict[str, nn.Parameter], generator: nn.Module,
                     train: TrainConfig) -> list[torch.optim.Optimizer]:
    adamw = partial(torch.optim.AdamW, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                    fused=train.fused_optimizer or None)
    if train.optimizer == "adamw":
        return [adamw(params.values())]
    matrices = muon_parameters(generator, params)
    muon = torch.optim.Muon([params[n] for n in sorted(matrices)], lr=train.lr, weight_decay=train.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return [muon, adamw([p for n, p in params.items() if n not in matrices])]


def build_schedulers(optimizers: list[torch.optim.Optimizer],
                     train: TrainConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    factor = partial(lr_factor, steps=train.steps, warmup=train.warmup_steps, decay_fraction=train.decay_fraction)
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]
