"""The data section of a config: where images and pairs come from, and its checks (before any compute).

An image source is `data.source` with `data.path`; a pair set is `data.pairs`, written `KIND:LOCATION`
(`jsonl:pairs.jsonl`, `webdataset:shards/{000000..000999}.tar`, `hf:DIR`), `NAME:N` for N pairs of a
built-in source, or a bare JSONL path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iomm.builtins import BuiltinData, builtin_data, registry, split_pairs_spec
from iomm.typed_config import ConfigError, require

FILE_KINDS = ("folder", "jsonl", "webdataset", "hf")
PAIR_KINDS = ("jsonl", "webdataset", "hf")  # a folder has no captions
CACHED_IMAGES, CACHED_PAIRS = "images", "pairs"  # a latent cache directory's two shard folders
CACHE_FILE = "cache.json"  # what a latent cache was made from, and by which command


@dataclass
class DataConfig:
    # "folder" (image files below `path`), "jsonl", "webdataset" (tar shards: a brace pattern, a directory or a
    # comma-separated list), "hf" (a `save_to_disk` directory or a folder of parquet / arrow files), or a
    # built-in source (iomm.builtins; "world": the nano testbed)
    source: str = "world"
    path: str | None = None
    resolution: int = 32
    world_max_objects: int = 4
    num_workers: int = 0
    # Stage 2: text-image pairs: KIND:LOCATION (KIND jsonl, webdataset or hf), a JSONL path, or "NAME:N".
    pairs: str | None = None
    # Captions: None reads a shard's `txt` member and an HF dataset's `text` column; a name reads that field of
    # a shard's `json` member, or that column.
    caption_field: str | None = None
    image_column: str = "image"  # HF datasets: the column holding the images
    # HF parquet folders: read as a `datasets` stream (shuffle buffer of `stream_buffer` rows) instead of
    # converting them into the Arrow cache first; nothing is held out for the sample grids.
    streaming: bool = False
    stream_buffer: int = 1000
    # A latent cache written by `iomm data cache` for this config: training reads the frozen encoders' outputs
    # from it (the VAE's posterior, the MLLM's image tokens) instead of encoding every image at every step.
    latents: str | None = None
    max_bad_fraction: float = 0.01
    # Files and shards: this many samples (spread over the list) never train; the sample grids regenerate them.
    holdout: int = 8
    # Built-in pairs (NAME:N): this many more, never drawn for training; stage 2 logs their loss (`heldout_loss`).
    # Pair files and datasets have no held-out split: nothing is set aside from them and no such loss is logged.
    holdout_pairs: int = 64


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


def check_data(d: DataConfig, mix_ratio: float, source: str) -> list[BuiltinData]:
    """Range and consistency checks of the data section; returns the built-in sources it names."""
    require(d.num_workers >= 0, source, "data.num_workers", ">= 0", d.num_workers)
    require(d.holdout >= 0, source, "data.holdout", ">= 0", d.holdout)
    require(d.holdout_pairs >= 0, source, "data.holdout_pairs", ">= 0", d.holdout_pairs)
    require(0.0 <= d.max_bad_fraction <= 1.0, source, "data.max_bad_fraction", "a value in [0, 1]", d.max_bad_fraction)
    require(d.resolution >= 8, source, "data.resolution", ">= 8", d.resolution)
    builtins = [data for data in [builtin_data(d.source)] if data is not None]
    kinds = ", ".join(repr(k) for k in (*FILE_KINDS, *registry().data))
    require(d.source in FILE_KINDS or builtins, source, "data.source", f"one of {kinds}", d.source)
    require(d.source not in FILE_KINDS or bool(d.path), source, "data.path", f"a location for data.source={d.source}",
           d.path)
    require(mix_ratio == 1.0 or d.pairs is not None, source, "data.pairs",
           "a pair source (KIND:LOCATION, a JSONL path or NAME:N) when train.mix_ratio < 1", d.pairs)
    uses_hf = d.source == "hf" or (d.pairs or "").startswith("hf:")
    require(not d.streaming or uses_hf, source, "data.streaming", "false unless data.source or data.pairs is hf",
           d.streaming)
    require(d.stream_buffer >= 1, source, "data.stream_buffer", ">= 1", d.stream_buffer)
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


def path_exists(path: str, kind: str) -> bool:
    """Path.is_dir / is_file that say False instead of raising for names no file can have (too long, NUL)."""
    try:
        return Path(path).is_dir() if kind == "dir" else Path(path).is_file()
    except (OSError, ValueError):
        return False


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
