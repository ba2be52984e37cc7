"""The training sample grid: held-out images reconstructed from their masked conditions, and a condition-following
check.

The flow-matching loss is dominated by the unconditional prior; the error of a reconstruction against
its own original versus against a different image says whether the condition is followed.
"""

from __future__ import annotations

import torch

from iomm.config import Config
from iomm.inference.sampling import sample_images
from iomm.model import IOMM
from iomm.registry import builtin_data

HELD_OUT_SEED = 10**6
PANEL_SIZE = 8

PANEL_PROMPTS = (
    "a photo of a red circle", "a photo of a blue square", "a photo of a green triangle",
    "a photo of two yellow circles",
    "a photo of a purple square left of a cyan circle", "a photo of three triangles",
    "a photo of a red triangle and a green circle", "a photo of a blue circle above a yellow square",
)


@torch.no_grad()
def reconstruction_panel(model: IOMM, cfg: Config, originals: torch.Tensor,
                         steps: int | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Rows: originals, reconstructions from their masked conditions (fixed masks and noise)."""
    model.eval()
    device = next(model.generator.parameters()).device
    originals = originals.to(device)
    cond = model.condition_masked_images(originals, torch.Generator().manual_seed(HELD_OUT_SEED))
    recon = sample_images(model, cond, generator=torch.Generator().manual_seed(HELD_OUT_SEED),
                          steps=steps or cfg.flow.sample_steps, guidance_scale=cfg.flow.reconstruct_guidance)
    own = ((recon - originals) ** 2).mean().item()
    other = ((recon - originals.roll(1, dims=0)) ** 2).mean().item()
    model.train()
    return [originals.cpu(), recon.cpu()], {"recon_mse_own": own, "recon_mse_other": other}


@torch.no_grad()
def prompt_row(model: IOMM, cfg: Config, prompts: tuple[str, ...] = PANEL_PROMPTS) -> torch.Tensor:
    """Text-to-image samples for fixed prompts (fixed noise), for the stage-2 sample grid."""
    model.eval()
    images = sample_images(model, model.condition_texts(list(prompts)),
                           generator=torch.Generator().manual_seed(HELD_OUT_SEED), steps=cfg.flow.sample_steps,
                           guidance_scale=cfg.flow.guidance_scale)
    model.train()
    return images.cpu()


def sample_grid(model: IOMM, cfg: Config, held_out: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The trainer's sample grid: held-out originals and their regenerations (when there are at least two),
    plus text-to-image samples for fixed prompts in stage 2 (when the run trains on pairs)."""
    panel, metrics = reconstruction_panel(model, cfg, held_out) if len(held_out) >= 2 else ([], {})
    builtin = builtin_data(cfg.data.source)
    if panel and builtin is not None and builtin.grid_metrics is not None:
        metrics.update(builtin.grid_metrics(cfg, panel[1]))
    if cfg.train.mix_ratio < 1.0:
        row = prompt_row(model, cfg, PANEL_PROMPTS[:len(held_out)] if len(held_out) >= 2 else PANEL_PROMPTS)
        panel.append(row)
    return panel, metrics
