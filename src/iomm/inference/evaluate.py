"""Generate images for scorer prompts and score them (`iomm eval shapes --model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iomm.inference.pipeline import IOMMPipeline


def generate_for_prompts(model_path: str | Path, prompts: list[dict[str, Any]], out_dir: str | Path, *,
                         n_samples: int = 1, seed: int = 0, guidance_scale: float | None = None,
                         steps: int | None = None, pipeline: IOMMPipeline | None = None) -> Path:
    """Write `out_dir/metadata.jsonl` (each prompt's metadata plus its image paths) and the images."""
    pipe = pipeline or IOMMPipeline.from_pretrained(model_path)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    texts = [p["prompt"] for p in prompts for _ in range(n_samples)]
    images = pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)
    with (out / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            paths = []
            for k in range(n_samples):
                name = f"images/{i:05d}_{k}.png"
                images[i * n_samples + k].save(out / name)
                paths.append(name)
            f.write(json.dumps({**prompt, "images": paths}) + "\n")
    return out
