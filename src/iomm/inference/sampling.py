"""Sampling: conditions in, images out (Euler flow-matching ODE with classifier-free guidance)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from iomm.generator.flow import euler_sample, guided
from iomm.generator.network import guidance_rescale
from iomm.model import IOMM, Condition
from iomm.per_sample_rng import Generators, randn


def initial_noise(model: IOMM, batch: int, generator: Generators, device: torch.device | str = "cpu") -> torch.Tensor:
    """Latent noise, drawn on the CPU (the same images on any device); a list of generators draws row by row."""
    side = model.cfg.data.resolution // model.codec.factor
    return randn((batch, model.codec.channels, side, side), generator).to(device)


@torch.no_grad()
def sample_images(model: IOMM, cond: Condition, *, generator: Generators, steps: int, guidance_scale: float,
                  scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> torch.Tensor:
    """(B, 3, R, R) images in [0, 1]; the same generator state gives the same images. With guidance, the
    conditional and unconditional halves run as one batch where their tokens have the same shape (as diffusers'
    pipelines run them)."""
    b, length = cond.tokens.shape[:2]
    null = model.null_condition(b, length) if guidance_scale != 1.0 else None

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        return model.velocity(x, t, cond if conditional else null)

    both_fn = None
    if null is not None and cond.mask is None and null.mask is None and null.tokens.shape == cond.tokens.shape:
        both = Condition(torch.cat([cond.tokens, null.tokens.to(cond.tokens)]),
                         torch.cat([cond.pooled, null.pooled.to(cond.pooled)]))

        def both_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            conditional, unconditional = model.velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return conditional, unconditional

    noise = initial_noise(model, b, generator, cond.tokens.device)
    scheduler = model.scheduler if scheduler is None else scheduler
    velocity_fn = guided(velocity, guidance_scale, guidance_rescale(model.cfg.generator), both_fn)
    return model.codec.decode(euler_sample(velocity_fn, noise, steps, scheduler))
