"""Generate images for scorer prompts and score them (`iomm eval shapes --model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iomm.inference.pipeline import IOMMPipeline


def generate_for_prompts(model_path: str | Path, prompts: list[dict[str, Any]], out_dir: str | Path, *,
                         n_samples: int = 1, seed: int = 0, guidance_scale: float | None = None,
                         steps: int | None = None, pipeline: IOMMPipeline | None = None) -> Path:
    """Write `out_dir/metadata.jsonl` (each prompt's metadata plus its image paths) and the images."""
    from iomm.evaluation.shapes import save_prompt_images

    pipe = pipeline or IOMMPipeline.from_pretrained(model_path)
    texts = [p["prompt"] for p in prompts for _ in range(n_samples)]
    images = pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)
    save_prompt_images(out_dir, prompts, [images[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))])
    return Path(out_dir)
