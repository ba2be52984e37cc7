"""What a model directory on disk holds, read without loading any weights.

A model path may be a diffusers pipeline directory (`model_index.json`): each part is then read from its own
subfolder, as diffusers lays it out (`text_encoder/` and `tokenizer/` for the MLLM, `vae/`, `transformer/`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PIPELINE_INDEX = "model_index.json"
VAE_DIR = ("a diffusers AutoencoderKL directory (config.json with block_out_channels), an AutoencoderKLQwenImage "
           "directory (temperal_downsample), or a pipeline directory holding either in vae/")
QWEN_IMAGE_TRANSFORMER = "QwenImageTransformer2DModel"
QWEN_IMAGE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
QWEN_IMAGE_DIR = (f"a diffusers QwenImagePipeline directory ({PIPELINE_INDEX} naming a {QWEN_IMAGE_TRANSFORMER}, "
                  f"with the subfolders {', '.join(QWEN_IMAGE_PARTS)})")


def read_json(path: Path) -> Any:
    """A JSON file's content, None if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def path_exists(path: str, kind: str) -> bool:
    """Path.is_dir / is_file that say False instead of raising for names no file can have (too long, NUL)."""
    try:
        return Path(path).is_dir() if kind == "dir" else Path(path).is_file()
    except (OSError, ValueError):
        return False


def pipeline_index(path: str | Path | None) -> dict[str, Any] | None:
    """A diffusers pipeline directory's `model_index.json`, or None if `path` is not one."""
    index = read_json(Path(path) / PIPELINE_INDEX) if path is not None else None
    return index if isinstance(index, dict) else None


def component_dir(path: str | Path, component: str) -> Path:
    """Where a model part is read from: `path/component` in a pipeline directory, else `path` itself."""
    return Path(path) / component if pipeline_index(path) is not None else Path(path)


def qwen_image_problem(path: str | Path) -> str | None:
    """What keeps `path` from being a Qwen-Image pipeline directory (None: nothing)."""
    index = pipeline_index(path)
    if index is None:
        return f"{path} (no readable {PIPELINE_INDEX})"
    transformer = index.get("transformer")
    if not (isinstance(transformer, list) and QWEN_IMAGE_TRANSFORMER in transformer):
        return f"{path} (a {index.get('_class_name')} with transformer {transformer})"
    missing = [part for part in QWEN_IMAGE_PARTS if not (Path(path) / part).is_dir()]
    return f"{path} (missing {', '.join(missing)})" if missing else None


def vae_factor(block_out_channels: Sequence[int]) -> int:
    """Spatial downsampling of an AutoencoderKL: one 2x step between consecutive blocks."""
    return 2 ** (len(block_out_channels) - 1)


def latent_factor(vae_config: Mapping[str, Any]) -> int | None:
    """Pixels per latent cell of a diffusers VAE config (AutoencoderKL or AutoencoderKLQwenImage), None if neither."""
    kind = vae_config.get("_class_name", "AutoencoderKL")
    if kind == "AutoencoderKLQwenImage" and isinstance(vae_config.get("temperal_downsample"), list):
        return 2 ** len(vae_config["temperal_downsample"])  # one 2x spatial step per temporal-downsample entry
    blocks = vae_config.get("block_out_channels")
    if kind == "AutoencoderKL" and isinstance(blocks, list) and len(blocks) >= 1:
        return vae_factor(blocks)
    return None
