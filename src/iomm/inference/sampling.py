"""Sampling: conditions in, images out (Euler flow-matching ODE with classifier-free guidance)."""

from __future__ import annotations

import torch

from iomm.generator.flow import euler_sample, guided
from iomm.model import IOMM, Condition


def initial_noise(model: IOMM, batch: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    side = model.cfg.data.resolution // model.codec.factor
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.codec.channels, side, side, generator=generator).to(device)


@torch.no_grad()
def sample_images(model: IOMM, cond: Condition, *, seed: int, steps: int, guidance_scale: float) -> torch.Tensor:
    """(B, 3, R, R) images in [0, 1]; the same seed gives the same images."""
    b, length = cond.tokens.shape[:2]
    null = model.null_condition(b, length)

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        return model.velocity(x, t, cond if conditional else null)

    noise = initial_noise(model, b, seed, cond.tokens.device)
    return model.codec.decode(euler_sample(guided(velocity, guidance_scale), noise, steps))
