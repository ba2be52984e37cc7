"""What the nano testbed registers with `iomm.registry`: the nano MLLM and nano VAE (`path: nano`, built on
first use in `nano_dir`) and the procedural world as a data source (`data.source: world`, `data.pairs: world:N`,
or `data.pairs: world-fresh:1` for unlimited fresh pairs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iomm.config import Config
from iomm.image_tensors import to_tensor, to_uint8
from iomm.nano.world import Scene, World, WorldConfig
from iomm.registry import BuiltinData, BuiltinModel, Registry
from iomm.typed_config import ConfigError

NAME = "nano"
WORLD = "world"
FRESH_WORLD = "world-fresh"  # `data.pairs: world-fresh:1`: unlimited pairs, a new one at every draw (N is unused)
HELD_OUT_SEED = 10**6  # the world stream the sample grids regenerate; training draws per-step seeds instead
# The held-out pairs' stream: `world:N` draws its pairs with train.seed, `world-fresh` with seeds below 2**62.
HELD_OUT_PAIRS_SEED = 2**62
MAX_OBJECTS = 4


def register(registry: Registry) -> None:
    registry.mllms[NAME] = BuiltinModel(ensure=_ensure_mllm, architecture=_mllm_architecture, check=_check_mllm)
    registry.vaes[NAME] = BuiltinModel(ensure=_ensure_vae, architecture=_vae_architecture, check=_check_vae)
    registry.data[WORLD] = BuiltinData(images=_world_images, pairs=_world_pairs, held_out=_held_out,
                                       validate=_validate_world, grid_metrics=_grid_fidelity,
                                       held_out_pairs=_held_out_pairs)
    registry.data[FRESH_WORLD] = BuiltinData(images=_world_images, pairs=_fresh_world_pairs, held_out=_held_out,
                                             validate=_validate_world, grid_metrics=_grid_fidelity,
                                             held_out_pairs=_held_out_pairs)


# ---- models ----------------------------------------------------------------------------------

def _ensure_mllm(cfg: Config) -> Path:
    from iomm.nano.mllm_training import ensure_nano_mllm

    return ensure_nano_mllm(Path(cfg.mllm.nano_dir), random_init=cfg.mllm.random_init)


def builtin_records(cfg: Config) -> dict[str, Any]:
    """The built-in models' own records as they were built (steps, seconds, precision, machine, scores), for the
    results files of runs that use them."""
    records = {}
    for name, used, path in (("nano_mllm", cfg.mllm.path == NAME, Path(cfg.mllm.nano_dir) / "nano_mllm.json"),
                             ("nano_vae", cfg.codec.kind != "pixel" and cfg.codec.path == NAME,
                              Path(cfg.codec.nano_dir) / "nano_vae.json")):
        if used and path.is_file():
            records[name] = json.loads(path.read_text(encoding="utf-8"))
    return records


def _check_mllm(cfg: Config) -> None:
    from iomm.nano.mllm_training import check_understanding

    if not cfg.mllm.random_init:  # an ablation's untrained MLLM has no targets
        check_understanding(Path(cfg.mllm.nano_dir))


def _mllm_architecture(cfg: Config) -> Any:
    from transformers import AutoConfig

    from iomm.nano.mllm import nano_config

    path = Path(cfg.mllm.nano_dir)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    return nano_config()


def _ensure_vae(cfg: Config) -> Path:
    from iomm.nano.vae import ensure_nano_vae

    return ensure_nano_vae(Path(cfg.codec.nano_dir), resolution=cfg.data.resolution)


def _check_vae(cfg: Config) -> None:
    from iomm.nano.vae import check_reconstruction

    check_reconstruction(Path(cfg.codec.nano_dir))


def _vae_architecture(cfg: Config) -> dict[str, Any]:
    """The AutoencoderKL config the nano VAE has, or will be built with at data.resolution."""
    from diffusers import AutoencoderKL

    from iomm.nano.vae import NanoVAEConfig, build_nano_vae

    path = Path(cfg.codec.nano_dir)
    if (path / "config.json").is_file():
        return dict(AutoencoderKL.load_config(path, local_files_only=True))
    with torch.device("meta"):
        return dict(build_nano_vae(NanoVAEConfig(resolution=cfg.data.resolution)).config)


# ---- the world as a data source --------------------------------------------------------------

def _world(cfg: Config) -> World:
    return World(WorldConfig(resolution=cfg.data.resolution, max_objects=cfg.data.world_max_objects))


class WorldImages:
    """The unlabeled stream: a fresh scene per draw (procedural: the position plays no part)."""

    replays = True

    def __init__(self, world: World):
        self.world = world

    def take(self, position: int, rng: np.random.Generator,
             bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        return to_tensor(self.world.render(self.world.sample_scene(rng))), None


class WorldPairs:
    """A finite set of N captioned training pairs (no held-out colour/shape combination among them), drawn
    with replacement by the batch's generator, as the nano recipe's results were made."""

    replays = True

    def __init__(self, world: World, n: int, seed: int):
        self.pairs = [(image, caption) for image, caption, _ in world.pairs(n, seed)]

    def take(self, position: int, rng: np.random.Generator,
             bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        image, caption = self.pairs[int(rng.integers(len(self.pairs)))]
        return to_tensor(image), caption


class FreshWorldPairs:
    """Unlimited captioned pairs: every draw is a new one, made as `WorldPairs` makes its set (the ceiling of a
    learning curve over the number of pairs)."""

    replays = True

    def __init__(self, world: World):
        self.world = world

    def take(self, position: int, rng: np.random.Generator,
             bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        image, caption, _ = self.world.pairs(1, int(rng.integers(2**62)))[0]
        return to_tensor(image), caption


def _fresh_world_pairs(cfg: Config, n: int) -> FreshWorldPairs:
    return FreshWorldPairs(_world(cfg))


def _world_images(cfg: Config) -> WorldImages:
    return WorldImages(_world(cfg))


def _world_pairs(cfg: Config, n: int) -> WorldPairs:
    return WorldPairs(_world(cfg), n, cfg.train.seed)


def held_out_scenes(cfg: Config, n: int) -> tuple[torch.Tensor, list[Scene]]:
    """The first n images of the world's held-out stream (what the sample grids regenerate) and their scenes."""
    stream = _world(cfg).images(HELD_OUT_SEED)
    drawn = [next(stream) for _ in range(n)]
    return to_tensor([image for image, _ in drawn]), [scene for _, scene in drawn]


