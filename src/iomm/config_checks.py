"""Loading a config with every check: the value checks of iomm.config, then those that need the registry of
built-ins or the files it names (the codec's latent grid, the built-in data sources, model and data paths).

A model path may be a diffusers pipeline directory (`model_index.json`): each part is then read from its own
subfolder, as diffusers lays it out (iomm.model_files).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

from iomm.config import (
    PATCH_KINDS,
    Config,
    GeneratorConfig,
    check_values,
    config_source,
    parse_config,
    read_config,
)
from iomm.data.spec import check_data_paths, check_data_sources, check_latent_cache
from iomm.model_files import (
    QWEN_IMAGE_DIR,
    VAE_DIR,
    component_dir,
    latent_factor,
    path_exists,
    qwen_image_problem,
    read_json,
    vae_factor,
)
from iomm.registry import builtin_mllm, builtin_vae, registry
from iomm.typed_config import require


def packaged_config(name: str) -> Path:
    """A config iomm ships (`src/iomm/configs/NAME.yaml`), e.g. `nano` for the testbed's recipe."""
    return Path(str(resources.files("iomm") / "configs" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> Config:
    """Load a YAML config (or the defaults), apply `--set` overrides, and validate everything."""
    path = Path(path) if path is not None else None  # named in errors as read_config names it
    config = read_config(path, overrides)
    check_config(config, config_source(path, overrides), check_paths=check_paths)
    return config


def config_from_dict(data: dict[str, Any], source: str, *, check_paths: bool = True) -> Config:
    """A validated config from plain data (a YAML file's, or one saved inside a model directory)."""
    config = parse_config(data, source)
    check_config(config, source, check_paths=check_paths)
    return config


def finetune_config(cfg: Config, source: str = "<config>") -> Config:
    """The stage-2 config: `finetune` fields replace their `train` counterparts. `source` names the config in
    errors (`config_source`, as `load_config` does)."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=cfg.finetune.steps, mix_ratio=cfg.finetune.mix_ratio,
        lr=cfg.finetune.lr if cfg.finetune.lr is not None else cfg.train.lr))
    source = f"{source} (fine-tuning)"
    check_values(out, source)
    check_config(out, source, check_paths=False)
    return out


def check_config(cfg: Config, source: str, *, check_paths: bool = True) -> None:
    """The checks of a config whose values passed iomm.config's (`read_config`, `parse_config`) that need the
    registry of built-ins, and with `check_paths` the file system."""
    _check_latent_grid(cfg.generator, codec_factor(cfg, source), cfg.data.resolution, source)
    for data in dict.fromkeys(check_data_sources(cfg.data, source)):
        data.validate(cfg, source)
    if check_paths:
        check_model_paths(cfg, source)


def generator_downsampling(g: GeneratorConfig) -> tuple[int, str]:
    """Latent cells per generator position along a side, and what sets it (in the words of config errors)."""
    if g.kind in PATCH_KINDS:
        return g.patch_size, "patch size"
    return 2 ** (len(g.block_out_channels) - 1), "the U-Net's downsampling"


def _check_latent_grid(g: GeneratorConfig, codec_factor: int, resolution: int, source: str) -> None:
    """The image splits into whole latent cells, and those into whole patches (or survive the U-Net's downsampling)."""
    downsampling, why = generator_downsampling(g)
    factor = codec_factor * downsampling
    require(resolution % factor == 0, source, "data.resolution", f"divisible by the codec factor x {why} = {factor}",
            resolution)


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
    vae = read_json(config_file)
    factor = latent_factor(vae) if isinstance(vae, dict) else None
    kind = vae.get("_class_name") if isinstance(vae, dict) else None
    require(factor is not None, source, "codec.path", VAE_DIR, f"{config_file}" + (f" of a {kind}" if kind else ""))
    return factor


def check_model_paths(cfg: Config, source: str) -> None:
    """The model and data locations the config names exist and hold what it needs."""
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
    config = read_json(config_file)
    if isinstance(config, dict) and "auto_map" in config:
        require(trusted, source, "mllm.trust_remote_code",
                f"true to run the custom code shipped in {path} (its config.json has auto_map)", trusted)
        return
    from iomm.conditioning.mllm_families import FAMILIES  # torch and transformers: only when a directory is named

    model_type = config.get("model_type") if isinstance(config, dict) else None
    require(model_type in FAMILIES, source, "mllm.path",
            f"a VLM checkpoint of a supported family (config.json model_type one of {', '.join(sorted(FAMILIES))})",
            f"{path} (model_type={model_type!r})" if isinstance(config, dict) else f"{config_file} (not JSON)")
