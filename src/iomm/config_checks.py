"""Checks of a config against the model files it names, before any compute.

A model path may be a diffusers pipeline directory (`model_index.json`): each part is then read from its own
subfolder, as diffusers lays it out (`text_encoder/` and `tokenizer/` for the MLLM, `vae/`, `transformer/`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iomm.builtins import builtin_mllm, builtin_vae, registry
from iomm.data.spec import check_data_paths, check_latent_cache, path_exists
from iomm.typed_config import require

if TYPE_CHECKING:
    from iomm.config import Config

PIPELINE_INDEX = "model_index.json"
VAE_DIR = ("a diffusers AutoencoderKL directory (config.json with block_out_channels), an AutoencoderKLQwenImage "
           "directory (temperal_downsample), or a pipeline directory holding either in vae/")
QWEN_IMAGE_TRANSFORMER = "QwenImageTransformer2DModel"
QWEN_IMAGE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
QWEN_IMAGE_DIR = (f"a diffusers QwenImagePipeline directory ({PIPELINE_INDEX} naming a {QWEN_IMAGE_TRANSFORMER}, "
                  f"with the subfolders {', '.join(QWEN_IMAGE_PARTS)})")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pipeline_index(path: str | Path | None) -> dict[str, Any] | None:
    """A diffusers pipeline directory's `model_index.json`, or None if `path` is not one."""
    index = _read_json(Path(path) / PIPELINE_INDEX) if path is not None else None
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


def codec_factor(cfg: Config, source: str = "<config>") -> int:
    """How many pixels one latent cell spans: 1 for pixels, the VAE's downsampling otherwise."""
    codec = cfg.codec
    if codec.kind == "pixel":
        return 1
    builtin = builtin_vae(codec.path)
    if builtin is not None:  # built or not, the architecture it has or will be built with
        return vae_factor(builtin.architecture(cfg)["block_out_channels"])
    config_file = component_dir(codec.path or "", "vae") / "config.json"
    if not path_exists(str(config_file), "file"):
        return 8  # SD / SD3 / FLUX VAEs; a missing path or config.json is reported by the path checks
    vae = _read_json(config_file)
    factor = latent_factor(vae) if isinstance(vae, dict) else None
    kind = vae.get("_class_name") if isinstance(vae, dict) else None
    require(factor is not None, source, "codec.path", VAE_DIR, f"{config_file}" + (f" of a {kind}" if kind else ""))
    return factor


def check_paths(cfg: Config, source: str) -> None:
    models = registry()
    if builtin_mllm(cfg.mllm.path) is None:
        require(path_exists(cfg.mllm.path, "dir"), source, "mllm.path",
                f"an existing local model directory or a built-in model ({', '.join(map(repr, models.mllms))})",
                cfg.mllm.path)
        _check_mllm_dir(component_dir(cfg.mllm.path, "text_encoder"), cfg.mllm.trust_remote_code, source)
    if cfg.codec.kind == "vae":
        builtin = builtin_vae(cfg.codec.path)
        require(builtin is not None or (cfg.codec.path is not None and path_exists(cfg.codec.path, "dir")), source,
                "codec.path", f"an existing AutoencoderKL directory or a built-in model "
                f"({', '.join(map(repr, models.vaes))}) for codec.kind=vae", cfg.codec.path)
        config_file = component_dir(cfg.codec.path or "", "vae") / "config.json"
        require(builtin is not None or path_exists(str(config_file), "file"), source, "codec.path", VAE_DIR,
                f"{cfg.codec.path} (no {config_file.relative_to(cfg.codec.path or '')})")
        built = builtin.architecture(cfg).get("sample_size") if builtin is not None else None
        require(builtin is None or built == cfg.data.resolution, source, "codec.nano_dir",
                f"a built-in VAE built for data.resolution={cfg.data.resolution} px (or a new directory)",
                f"{cfg.codec.nano_dir} (built for {built} px)")
    if cfg.train.lora.base is not None:
        require(path_exists(cfg.train.lora.base, "dir"), source, "train.lora.base", "an existing run or checkpoint "
                "directory", cfg.train.lora.base)
    pretrained = cfg.generator.pretrained
    if pretrained is not None:
        require(path_exists(pretrained, "dir"), source, "generator.pretrained", "an existing directory", pretrained)
        if cfg.generator.kind == "qwen_image":
            problem = qwen_image_problem(pretrained)
            require(problem is None, source, "generator.pretrained", QWEN_IMAGE_DIR, problem)
    check_data_paths(cfg.data, source)
    if cfg.data.latents is not None:
        check_latent_cache(cfg, Path(cfg.data.latents), source)


def _check_mllm_dir(path: Path, trusted: bool, source: str) -> None:
    """A model with custom code (config.json has auto_map) needs the opt-in; any other must be a supported family."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return  # FrozenMLLM.from_pretrained names what the directory is missing
    config = _read_json(config_file)
    if isinstance(config, dict) and "auto_map" in config:
        require(trusted, source, "mllm.trust_remote_code",
                f"true to run the custom code shipped in {path} (its config.json has auto_map)", trusted)
        return
    from iomm.conditioning.mllm_families import FAMILIES  # torch and transformers: only when a directory is named

    model_type = config.get("model_type") if isinstance(config, dict) else None
    require(model_type in FAMILIES, source, "mllm.path",
            f"a VLM checkpoint of a supported family (config.json model_type one of {', '.join(sorted(FAMILIES))})",
            f"{path} (model_type={model_type!r})" if isinstance(config, dict) else f"{config_file} (not JSON)")
