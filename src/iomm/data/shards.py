"""WebDataset tar shards as an indexed sample set, and the writer behind `iomm data shards`.

Shards are named the webdataset way (a brace pattern, a `::`-separated list, or a directory of `.tar`
files) and written with its `ShardWriter`. A sample is the members sharing a key (webdataset's
`base_plus_ext`): an image (jpg, jpeg, png or webp) and, for pairs, a `txt` caption or a `json` member with
a caption field. For exact epochs every sample must be reachable by number, so the main rank lists each
shard's member offsets once (headers only, with the standard library's `tarfile`) and keeps the list in the
run directory; a sample is then one seek and one read.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from iomm.data.encoded import CACHE_EXTENSION, EncodedImages
from iomm.data.images import BadSample, BadSource, DataReport, load_image
from iomm.data.run_index import main_rank_builds
from iomm.image_tensors import to_pil

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MEMBER_EXTENSIONS = (*IMAGE_EXTENSIONS, CACHE_EXTENSION)  # a sample's image: a file, or a latent cache's tensors
INDEX_PREFIX = "shard_index"  # + a hash of the shard list: a run's image shards and pair shards keep one each
_COLUMNS = ("shard", "ordinal", "image_kind", "image_offset", "image_size", "txt_offset", "txt_size", "json_offset",
            "json_size")


def expand_shards(spec: str) -> list[Path]:
    """A directory (its `.tar` files, sorted), or a webdataset URL spec (brace pattern, `::` list) whose parts
    may also be globs (`shards/*.tar`: the matches, sorted)."""
    if Path(spec).is_dir():
        shards = sorted(Path(spec).glob("*.tar"))
    else:
        shards = [Path(path) for url in wds.shardlists.expand_urls(spec) for path in _matches(url)]
    missing = [str(s) for s in shards if not s.is_file()]
    if shards and not missing:
        return shards
    if missing:
        problem = f"no shard matches {missing[0]}" if _is_glob(missing[0]) else f"no such shard {missing[0]}"
        problem += f" ({len(missing)} missing)"
    else:
        problem = "no .tar shards found"
    raise FileNotFoundError(f"{spec}: {problem}; a glob (shards/*.tar), a brace pattern (shard-{{000..009}}.tar) "
                            "or a directory of .tar files names shards")


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _matches(url: str) -> list[str]:
    """A glob's matches, sorted; a file that exists, or a glob that matches nothing, as it is."""
    if not _is_glob(url) or Path(url).is_file():
        return [url]
    return sorted(glob.glob(url)) or [url]


