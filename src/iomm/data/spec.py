"""The data section of a config (iomm.config.DataConfig): where images and pairs come from, and the checks of it
that need the registry of built-ins or the file system (before any compute).

An image source is `data.source` with `data.path`; a pair set is `data.pairs`, written `KIND:LOCATION`
(`jsonl:pairs.jsonl`, `webdataset:shards/{000000..000999}.tar`, `hf:DIR`), `NAME:N` for N pairs of a
built-in source, or a bare JSONL path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iomm.config import FILE_KINDS, DataConfig
from iomm.model_files import path_exists
from iomm.registry import BuiltinData, builtin_data, registry, split_pairs_spec
from iomm.typed_config import ConfigError, require

PAIR_KINDS = ("jsonl", "webdataset", "hf")  # a folder has no captions
CACHED_IMAGES, CACHED_PAIRS = "images", "pairs"  # a latent cache directory's two shard folders
CACHE_FILE = "cache.json"  # what a latent cache was made from, and by which command


@dataclass(frozen=True)
class FileSpec:
    kind: str  # one of FILE_KINDS
    location: str


def pair_spec(spec: str) -> FileSpec | tuple[BuiltinData, str]:
    """`data.pairs` -> a file spec, or (built-in source, "N")."""
    kind, sep, location = spec.partition(":")
    if sep and kind in PAIR_KINDS:
        return FileSpec(kind, location)
    return split_pairs_spec(spec) or FileSpec("jsonl", spec)


def check_data_sources(d: DataConfig, source: str) -> list[BuiltinData]:
    """The built-in sources the data section names (after iomm.config's value checks): they exist, and `NAME:N`
    and the latent cache fit them. Returns them."""
    builtins = [data for data in [builtin_data(d.source)] if data is not None]
    kinds = ", ".join(repr(k) for k in (*FILE_KINDS, *registry().data))
    require(d.source in FILE_KINDS or builtins, source, "data.source", f"one of {kinds}", d.source)
    require(d.latents is None or d.source in FILE_KINDS, source, "data.latents",
           f"null with a procedural data.source ({d.source!r}: nothing finite to cache)", d.latents)
    if d.pairs is not None:
        spec = pair_spec(d.pairs)
        require(d.latents is None or isinstance(spec, FileSpec), source, "data.latents",
               "null with built-in pairs (data.pairs NAME:N)", d.latents)
        if isinstance(spec, tuple):
            require(spec[1].isdecimal() and int(spec[1]) > 0, source, "data.pairs", "NAME:N with N a positive integer",
                   d.pairs)
            builtins.append(spec[0])
        else:
            require(bool(spec.location), source, "data.pairs", f"a location after '{spec.kind}:'", d.pairs)
    return builtins


def check_data_paths(d: DataConfig, source: str) -> None:
    """The data locations exist (shard patterns are expanded when the run lists them)."""
    expected = {"folder": ("dir", "an existing image folder"), "jsonl": ("file", "an existing JSONL file"),
                "hf": ("dir", "an existing dataset directory")}
    if d.source in expected and d.path is not None:
        kind, what = expected[d.source]
        require(path_exists(d.path, kind), source, "data.path", what, d.path)
    if d.pairs is not None and isinstance(spec := pair_spec(d.pairs), FileSpec) and spec.kind in expected:
        kind, what = expected[spec.kind]
        require(path_exists(spec.location, kind), source, "data.pairs", f"{what} (or NAME:N)", d.pairs)


# What a latent cache's content depends on: a cache made with other values cannot stand in for the online path.
CACHE_FIELDS = ("mllm.path", "mllm.nano_dir", "codec.kind", "codec.path", "codec.nano_dir", "data.source", "data.path",
                "data.pairs", "data.resolution", "data.holdout", "data.caption_field", "data.image_column")


def latent_cache_fingerprint(cfg: Any) -> dict[str, Any]:
    return {name: getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1]) for name in CACHE_FIELDS}


def check_latent_cache(cfg: Any, cache: Path, source: str) -> None:
    try:
        made = json.loads((cache / CACHE_FILE).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(source, "data.latents", f"a directory written by `iomm data cache` (with {CACHE_FILE})",
                          str(cache)) from None
    for name, value in latent_cache_fingerprint(cfg).items():
        require(made.get(name) == value, source, "data.latents", f"a cache made with {name}={value!r}",
               f"{cache} made with {name}={made.get(name)!r}")