def _held_out(cfg: Config, n: int) -> torch.Tensor:
    return held_out_scenes(cfg, n)[0]


def _held_out_pairs(cfg: Config, n: int) -> tuple[torch.Tensor, list[str]]:
    """n captioned pairs, made as training pairs are (no held-out colour/shape combination), from a stream no
    training pair comes from: the loss on them shows how far a small pair set is memorised."""
    pairs = _world(cfg).pairs(n, HELD_OUT_PAIRS_SEED)
    return to_tensor([image for image, _, _ in pairs]), [caption for _, caption, _ in pairs]


def _grid_fidelity(cfg: Config, regenerations: torch.Tensor) -> dict[str, float]:
    """`iomm eval reconstruct`'s metrics for the sample grid's regenerations (few images: a trend, not a score)."""
    from iomm.nano.fidelity import compare, summarize

    scenes = held_out_scenes(cfg, len(regenerations))[1]
    images = to_uint8(regenerations)
    summary = summarize(compare(scene, image, cfg.data.resolution) for scene, image in zip(scenes, images))
    return {f"fidelity_{key}": value for key, value in summary.items() if key != "n"}


def _validate_world(cfg: Config, source: str) -> None:
    d = cfg.data
    if d.resolution < 16:
        raise ConfigError(source, "data.resolution", ">= 16 for the built-in world", d.resolution)
    if not 1 <= d.world_max_objects <= MAX_OBJECTS:
        raise ConfigError(source, "data.world_max_objects", f"1..{MAX_OBJECTS}", d.world_max_objects)
