"""Step-indexed batch sources.

A batch is a pure function of (seed, step, rank): resuming at step s needs no data state beyond s,
and every rank draws different samples. Image and pair sources are sampled with replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from iomm.builtins import builtin_data, split_pairs_spec
from iomm.config import Config
from iomm.data.folder_index import indexed_images, split_held_out
from iomm.data.images import BadSample, DataReport, TooMuchBadData, load_image
from iomm.data.pairs import read_pairs

MAX_RETRIES = 16


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, R, R) in [0, 1]
    captions: list[str | None]  # None: an image-only sample (masked self-conditioning)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of skipped samples


class Source(Protocol):
    def draw(self, rng: np.random.Generator, bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]: ...


class FileSamples:
    """Images from a folder (caption None) or pairs from JSONL; bad files are retried and reported."""

    def __init__(self, items: list[tuple[Path, str | None]], resolution: int, where: str):
        if not items:
            raise FileNotFoundError(f"{where}: no usable samples")
        self.items, self.resolution = items, resolution

    def draw(self, rng: np.random.Generator, bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        for _ in range(MAX_RETRIES):
            path, caption = self.items[int(rng.integers(len(self.items)))]
            try:
                return load_image(path, self.resolution), caption
            except BadSample as err:
                bad.append((str(path), str(err)))
        raise TooMuchBadData(f"{MAX_RETRIES} bad samples in a row (last: {bad[-1][0]}: {bad[-1][1]})", bad)


class MixedBatches(torch.utils.data.Dataset):
    """Each sample is image-only with probability `mix_ratio` (the paper's lambda), else a pair."""

    def __init__(self, images: Source, pairs: Source | None, batch_size: int, mix_ratio: float, seed: int,
                 rank: int = 0):
        self.images, self.pairs = images, pairs
        self.batch_size, self.mix_ratio, self.seed, self.rank = batch_size, mix_ratio, seed, rank

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step, self.rank])
        image_only = rng.random(self.batch_size) < self.mix_ratio
        bad: list[tuple[str, str]] = []
        samples = [(self.images if flag or self.pairs is None else self.pairs).draw(rng, bad) for flag in image_only]
        return Batch(torch.stack([s[0] for s in samples]), [s[1] for s in samples], bad)


@dataclass
class DataSources:
    images: Source
    pairs: Source | None
    held_out: torch.Tensor  # (n, 3, R, R) images the sample grids regenerate; never drawn for training


def build_sources(cfg: Config, report: DataReport | None = None, run_dir: Path | None = None, *, main: bool = True,
                  barrier: Callable[[], None] = lambda: None, held_out: int = 8) -> DataSources:
    """The run's image and pair sources. An image folder is listed once, by the main rank, into `run_dir`."""
    d, report = cfg.data, report if report is not None else DataReport()
    builtin = builtin_data(d.source)
    if builtin is not None:
        images: Source = builtin.images(cfg)
        held = builtin.held_out(cfg, held_out)
    else:
        split = split_held_out(indexed_images(d.path, run_dir, main=main, barrier=barrier), d.holdout)
        images = FileSamples([(p, None) for p in split.train], d.resolution, d.path)
        held = _load_held_out(split.held_out, d.resolution, report)
    pairs: Source | None = None
    if d.pairs is not None and cfg.train.mix_ratio < 1.0:
        if (spec := split_pairs_spec(d.pairs)) is not None:
            pairs = spec[0].pairs(cfg, int(spec[1]))
        else:
            listed = read_pairs(d.pairs, report)
            pairs = FileSamples([(p.image, p.caption) for p in listed], d.resolution, d.pairs)
    return DataSources(images, pairs, held[:held_out])


def _load_held_out(paths: list[Path], resolution: int, report: DataReport) -> torch.Tensor:
    """The held-out files that load; a bad one is skipped and counted like any training sample."""
    loaded = []
    for path in paths:
        try:
            loaded.append(load_image(path, resolution))
        except BadSample as err:
            report.bad(str(path), str(err))
    return torch.stack(loaded) if loaded else torch.zeros(0, 3, resolution, resolution)


def batch_loader(dataset: MixedBatches, start_step: int, end_step: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start_step, end_step),
                                       num_workers=num_workers, collate_fn=lambda b: b,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)
