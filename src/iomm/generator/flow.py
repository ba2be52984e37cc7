"""Flow matching: x_t = (1 - t) x + t z, the network predicts z - x; Euler ODE sampling with CFG."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from iomm.config import FlowConfig
from iomm.per_sample_rng import Generators, per_row, randn

# diffusers' flow-matching models take timesteps in [0, 1000].
TIMESTEP_SCALE = 1000.0

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_timesteps(cfg: FlowConfig, batch: int, generator: Generators = None) -> torch.Tensor:
    scheme = "logit_normal" if cfg.timestep_sampling == "logit_normal" else "none"
    return per_row(lambda n, g: compute_density_for_timestep_sampling(
        scheme, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=g), batch, generator)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1.0 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def flow_matching_loss(velocity: VelocityFn, latents: torch.Tensor, cfg: FlowConfig,
                       generator: Generators) -> torch.Tensor:
    """MSE between the predicted and the true velocity at x_t, for noise and t drawn from `generator`."""
    noise = randn(latents.shape, generator).to(latents)
    t = sample_timesteps(cfg, latents.shape[0], generator).to(latents.device)
    prediction = velocity(interpolate(latents, noise, t), t)
    return F.mse_loss(prediction.float(), velocity_target(latents, noise).float())


def velocity_from_sample(x_t: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, min_t: float) -> torch.Tensor:
    """The velocity z - x implied by a predicted clean sample x: x_t = (1 - t) x + t z gives (x_t - x) / t."""
    t = t.clamp(min=min_t).view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return (x_t - sample) / t


def output_to_velocity(cfg: FlowConfig, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity from the generator's raw output: the output itself, or implied by it (`flow.prediction`)."""
    if cfg.prediction == "sample":
        return velocity_from_sample(x_t, output, t, cfg.min_t)
    return output


Rescale = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (conditional, guided) -> guided, rescaled


def guided(velocity_fn: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], scale: float,
           rescale: Rescale | None = None,
           both_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
           ) -> VelocityFn:
    """Classifier-free guidance: v_null + s (v_cond - v_null), then `rescale` where the generator's own pipeline
    rescales it (Qwen-Image's true CFG); s == 1 is the conditional prediction. `both_fn(x, t)` gives
    (v_cond, v_null) in one call, where they can share a batch."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return velocity_fn(x, t, True)
        cond, null = both_fn(x, t) if both_fn is not None else (velocity_fn(x, t, True), velocity_fn(x, t, False))
        combined = null + scale * (cond - null)
        return combined if rescale is None else rescale(cond, combined)

    return fn


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler scheduler with this flow's time: t in [0, 1] as timesteps in [0, 1000]."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(TIMESTEP_SCALE), shift=1.0)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int,
                 scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with diffusers' flow-matching Euler scheduler.

    A fresh copy of `scheduler` (default: `flow_scheduler()`) each call: `set_timesteps` mutates its sigmas. With
    dynamic shifting (Qwen-Image's scheduler) the sigmas and shift are those its pipeline sets.
    """
    scheduler = flow_scheduler() if scheduler is None else FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    if scheduler.config.use_dynamic_shifting:  # a resolution-dependent shift, set as the Qwen-Image pipeline does
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift  # (a pipeline: slow to import)

        seq_len = noise[0, 0].numel() // 4  # tokens of 2x2 latent patches
        mu = calculate_shift(seq_len, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                             scheduler.config.base_shift, scheduler.config.max_shift)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=noise.device)
    else:
        scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for timestep in scheduler.timesteps:
        t = (timestep / TIMESTEP_SCALE).expand(x.shape[0]).to(x.device)
        x = scheduler.step(velocity_fn(x, t).to(x.dtype), timestep, x).prev_sample
    return x
