"""`iomm bench sample`: text-to-image with iomm's sampler (as `IOMMPipeline` runs it) against diffusers' own
scheduler loop on the same generator, conditions and noise: the loop its pipelines write, with the conditional
and unconditional halves in one batch. Both are timed from the same conditions to the decoded images."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from iomm.generator.flow import TIMESTEP_SCALE, flow_scheduler, output_to_velocity
from iomm.generator.network import run_generator
from iomm.inference.sampling import initial_noise, sample_images
from iomm.model import IOMM, Condition


@torch.no_grad()
def diffusers_loop(model: IOMM, cond: Condition, noise: torch.Tensor, steps: int, guidance_scale: float,
                   scheduler: FlowMatchEulerDiscreteScheduler) -> torch.Tensor:
    """Images from diffusers' scheduler loop: `set_timesteps`, then per step one generator call (on
    [unconditional; conditional] where guidance > 1, as diffusers' pipelines batch them), the guided velocity,
    `scheduler.step`; the VAE decode."""
    if cond.mask is not None:
        raise ValueError("iomm bench sample: conditions with a padding mask (a raw adapter) are not supported")
    guided = guidance_scale != 1.0
    b = noise.shape[0]
    tokens, pooled = cond.tokens, cond.pooled
    if guided:
        null = model.null_condition(b, cond.tokens.shape[1])
        tokens, pooled = torch.cat([null.tokens, tokens]), torch.cat([null.pooled, pooled])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        out = run_generator(model.generator, x, t.expand(len(x)), tokens, pooled)
        velocity = output_to_velocity(model.cfg.flow, x, out, (t / TIMESTEP_SCALE).expand(len(x)))
        if guided:
            unconditional, conditional = velocity.chunk(2)
            velocity = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(velocity, t, latents).prev_sample
    return model.codec.decode(latents)


def _best_times(fns: list[Callable[[], torch.Tensor]], repeats: int) -> list[tuple[float, torch.Tensor]]:
    """The best of `repeats` timings of each function, the functions taking turns (a shared machine's speed
    drifts), and each one's output."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def bench_sample(model: IOMM, prompts: list[str], steps: int, guidance_scale: float, repeats: int = 3,
                 seed: int = 0) -> dict[str, float]:
    """Seconds (best of `repeats`) of both samplers for the same prompts, and how far apart their images are."""
    cond = model.condition_texts(prompts)
    scheduler = model.scheduler or flow_scheduler()

    def ours() -> torch.Tensor:
        return sample_images(model, cond, generator=torch.Generator().manual_seed(seed), steps=steps,
                             guidance_scale=guidance_scale, scheduler=scheduler)

    def theirs() -> torch.Tensor:
        noise = initial_noise(model, len(prompts), torch.Generator().manual_seed(seed), cond.tokens.device)
        return diffusers_loop(model, cond, noise, steps, guidance_scale, scheduler)

    (ours_s, ours_images), (theirs_s, theirs_images) = _best_times([ours, theirs], repeats)
    return {"images": len(prompts), "steps": steps, "guidance_scale": guidance_scale, "iomm_s": ours_s,
            "diffusers_loop_s": theirs_s, "iomm_over_diffusers": ours_s / theirs_s,
            "max_abs_difference": float((ours_images - theirs_images).abs().max())}
