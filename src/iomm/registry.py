"""Built-in models and data sources, looked up by name: `mllm.path: nano`, `codec.path: nano`,
`data.source: world`, `data.pairs: world:N`.

The core never imports a testbed. A package registers what it provides under the `iomm.builtins`
entry-point group (iomm's own nano testbed does so in pyproject.toml: `iomm.nano.registration:register`),
and the config checks, the model builder, the data sources and `iomm describe` ask this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from iomm.config import Config

ENTRY_POINT_GROUP = "iomm.builtins"  # this module's old name, kept: installed packages register under it


@dataclass(frozen=True)
class BuiltinModel:
    """A model that is built (trained) on first use and cached in a directory named by the config."""

    ensure: Callable[[Config], Path]  # the checkpoint directory, built there first if it is not yet
    architecture: Callable[[Config], Any]  # the model's config (HF PretrainedConfig or diffusers dict), no weights
    # Raises BuiltinBelowTarget where the model `ensure` built scores below its own targets (its saved report).
    check: Callable[[Config], None] = lambda cfg: None


class BuiltinBelowTarget(ValueError):
    """A built-in model scores below its own targets: nothing should be trained on top of it."""


@dataclass(frozen=True)
class BuiltinData:
    """A procedural data source: unlabeled images, `NAME:N` text-image pairs, and fixed held-out sets."""

    # Both return an iomm.data.mixed_batches.Source (Any: the registry sits below the data package).
    images: Callable[[Config], Any]
    pairs: Callable[[Config, int], Any]
    held_out: Callable[[Config, int], torch.Tensor]  # (n, 3, R, R) images never drawn for training
    validate: Callable[[Config, str], None] = lambda cfg, source: None  # raises ConfigError
    # Scores the sample grid's regenerations of the first images of `held_out` against what those images show.
    grid_metrics: Callable[[Config, torch.Tensor], dict[str, float]] | None = None
    # n pairs ((n, 3, R, R) images, their captions) never drawn for training, whose loss stage 2 logs.
    held_out_pairs: Callable[[Config, int], tuple[torch.Tensor, list[str]]] | None = None


@dataclass
class Registry:
    mllms: dict[str, BuiltinModel] = field(default_factory=dict)
    vaes: dict[str, BuiltinModel] = field(default_factory=dict)
    data: dict[str, BuiltinData] = field(default_factory=dict)


_REGISTRY = Registry()
_loaded = False


def registry() -> Registry:
    """The registry, filled on first use by every installed `iomm.builtins` entry point."""
    global _loaded
    if not _loaded:
        _loaded = True
        for register in entry_point_hooks(ENTRY_POINT_GROUP):
            register(_REGISTRY)
    return _REGISTRY


def entry_point_hooks(group: str) -> list[Callable]:
    """What every installed package names under the entry-point `group`, loaded, in name order (the same on every
    machine): the testbed's and the lab's built-ins here, their commands in the command line."""
    return [entry_point.load() for entry_point in sorted(entry_points(group=group), key=lambda e: e.name)]


def builtin_mllm(name: str | None) -> BuiltinModel | None:
    return registry().mllms.get(name or "")


def builtin_vae(name: str | None) -> BuiltinModel | None:
    return registry().vaes.get(name or "")


def builtin_data(name: str | None) -> BuiltinData | None:
    return registry().data.get(name or "")


def split_pairs_spec(spec: str) -> tuple[BuiltinData, str] | None:
    """`NAME:N` with NAME a built-in data source -> (that source, "N"); None for a file path."""
    name, sep, count = spec.partition(":")
    data = builtin_data(name) if sep else None
    return (data, count) if data is not None else None
