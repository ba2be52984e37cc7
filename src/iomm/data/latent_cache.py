"""`iomm data cache`: every training image of a config's data encoded once by its frozen codec and MLLM.

The cache holds WebDataset shards (`images/`, and `pairs/` with the captions in `txt`) of safetensors
samples (`EncodedImages`), in the order of the training items, and `cache.json` with what it was made
from. A run with `data.latents: DIR` reads them in the same epochs as the online run would read its
images, and computes the same loss without running the VAE encoder or the vision tower. A sample that
cannot be read is left out and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import webdataset as wds
from torch import nn
from tqdm import tqdm

from iomm.config import Config
from iomm.data.encoded import CACHE_EXTENSION, EncodedImages
from iomm.data.images import BadSample, DataReport
from iomm.data.mixed_batches import Items, SampleSets
from iomm.data.spec import CACHE_FILE, CACHED_IMAGES, CACHED_PAIRS, FileSpec, latent_cache_fingerprint, pair_spec


class ImageEmbedder(Protocol):
    """What the cache reads of the frozen MLLM (`iomm.conditioning.mllm.FrozenMLLM`; data sits below it)."""

    @property
    def device(self) -> torch.device: ...

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def encode_images(images: torch.Tensor, codec: nn.Module, mllm: ImageEmbedder) -> EncodedImages:
    """What a cached sample holds: the codec's posterior moments and the MLLM's image tokens."""
    images = images.to(mllm.device)
    return EncodedImages(codec.moments(images), mllm.embed_images(images))


def write_latent_cache(cfg: Config, out: Path, codec: nn.Module, mllm: ImageEmbedder, *, command: str,
                       batch_size: int = 64, dtype: torch.dtype = torch.float32, per_shard: int = 1000,
                       progress: bool = True) -> dict:
    report = DataReport()
    sets = SampleSets(cfg, report)
    items, split = sets.image_set()
    todo: list[tuple[str, Items, list[int]]] = [(CACHED_IMAGES, items, split.train)]
    spec = pair_spec(cfg.data.pairs) if cfg.data.pairs is not None else None
    if isinstance(spec, FileSpec):
        pairs = sets.items(spec, captions=True)
        todo.append((CACHED_PAIRS, pairs, list(range(len(pairs)))))
    counts = {name: _write(items, keep, out / name, codec, mllm, batch_size, dtype, per_shard, report, progress)
              for name, items, keep in todo}
    info = {"command": command, "fingerprint": latent_cache_fingerprint(cfg), "samples": counts,
            "dtype": str(dtype).removeprefix("torch."), "data": report.to_dict()}
    (out / CACHE_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def _write(items: Items, keep: list[int], out: Path, codec: nn.Module, mllm: ImageEmbedder, batch_size: int,
           dtype: torch.dtype, per_shard: int, report: DataReport, progress: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=per_shard, verbose=0) as sink, \
            tqdm(total=len(keep), desc=f"cache {out.name}", unit="img", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(keep), batch_size):
            chunk = keep[start:start + batch_size]
            loaded = []
            for i in chunk:
                try:
                    loaded.append(items.load(i))
                except BadSample as err:
                    report.bad(items.where(i), str(err))
                    continue
                report.ok()
            if loaded:
                encoded = encode_images(torch.stack([image for image, _ in loaded]), codec, mllm)
                for j, (_, caption) in enumerate(loaded):
                    record = {"__key__": f"{written:09d}", CACHE_EXTENSION: encoded.sample_bytes(j, dtype)}
                    if caption is not None:
                        record["txt"] = caption
                    sink.write(record)
                    written += 1
            bar.update(len(chunk))
    return written
