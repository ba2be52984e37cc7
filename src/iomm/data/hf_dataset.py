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

from iomm.data.images import BadSample, BadSource, load_image

DEFAULT_CAPTION_COLUMN = "text"


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


@dataclass
class HFItems:
    """Rows of a dataset by number: (image, caption) with `captions`, else (image, None)."""

    dataset: datasets.Dataset
    location: str
    resolution: int
    image_column: str = "image"
    caption_column: str | None = None  # read (and required) for pairs

    @classmethod
    def open(cls, location: str, resolution: int, image_column: str, caption_column: str | None) -> "HFItems":
        dataset = load_hf_dataset(location)
        for column in (image_column, caption_column):
            if column is not None and column not in dataset.column_names:
                raise BadSource(f"{location}: no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                                "set data.image_column / data.caption_field")
        caption_type = getattr(dataset.features.get(caption_column), "dtype", None) if caption_column else "string"
        if caption_type not in ("string", "large_string"):
            raise BadSource(f"{location}: caption column {caption_column!r} is not text "
                            f"(its type: {dataset.features[caption_column]}); set data.caption_field")
        dataset = dataset.select_columns([c for c in (image_column, caption_column) if c is not None])
        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        return cls(dataset, location, resolution, image_column, caption_column)

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        return f"{self.location} (row {i})"

    def load(self, i: int) -> tuple[torch.Tensor, str | None]:
        row = self.dataset[i]
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
