"""Prompt-metadata image folders: generate images for prompts, and read or write the folder layouts
(`metadata.jsonl` with "images" lists, or GenEval's <00000>/metadata.jsonl + samples/) that scorers read."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iomm.image_tensors import as_pil

if TYPE_CHECKING:
    from iomm.inference.pipeline import IOMMPipeline


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line (the per-item results files that `read_jsonl` and `iomm eval compare` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """("<file>:<line>", object) for each non-blank line of a JSONL file, gzipped where it ends in .gz (the
    studies' committed per-image records); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metadata file")
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            source = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}: invalid JSON ({error})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{source}: expected a JSON object, got {value!r:.80}")
            lines.append((source, value))
    return lines


def image_entries(images_dir: Path) -> list[tuple[str, dict[str, Any], list[Path]]]:
    """(source, prompt dict, image paths) from `metadata.jsonl` with "images" lists, or from the
    GenEval layout (<00000>/metadata.jsonl + <00000>/samples/*.png)."""
    flat = images_dir / "metadata.jsonl"
    if flat.is_file():
        entries = []
        for source, meta in read_jsonl(flat):
            images = meta.get("images")
            if not isinstance(images, list) or not images:
                raise ValueError(f"{source}: field 'images': expected a non-empty list of paths, got {images!r}")
            entries.append((source, meta, [images_dir / p for p in images]))
        return entries
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and p.name.isdigit()) if images_dir.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{images_dir}: expected metadata.jsonl or GenEval folders <00000>/metadata.jsonl")
    entries = []
    for folder in folders:
        metadata = folder / "metadata.jsonl"
        lines = read_jsonl(metadata)
        if len(lines) != 1:
            raise ValueError(f"{metadata}: expected one prompt line (GenEval layout), got {len(lines)}")
        (source, meta), = lines
        samples = sorted(p for p in (folder / "samples").glob("*.png") if p.stem.isdigit())  # as GenEval reads them
        entries.append((source, meta, samples))
    return entries


def save_prompt_images(out_dir: str | Path, prompts: list[Mapping[str, Any]],
                       images: list[list[Any]]) -> Path:
    """Write the layout `score_directory` reads: images/<prompt>_<sample>.png and metadata.jsonl
    (each prompt dict plus its "images" list). `images[i]` holds prompt i's samples (arrays or PIL).
    Returns the metadata path."""
    if len(prompts) != len(images):
        raise ValueError(f"save_prompt_images: expected one image list per prompt, "
                         f"got {len(prompts)} prompts and {len(images)} lists")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (meta, samples) in enumerate(zip(prompts, images)):
        names = []
        for k, image in enumerate(samples):
            name = f"images/{i:05d}_{k:02d}.png"
            as_pil(image).save(out_dir / name)
            names.append(name)
        lines.append(json.dumps({**meta, "images": names}))
    metadata = out_dir / "metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n")
    return metadata


def generate_for_prompts(model_path: str | Path, prompts: list[dict[str, Any]], out_dir: str | Path, *,
                         n_samples: int = 1, seed: int = 0, guidance_scale: float | None = None,
                         steps: int | None = None, pipeline: IOMMPipeline | None = None) -> Path:
    """Write `out_dir/metadata.jsonl` (each prompt's metadata plus its image paths) and the images."""
    from iomm.inference.pipeline import IOMMPipeline, generate_images

    pipe = pipeline or IOMMPipeline.from_pretrained(model_path)
    texts = [p["prompt"] for p in prompts for _ in range(n_samples)]
    images = generate_images(pipe, texts, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale)
    save_prompt_images(out_dir, prompts, [images[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))])
    return Path(out_dir)