def _shard_members(shard: Path, shard_id: int) -> list[tuple[int, ...]]:
    """(shard, ordinal, image kind, then offset and size of the image, `txt` and `json` members; -1 if absent)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isreg() or os.path.basename(info.name).startswith("__"):
                    continue
                key, ext = base_plus_ext(info.name)
                if key is not None:
                    samples.setdefault(key, {})[ext.lower()] = info
    except tarfile.TarError as err:
        raise BadSource(f"{shard}: not a readable (uncompressed) tar shard ({err})") from None
    rows = []
    for ordinal, members in enumerate(samples.values()):
        kind = next((k for k, e in enumerate(MEMBER_EXTENSIONS) if e in members), -1)
        image = members[MEMBER_EXTENSIONS[kind]] if kind >= 0 else None
        row = [shard_id, ordinal, kind]
        for info in (image, members.get("txt"), members.get("json")):
            row += [info.offset_data, info.size] if info is not None else [-1, 0]
        rows.append(tuple(row))
    return rows


def _fingerprint(shards: list[Path]) -> list[list]:
    return [[str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns] for s in shards]


def build_index(shards: list[Path]) -> dict[str, np.ndarray]:
    rows = [row for i, shard in enumerate(shards) for row in _shard_members(shard, i)]
    table = np.array(rows, dtype=np.int64).reshape(-1, len(_COLUMNS))
    return {name: table[:, i] for i, name in enumerate(_COLUMNS)}


def shard_index(shards: list[Path], run_dir: Path | None, *, main: bool = True,
                barrier=lambda: None) -> dict[str, np.ndarray]:
    """The member offsets of every sample in `shards`, listed by the main rank (cached in `run_dir`)."""
    if run_dir is None:
        return build_index(shards)
    fingerprint = json.dumps(_fingerprint(shards))
    path = run_dir / f"{INDEX_PREFIX}_{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}.npz"

    def read() -> dict[str, np.ndarray] | None:
        try:
            with np.load(path) as stored:
                return dict(stored) if str(stored["fingerprint"]) == fingerprint else None
        except (OSError, ValueError, KeyError):
            return None

    def build() -> dict[str, np.ndarray]:
        index = build_index(shards)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".tmp"), "wb") as f:
                np.savez(f, fingerprint=np.array(fingerprint), **index)
            path.with_suffix(".tmp").replace(path)
        return index

    index = main_rank_builds(read, build, main=main, barrier=barrier)
    index.pop("fingerprint", None)
    return index


def _read(shard: Path, offset: int, size: int) -> bytes:
    with open(shard, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise BadSample("truncated shard member")
    return data


@dataclass
class ShardItems:
    """The samples of a shard set, by number; `captions` reads and requires each sample's caption, `encoded`
    reads a latent cache's samples instead of image files."""

    shards: list[Path]
    index: dict[str, np.ndarray]
    resolution: int
    captions: bool = False
    caption_field: str | None = None
    encoded: bool = False

    def __len__(self) -> int:
        return len(self.index["shard"])

    def where(self, i: int) -> str:
        return f"{self.shards[self.index['shard'][i]]} (sample {self.index['ordinal'][i]})"

    def load(self, i: int) -> tuple[torch.Tensor | EncodedImages, str | None]:
        shard = self.shards[int(self.index["shard"][i])]
        kind = int(self.index["image_kind"][i])
        if kind < 0 or (MEMBER_EXTENSIONS[kind] == CACHE_EXTENSION) != self.encoded:
            expected = CACHE_EXTENSION if self.encoded else "/".join(IMAGE_EXTENSIONS)
            raise BadSample(f"sample has no {expected} member")
        caption = self._caption(shard, i) if self.captions else None
        data = _read(shard, int(self.index["image_offset"][i]), int(self.index["image_size"][i]))
        if not self.encoded:
            return load_image(io.BytesIO(data), self.resolution), caption
        try:
            return EncodedImages.from_bytes(data), caption
        except Exception as err:  # safetensors parses the bytes: whatever it raises makes this one sample bad
            raise BadSample(f"unreadable cached sample ({type(err).__name__})") from None

    def _caption(self, shard: Path, i: int) -> str:
        member = "json" if self.caption_field is not None else "txt"
        offset, size = int(self.index[f"{member}_offset"][i]), int(self.index[f"{member}_size"][i])
        if offset < 0:
            raise BadSample(f"empty or missing caption (no {member} member)")
        try:
            text = _read(shard, offset, size).decode("utf-8")
            if self.caption_field is not None:
                record = json.loads(text)
                text = record.get(self.caption_field) if isinstance(record, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BadSample(f"caption member ({member}) is not UTF-8 text / JSON") from None
        if text is not None and not isinstance(text, str):
            raise BadSample(f"caption field {self.caption_field!r} is not text")
        if not text or not text.strip():
            raise BadSample("empty or missing caption")
        return text.strip()


def _encoded(path: Path, resolution: int, image_format: str) -> bytes:
    """The file's centred square at `resolution`, encoded; raises BadSample like any training read."""
    image = to_pil(load_image(path, resolution)[None])[0]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image_format == "jpg" else "PNG", quality=95)
    return buffer.getvalue()


@dataclass
class WrittenShards:
    shards: list[Path]
    samples: int
    captioned: int  # samples with a `txt` caption


def source_name(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies below it, else as given."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_shards(samples: list[tuple[Path, str | None]], out: Path, resolution: int, per_shard: int,
                 image_format: str, report: DataReport, progress: bool = True,
                 root: Path | None = None) -> WrittenShards:
    """WebDataset shards `out/000000.tar`, ... of `per_shard` samples: the image, a `txt` caption when there is one,
    and `json` naming the source file ({"source": its path relative to `root`}). A sample that cannot be read is
    skipped and counted in `report`."""
    out.mkdir(parents=True, exist_ok=True)
    written = captioned = 0
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for path, caption in tqdm(samples, desc="shards", unit="img", disable=not progress, mininterval=1.0):
            try:
                record = {"__key__": f"{written:09d}", image_format: _encoded(path, resolution, image_format)}
            except BadSample as err:
                report.bad(str(path), str(err))
                continue
            record["json"] = {"source": source_name(path, root) if root is not None else str(path)}
            if caption is not None:
                record["txt"] = caption
                captioned += 1
            sink.write(record)
            report.ok()
            written += 1
    return WrittenShards(sorted(out.glob("*.tar")), written, captioned)
