"""Stage-1 reconstruction of held-out world scenes by a trained model, each image from its own masked condition,
scored with `iomm.nano.fidelity` (`iomm eval reconstruct`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from iomm.image_tensors import to_uint8
from iomm.inference.sampling import sample_images
from iomm.nano.fidelity import compare, summarize
from iomm.nano.registration import WORLD
from iomm.nano.registration import held_out_scenes as world_held_out_scenes
from iomm.nano.world import Scene

BATCH = 32  # images regenerated at once

if TYPE_CHECKING:
    from iomm.config import Config
    from iomm.model import IOMM


def held_out_scenes(model: IOMM, n: int) -> tuple[torch.Tensor, list[Scene]]:
    """The first n images of the world's held-out stream (the sample grid's originals first) and their scenes."""
    cfg = model.cfg
    if cfg.data.source != WORLD:
        raise ValueError(f"eval reconstruct: expected a run trained on data.source={WORLD!r} (scene metadata "
                         f"is needed), got data.source={cfg.data.source!r}")
    return world_held_out_scenes(cfg, n)


def reconstruction_guidance(cfg: Config, guidance_scale: float | None = None) -> float:
    """The guidance a regeneration samples at: `guidance_scale`, else the run's `flow.reconstruct_guidance`."""
    return cfg.flow.reconstruct_guidance if guidance_scale is None else guidance_scale


@torch.no_grad()
def reconstruct(model: IOMM, originals: torch.Tensor, ratio: float, seed: int, steps: int | None = None,
               guidance_scale: float | None = None) -> torch.Tensor:
    """Regenerations (B, 3, R, R) in [0, 1] of originals from their stage-1 condition masked at `ratio`."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a value in [0, 1), got {ratio}")
    cfg = model.cfg
    steps = steps or cfg.flow.sample_steps
    scale = reconstruction_guidance(cfg, guidance_scale)
    device = next(model.generator.parameters()).device
    masks = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for chunk, start in enumerate(range(0, originals.shape[0], BATCH)):
        cond = model.condition_masked_images(originals[start:start + BATCH].to(device), masks, ratio=ratio)
        out.append(sample_images(model, cond, generator=torch.Generator().manual_seed(seed + chunk), steps=steps,
                                 guidance_scale=scale).cpu())
    model.train(was_training)
    return torch.cat(out)


def records_for(scenes: Sequence[Scene], originals: torch.Tensor, recon: torch.Tensor) -> list[dict[str, Any]]:
    """One record per image: the `compare` attributes plus `mse_own` and `mse_other`."""
    resolution = originals.shape[-1]
    own = ((recon - originals) ** 2).mean(dim=(1, 2, 3))
    other = ((recon - originals.roll(1, dims=0)) ** 2).mean(dim=(1, 2, 3))
    return [{**compare(scene, image, resolution), "mse_own": float(own[i]), "mse_other": float(other[i])}
            for i, (scene, image) in enumerate(zip(scenes, to_uint8(recon)))]


def default_ratios(model: IOMM) -> list[float]:
    """0 (the whole image) and the run's training ratio `masking.ratio`."""
    return sorted({0.0, float(model.cfg.masking.ratio)})


def reconstruction_records(model: IOMM, ratios: Sequence[float] | None = None, n: int = 64, seed: int = 0, *,
                           steps: int | None = None, guidance_scale: float | None = None) -> dict[float, list[dict]]:
    """{ratio: per-image records (`records_for`, plus `scene`, its index)} of the first n held-out world images
    regenerated at each masking ratio.

    Masks and noise come from `seed` (the same for each ratio); the images are fixed (the held-out stream), so
    two models evaluated with the same n and seed are compared on the same scenes, masks and noise.
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    ratios = default_ratios(model) if ratios is None else [float(r) for r in ratios]
    originals, scenes = held_out_scenes(model, n)
    out = {}
    for ratio in ratios:
        recon = reconstruct(model, originals, ratio, seed, steps, guidance_scale)
        out[ratio] = [{"scene": i, **record} for i, record in enumerate(records_for(scenes, originals, recon))]
    return out


def evaluate_reconstruction(model: IOMM, ratios: Sequence[float] | None = None, n: int = 64, seed: int = 0, *,
                            steps: int | None = None, guidance_scale: float | None = None) -> dict[float, dict]:
    """{ratio: summary} of `reconstruction_records`."""
    return summaries(reconstruction_records(model, ratios, n, seed, steps=steps, guidance_scale=guidance_scale))


def summaries(records: dict[float, list[dict]]) -> dict[float, dict]:
    """{ratio: the mean of each attribute over its records} (the scene index left out)."""
    return {ratio: summarize({k: v for k, v in r.items() if k != "scene"} for r in rows)
            for ratio, rows in records.items()}
