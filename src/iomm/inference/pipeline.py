"""`IOMMPipeline`: text-to-image and zero-shot editing from a trained checkpoint, diffusers-style call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from iomm.checkpointing.checkpoint import resolve_checkpoint
from iomm.checkpointing.weights import load_trainable
from iomm.config import Config, load_config
from iomm.data.images import prepare_image
from iomm.image_tensors import to_pil
from iomm.inference.sampling import sample_images
from iomm.model import IOMM


def load_model(path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu",
               model_fn: Callable[[Config], IOMM] = IOMM.from_config) -> IOMM:
    """A checkpoint dir, or a run dir (its newest intact checkpoint), with EMA weights by default."""
    checkpoint = resolve_checkpoint(path)
    cfg = load_config(checkpoint / "config.yaml")
    model = model_fn(cfg)
    load_trainable(model, checkpoint, use_ema=use_ema)
    return model.to(device).eval()


class IOMMPipeline:
    def __init__(self, model: IOMM):
        self.model = model.eval()
        self.cfg = model.cfg

    @classmethod
    def from_pretrained(cls, path: str | Path, *, use_ema: bool = True, device: str = "cpu") -> "IOMMPipeline":
        return cls(load_model(path, use_ema=use_ema, device=device))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, image: Image.Image | list[Image.Image] | None = None,
                 instruction: str | list[str] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, batch_size: int = 64) -> list[Image.Image]:
        """Text-to-image (`prompt`) or zero-shot editing (`image` + `instruction`); deterministic per seed.

        Large prompt lists are generated in chunks; chunk i uses seed + i so results do not depend on
        batch_size only when it is left at its default.
        """
        steps = num_inference_steps or self.cfg.flow.sample_steps
        scale = self.cfg.flow.guidance_scale if guidance_scale is None else guidance_scale
        if prompt is not None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            conds = [(texts[i:i + batch_size], None) for i in range(0, len(texts), batch_size)]
        elif image is not None and instruction is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            instructions = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
            if len(instructions) != len(images):
                raise ValueError(f"edit: {len(images)} images but {len(instructions)} instructions")
            conds = [(instructions[i:i + batch_size], images[i:i + batch_size])
                     for i in range(0, len(images), batch_size)]
        else:
            raise ValueError("give a prompt (text-to-image), or an image and an instruction (editing)")
        out: list[Image.Image] = []
        device = next(self.model.generator.parameters()).device
        for chunk, (texts, refs) in enumerate(conds):
            if refs is None:
                cond = self.model.condition_texts(texts)
            else:
                pixels = torch.stack([prepare_image(r, self.cfg.data.resolution) for r in refs]).to(device)
                cond = self.model.condition_edit(pixels, texts)
            out += to_pil(sample_images(self.model, cond, seed=seed + chunk, steps=steps, guidance_scale=scale))
        return out
