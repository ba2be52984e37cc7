"""Step-indexed batches of image-only samples and pairs.

A global micro-batch (all ranks' rows) is a pure function of (seed, index) and of where the run's two
sample streams stand before it (`DataPosition`, saved in each checkpoint): its samples are image-only
with probability `mix_ratio` (the paper's lambda), else pairs, and each takes the next position of its
stream. A finite source (files, shards, a dataset) reads its positions in epochs (`EpochOrder`); a
procedural one (the nano world) draws a fresh sample from the batch's random generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from iomm.config import Config
from iomm.data.encoded import EncodedImages, stack_images
from iomm.data.epochs import IMAGE_STREAM, PAIR_STREAM, EpochOrder
from iomm.data.folder_index import HeldOutSplit, indexed_images, split_held_out
from iomm.data.hf_dataset import DEFAULT_CAPTION_COLUMN, HFItems, HFStream
from iomm.data.images import BadSample, DataReport, TooMuchBadData, load_image
from iomm.data.pairs import read_pairs
from iomm.data.shards import ShardItems, expand_shards, shard_index
from iomm.data.spec import CACHED_IMAGES, CACHED_PAIRS, FileSpec, pair_spec
from iomm.per_sample_rng import in_stream
from iomm.registry import builtin_data

MAX_RETRIES = 16
CACHE_KIND = "latent cache"  # shards written by `iomm data cache`


@dataclass
class Batch:
    images: torch.Tensor | EncodedImages  # (B, 3, R, R) in [0, 1], or cached encodings (`data.latents`)
    captions: list[str | None]  # None: an image-only sample (masked self-conditioning)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of skipped samples


class Source(Protocol):
    """Samples by stream position. A procedural source (`replays`) draws them from the batch's generator
    instead, so a rank replays the draws of the rows before its own (the nano world: a render each)."""

    replays: bool

    def take(self, position: int, rng: np.random.Generator,
             bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]: ...


class Items(Protocol):
    """A finite sample set by number; `load` raises BadSample."""

    def __len__(self) -> int: ...
    def where(self, i: int) -> str: ...
    def load(self, i: int) -> tuple[torch.Tensor, str | None]: ...


@dataclass
class FileItems:
    """Image files, with their captions for pairs."""

    files: list[tuple[Path, str | None]]
    resolution: int

    def __len__(self) -> int:
        return len(self.files)

    def where(self, i: int) -> str:
        return str(self.files[i][0])

    def load(self, i: int) -> tuple[torch.Tensor, str | None]:
        path, caption = self.files[i]
        return load_image(path, self.resolution), caption


class EpochSamples:
    """The items `keep` of a sample set, read in epochs; a bad item's slot is filled by a random good one."""

    replays = False

    def __init__(self, items: Items, keep: list[int], order: EpochOrder):
        self.items, self.keep, self.order = items, keep, order

    def take(self, position: int, rng: np.random.Generator,
             bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        index = self.keep[self.order.item(position)]
        for _ in range(MAX_RETRIES):
            try:
                return self.items.load(index)
            except BadSample as err:
                bad.append((self.items.where(index), str(err)))
                index = self.keep[int(rng.integers(len(self.keep)))]
        raise TooMuchBadData(f"{MAX_RETRIES} bad samples in a row (last: {bad[-1][0]}: {bad[-1][1]})", bad)


@dataclass(frozen=True)
class DataPosition:
    """Where a run's data stands (the same on every rank): micro-batches drawn, samples taken from each stream."""

    micro_batch: int = 0
    images: int = 0
    pairs: int = 0


class MixedBatches(torch.utils.data.Dataset):
    """Micro-batch `index` of rank r holds rows r*B .. (r+1)*B - 1 of the global micro-batch of B * world samples,
    so that a global batch, and the data position after it, are the same at any world size."""

    def __init__(self, images: Source, pairs: Source | None, batch_size: int, mix_ratio: float, seed: int,
                 rank: int = 0, world: int = 1, start: DataPosition = DataPosition(), stream: int = 0):
        self.images, self.pairs = images, pairs
        self.batch_size, self.mix_ratio, self.seed, self.rank, self.world = batch_size, mix_ratio, seed, rank, world
        self.stream = stream  # the run's own stream (`in_stream`): stage 2 does not replay stage 1's batches
        self.start = self._cursor = start

    def resume_from(self, start: DataPosition) -> None:
        """Go on from a checkpoint's data position. The counting restarts there, not from micro-batch 0: a resume
        may change `mix_ratio`, and the draws before `start` were made with the old one."""
        self.start = self._cursor = start

    def __len__(self) -> int:
        return 2**62

    def _draws(self, index: int) -> tuple[np.random.Generator, np.ndarray]:
        """The global micro-batch's generator (after its draws) and which of its samples are image-only."""
        rng = np.random.default_rng(list(in_stream((self.seed, index, 0), self.stream)))
        image_only = rng.random(self.batch_size * self.world) < self.mix_ratio
        return rng, image_only if self.pairs is not None else np.ones_like(image_only)

    def position(self, index: int) -> DataPosition:
        """Where the streams stand before micro-batch `index` (>= `start`), counted on from the last call."""
        if index < self.start.micro_batch:
            raise IndexError(f"micro-batch {index} comes before this run's data position {self.start}")
        cursor = self._cursor if self._cursor.micro_batch <= index else self.start
        images, pairs = cursor.images, cursor.pairs
        for i in range(cursor.micro_batch, index):
            image_only = self._draws(i)[1]
            images, pairs = images + int(image_only.sum()), pairs + int((~image_only).sum())
        self._cursor = DataPosition(index, images, pairs)
        return self._cursor

    def __getitem__(self, index: int) -> Batch:
        at = self.position(index)
        rng, image_only = self._draws(index)
        first = self.rank * self.batch_size
        bad: list[tuple[str, str]] = []
        samples = []
        images, pairs = at.images, at.pairs
        for row, flag in enumerate(image_only[: first + self.batch_size]):
            source, position = (self.images, images) if flag else (self.pairs, pairs)
            if row >= first:
                samples.append(source.take(position, rng, bad))
            elif source.replays:  # the rows of lower ranks: a procedural source's draws advance the generator
                source.take(position, rng, [])
            images, pairs = (images + 1, pairs) if flag else (images, pairs + 1)
        return Batch(stack_images([s[0] for s in samples]), [s[1] for s in samples], bad)

    def state(self, index: int) -> dict:
        """The data position before micro-batch `index`, and each finite stream's epoch, for a checkpoint."""
        at = self.position(index)
        state = asdict(at)
        for name, source, position in (("images", self.images, at.images), ("pairs", self.pairs, at.pairs)):
            if isinstance(source, EpochSamples):
                state[f"{name}_epoch"] = source.order.epoch(position)
        return state


@dataclass
class DataSources:
    images: Source
    pairs: Source | None
    held_out: torch.Tensor  # (n, 3, R, R) images the sample grids regenerate; never drawn for training
    # Captioned pairs never drawn for training, whose loss stage 2 logs: `data.holdout_pairs` of a built-in pair
    # source; None for pair files and datasets (they have no held-out split) and without pairs.
    held_out_pairs: Batch | None = None


def build_sources(cfg: Config, report: DataReport | None = None, run_dir: Path | None = None, *, main: bool = True,
                  barrier: Callable[[], None] = lambda: None, held_out: int = 8) -> DataSources:
    """The run's image and pair sources. Folders and shards are listed once, by the main rank, into `run_dir`.
    With `data.latents`, both stream from the cache; the held-out images (pixels, for the sample grids) still
    come from `data.source`."""
    d, report = cfg.data, report if report is not None else DataReport()
    lister = SampleSets(cfg, report, run_dir, main, barrier)
    builtin = builtin_data(d.source)
    if builtin is not None:
        images: Source = builtin.images(cfg)
        held = builtin.held_out(cfg, held_out)
    elif d.streaming and d.source == "hf":
        images = lister.stream(d.path or "", captions=False, stream=IMAGE_STREAM)
        held = torch.zeros(0, 3, d.resolution, d.resolution)
    else:
        items, split = lister.image_set()
        images = _epochs(items, split.train, cfg.train.seed, IMAGE_STREAM, d.path or "")
        held = _load_held_out(items, split.held_out, d.resolution, report)
    if d.latents is not None:
        items = lister.items(FileSpec(CACHE_KIND, str(Path(d.latents) / CACHED_IMAGES)), captions=False)
        images = _epochs(items, list(range(len(items))), cfg.train.seed, IMAGE_STREAM, d.latents)
    pairs: Source | None = None
    held_pairs: Batch | None = None
    if d.pairs is not None and cfg.train.mix_ratio < 1.0:
        spec = pair_spec(d.pairs)
        if d.latents is not None:
            spec = FileSpec(CACHE_KIND, str(Path(d.latents) / CACHED_PAIRS))
        if isinstance(spec, tuple):
            pairs = spec[0].pairs(cfg, int(spec[1]))
            if spec[0].held_out_pairs is not None and d.holdout_pairs > 0:
                held_pairs = Batch(*spec[0].held_out_pairs(cfg, d.holdout_pairs))
        elif d.streaming and spec.kind == "hf":
            pairs = lister.stream(spec.location, captions=True, stream=PAIR_STREAM)
        else:
            items = lister.items(spec, captions=True)
            pairs = _epochs(items, list(range(len(items))), cfg.train.seed, PAIR_STREAM, spec.location)
    return DataSources(images, pairs, held[:held_out], held_pairs)


def _epochs(items: Items, keep: list[int], seed: int, stream: int, where: str) -> EpochSamples:
    if not keep:
        raise FileNotFoundError(f"{where}: no usable samples")
    return EpochSamples(items, keep, EpochOrder(len(keep), seed, stream))


@dataclass
class SampleSets:
    """Opens the finite sample sets a config names (a latent cache's shards read as cached samples)."""

    cfg: Config
    report: DataReport
    run_dir: Path | None = None
    main: bool = True
    barrier: Callable[[], None] = lambda: None

    def image_set(self) -> tuple[Items, HeldOutSplit]:
        """The image source's items and its split into training items and held-out ones."""
        d = self.cfg.data
        items = self.items(FileSpec(d.source, d.path or ""), captions=False)
        return items, split_held_out(list(range(len(items))), d.holdout)

    def stream(self, location: str, captions: bool, stream: int) -> HFStream:
        d = self.cfg.data
        caption_column = (d.caption_field or DEFAULT_CAPTION_COLUMN) if captions else None
        seed = 2 * self.cfg.train.seed + stream  # the image and the pair stream shuffle independently
        return HFStream(location, d.resolution, d.image_column, caption_column, seed, d.stream_buffer)

    def items(self, spec: FileSpec, captions: bool) -> Items:
        d, where = self.cfg.data, spec.location
        if spec.kind == "folder":
            files = indexed_images(where, self.run_dir, main=self.main, barrier=self.barrier)
            return FileItems([(p, None) for p in files], d.resolution)
        if spec.kind == "jsonl":
            listed = read_pairs(where, self.report)
            return FileItems([(p.image, p.caption if captions else None) for p in listed], d.resolution)
        if spec.kind in ("webdataset", CACHE_KIND):
            shards = expand_shards(where)
            index = shard_index(shards, self.run_dir, main=self.main, barrier=self.barrier)
            encoded = spec.kind == CACHE_KIND  # a latent cache's shards: captions in `txt`
            return ShardItems(shards, index, d.resolution, captions, None if encoded else d.caption_field, encoded)
        caption_column = (d.caption_field or DEFAULT_CAPTION_COLUMN) if captions else None
        return HFItems.open(where, d.resolution, d.image_column, caption_column)


def _load_held_out(items: Items, indices: list[int], resolution: int, report: DataReport) -> torch.Tensor:
    """The held-out items that load; a bad one is skipped and counted like any training sample."""
    loaded = []
    for i in indices:
        try:
            loaded.append(items.load(i)[0])
        except BadSample as err:
            report.bad(items.where(i), str(err))
    return torch.stack(loaded) if loaded else torch.zeros(0, 3, resolution, resolution)


def batch_loader(dataset: MixedBatches, start_step: int, end_step: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start_step, end_step),
                                       num_workers=num_workers, collate_fn=lambda b: b,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)
