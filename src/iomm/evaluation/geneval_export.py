"""Write generated images in the layouts the official benchmark scorers read.

- GenEval (djghosh13/geneval, `evaluation/evaluate_images.py`): one folder per prompt line,
  `<out>/<00000>/metadata.jsonl` holding that line and `<out>/<00000>/samples/<0000>.png`.
- DPG-Bench (ELLA's `dpg_bench/compute_dpg_bench.py`): `<out>/<item_id>.png`, where item_id is the
  prompt file's stem; with 4 samples the file is a 2x2 grid of tiles (score with `--pic-num 4` and
  `--resolution` = the tile side, i.e. the model's resolution).
- WISE (`gpt_eval.py`): `<out>/<prompt_id>.png` for every record of its prompt JSON files.

`generate_fn(prompts, seed)` is supplied by the caller and returns one PIL image per prompt
(`iomm eval export` passes the IOMM pipeline).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from iomm.evaluation.prompt_images import read_jsonl
from iomm.image_tensors import as_pil

GenerateFn = Callable[[list[str], int], list[Image.Image]]
# Images per prompt by default: GenEval's protocol (4), DPG-Bench's --pic-num 4 grid, WISE one image.
DEFAULT_SAMPLES: dict[str, int] = {"geneval": 4, "dpg": 4, "wise": 1}


def _generate(generate_fn: GenerateFn, prompt: str, n: int, seed: int) -> list[Image.Image]:
    images = list(generate_fn([prompt] * n, seed))
    if len(images) != n:
        raise ValueError(f"generate_fn returned {len(images)} images for {n} prompts ({prompt!r})")
    return [as_pil(image) for image in images]


def read_geneval_metadata(metadata_path: str | Path) -> list[dict[str, Any]]:
    """The prompt dicts of an evaluation_metadata.jsonl, all checked before anything is generated
    (errors name the file, the line and the field)."""
    prompts = []
    for source, meta in read_jsonl(metadata_path):
        if not isinstance(meta.get("prompt"), str):
            raise ValueError(f"{source}: field 'prompt': expected a string, got {meta.get('prompt')!r}")
        prompts.append(meta)
    if not prompts:
        raise ValueError(f"{metadata_path}: no prompts")
    return prompts


def write_geneval_layout(metadata_path: str | Path, out_dir: str | Path, generate_fn: GenerateFn,
                         n_samples: int = 4, seed: int = 0) -> list[Path]:
    """One folder per line of GenEval's evaluation_metadata.jsonl; prompt i uses seed `seed + i`.
    Returns the folders written."""
    if n_samples < 1:
        raise ValueError(f"n_samples for geneval: expected >= 1, got {n_samples}")
    out_dir = Path(out_dir)
    folders = []
    for index, meta in enumerate(read_geneval_metadata(metadata_path)):
        images = _generate(generate_fn, meta["prompt"], n_samples, seed + index)
        folder = out_dir / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for k, image in enumerate(images):
            image.save(folder / "samples" / f"{k:04d}.png")
        folders.append(folder)
    return folders


def _grid(images: list[Image.Image]) -> Image.Image:
    """2x2 grid (DPG-Bench crops tiles (0,0), (r,0), (0,r), (r,r) for --pic-num 4)."""
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % 2) * w, (k // 2) * h))
    return grid


def load_prompts(source: str | Path, naming: Literal["dpg", "wise"]) -> list[tuple[str, str]]:
    """(name, prompt) pairs: DPG-Bench reads a folder of <item_id>.txt files (or one .txt file),
    WISE a JSON list of records with "prompt_id" and "Prompt"."""
    path = Path(source)
    if naming == "dpg":
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{path}: expected a DPG-Bench prompts folder of .txt files or one .txt file")
        return [(f.stem, f.read_text(encoding="utf-8").strip()) for f in files]
    if naming == "wise":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of WISE records, got {type(records).__name__}")
        pairs = []
        for i, record in enumerate(records):
            if not isinstance(record, dict) or "prompt_id" not in record or "Prompt" not in record:
                got = sorted(record) if isinstance(record, dict) else record
                raise ValueError(f"{path}: record {i}: expected fields 'prompt_id' and 'Prompt', got {got!r}")
            pairs.append((str(record["prompt_id"]), record["Prompt"]))
        return pairs
    raise ValueError(f"naming: expected 'dpg' or 'wise', got {naming!r}")


def write_one_per_prompt(prompts: str | Path | Sequence[tuple[str, str]], out_dir: str | Path,
                         generate_fn: GenerateFn, naming: Literal["dpg", "wise"] = "dpg",
                         n_samples: int = 1, seed: int = 0) -> list[Path]:
    """One `<name>.png` per prompt. `prompts` is a prompts file or folder (see `load_prompts`) or a
    list of (name, prompt). DPG-Bench takes n_samples 1 or 4 (a 2x2 grid); WISE takes 1."""
    allowed = (1, 4) if naming == "dpg" else (1,)
    if n_samples not in allowed:
        raise ValueError(f"n_samples for {naming}: expected one of {allowed}, got {n_samples}")
    pairs = load_prompts(prompts, naming) if isinstance(prompts, (str, Path)) else list(prompts)
    duplicates = sorted(name for name, count in Counter(name for name, _ in pairs).items() if count > 1)
    if duplicates:
        raise ValueError(f"prompt names must be unique (one <name>.png each), got duplicates {duplicates[:5]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (name, prompt) in enumerate(pairs):
        images = _generate(generate_fn, prompt, n_samples, seed + index)
        path = out_dir / f"{name}.png"
        (_grid(images) if n_samples == 4 else images[0]).save(path)
        written.append(path)
    return written
