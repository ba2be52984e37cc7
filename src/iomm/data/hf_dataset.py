"""A local Hugging Face dataset as an indexed sample set.

`data.path` (or `hf:DIR` in `data.pairs`) is a `save_to_disk` directory or a folder of parquet / arrow
files, loaded with `datasets`. Its rows are memory-mapped Arrow, so a dataset larger than memory is read
row by row at random, which exact epochs across ranks and DataLoader workers need. The image column
is read undecoded and decoded here, so that a bad image is skipped and counted like any other.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from iomm.data.images import BadSample, BadSource, TooMuchBadData, load_image

DEFAULT_CAPTION_COLUMN = "text"
HFDataset = datasets.Dataset | datasets.IterableDataset


def load_hf_dataset(location: str | Path) -> datasets.Dataset:
    path = Path(location)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise BadSource(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(loaded)})")
            loaded = loaded["train"]
        return loaded
    for builder in ("parquet", "arrow"):
        files = sorted(str(p) for p in path.rglob(f"*.{builder}"))
        if files:
            return datasets.load_dataset(builder, data_files=files, split="train")
    raise BadSource(f"{path}: neither a save_to_disk directory nor a folder of .parquet / .arrow files")


def _columns(dataset: HFDataset, location: str, image_column: str, caption_column: str | None) -> HFDataset:
    """The image (undecoded) and caption columns only; a missing one names the columns there are. A stream whose
    columns are not known up front is taken as it is."""
    columns = [c for c in (image_column, caption_column) if c is not None]
    names = dataset.column_names
    missing = [c for c in columns if names is not None and c not in names]
    if missing:
        raise BadSource(f"{location}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                        "set data.image_column / data.caption_field")
    dataset = dataset.select_columns(columns)
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


@dataclass
class HFItems:
    """Rows of a dataset by number: (image, caption) with `captions`, else (image, None)."""

    dataset: HFDataset
    location: str
    resolution: int
    image_column: str = "image"
    caption_column: str | None = None  # read (and required) for pairs

    @classmethod
    def open(cls, location: str, resolution: int, image_column: str, caption_column: str | None) -> "HFItems":
        dataset = _columns(load_hf_dataset(location), location, image_column, caption_column)
        caption_type = getattr(dataset.features.get(caption_column), "dtype", None) if caption_column else "string"
        if caption_type not in ("string", "large_string"):
            raise BadSource(f"{location}: caption column {caption_column!r} is not text "
                            f"(its type: {dataset.features[caption_column]}); set data.caption_field")
        return cls(dataset, location, resolution, image_column, caption_column)

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        return f"{self.location} (row {i})"

    def load(self, i: int) -> tuple[torch.Tensor, str | None]:
        return self.decode(self.dataset[i])

    def decode(self, row: dict) -> tuple[torch.Tensor, str | None]:
        caption = None
        if self.caption_column is not None:
            caption = row[self.caption_column]
            if not isinstance(caption, str) or not caption.strip():
                raise BadSample("empty or missing caption")
            caption = caption.strip()
        return self._image(row[self.image_column]), caption

    def _image(self, value: object) -> torch.Tensor:
        if isinstance(value, dict):  # an undecoded datasets.Image: bytes, or a path to the file
            if value.get("bytes") is None and value.get("path"):
                return load_image(value["path"], self.resolution)
            value = value.get("bytes")
        if not isinstance(value, bytes):
            raise BadSample("no image bytes in the image column")
        return load_image(io.BytesIO(value), self.resolution)


class HFStream:
    """A folder of parquet files read as a `datasets` stream (`data.streaming`), for data that should not be
    converted into the Arrow cache first.

    Epoch e is the stream shuffled by `IterableDataset.shuffle` (the files' order, then a buffer of `buffer`
    rows), seeded by `seed` and `set_epoch(e)`; position p reads row p % n of epoch p // n,
    so a resume at a saved position reads the same rows (after reading past the earlier ones). Every rank and
    DataLoader worker reads the whole stream and keeps its own rows: exact, at that cost; a memory-mapped
    dataset (`save_to_disk`) or shards are read at random instead. A bad row's slot takes the stream's first
    good row in file order.
    """

    replays = False

    def __init__(self, location: str, resolution: int, image_column: str, caption_column: str | None, seed: int,
                 buffer: int = 1000):
        import pyarrow.parquet as pq

        files = sorted(str(p) for p in Path(location).rglob("*.parquet"))
        if not files:
            raise BadSource(f"{location}: data.streaming reads a folder of .parquet files; none found")
        self.n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        stream = _columns(stream, location, image_column, caption_column)
        self.stream = stream.shuffle(seed=seed, buffer_size=buffer)
        self.rows = HFItems(stream, location, resolution, image_column, caption_column)  # decodes one row
        self._epoch, self._next, self._rows = -1, 0, iter(())
        self._substitute: tuple[torch.Tensor, str | None] | None = None

    def _row(self, position: int) -> dict:
        epoch, k = divmod(position, self.n)
        if epoch != self._epoch or k < self._next:
            self.stream.set_epoch(epoch)
            self._epoch, self._next, self._rows = epoch, 0, iter(self.stream)
        for _ in range(k - self._next):
            next(self._rows)
        self._next = k + 1
        return next(self._rows)

    def take(self, position: int, rng: object, bad: list[tuple[str, str]]) -> tuple[torch.Tensor, str | None]:
        try:
            return self.rows.decode(self._row(position))
        except BadSample as err:
            bad.append((f"{self.rows.location} (stream position {position})", str(err)))
        if self._substitute is None:  # the same for every bad slot: a resume reads what the whole run read
            for row in self.rows.dataset:
                try:
                    self._substitute = self.rows.decode(row)
                    break
                except BadSample:
                    continue
            else:
                raise TooMuchBadData(f"{self.rows.location}: no readable sample in the stream", bad)
        return self._substitute
