"""Image loading: a recursive image folder, resized on the shorter side and centre-cropped.

A bad file never crashes a run: it is skipped, counted and reported (see `DataReport`).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageFile

from iomm.image_tensors import to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 8
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# How many standard deviations the bad fraction must stand above the limit before a run is stopped:
# a few unlucky draws of a mostly good dataset early in a run must not stop it.
BAD_FRACTION_SIGMAS = 4.0


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


class BadSource(ValueError):
    """A data source that cannot be read at all (not a tar, a missing column); the message names it."""


class TooMuchBadData(RuntimeError):
    """Too many bad samples in a row to make a batch; `bad` holds their (where, reason) for the report."""

    def __init__(self, message: str, bad: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.bad = list(bad or [])


@dataclass
class DataReport:
    """Counts of skipped samples by reason, shared by the loaders of one run."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ok(self) -> None:
        with self._lock:
            self.seen += 1

    def bad(self, where: str, reason: str) -> None:
        with self._lock:
            self.seen += 1
            self.skipped[reason] += 1
            self.examples.setdefault(reason, where)

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.seen, 1)

    def exceeds(self, limit: float, sigmas: float = BAD_FRACTION_SIGMAS) -> bool:
        """True when the bad fraction is above `limit` beyond reasonable doubt: the lower end of its Wilson
        score interval (`sigmas` wide) is above `limit`. Any bad sample exceeds a limit of 0."""
        bad, n = sum(self.skipped.values()), self.seen
        if bad == 0:
            return False
        p, z2 = bad / n, sigmas * sigmas
        low = (p + z2 / (2 * n) - sigmas * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
        return low > limit

    def summary(self) -> str:
        if not self.skipped:
            return f"data: {self.seen} samples read, none skipped"
        lines = [f"data: {self.seen} samples read, {sum(self.skipped.values())} skipped ({self.bad_fraction:.2%}):"]
        lines += [f"  {n:6d} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": self.examples}

    @classmethod
    def merged(cls, parts: list[dict]) -> "DataReport":
        """One report from the `to_dict` of several (the ranks of a run): counts add, the first example stays."""
        report = cls()
        for part in parts:
            report.seen += part["seen"]
            report.skipped.update(part["skipped"])
            for reason, where in part["examples"].items():
                report.examples.setdefault(reason, where)
        return report


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale as 8-bit "L". 16-bit modes span 0..65535; for "I" and "F"
    the range is read from the data (floats up to 1 are taken as [0, 1], values up to 255 as 8-bit)."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(array.max()) if array.size else 0.0
    if image.mode in SIXTEEN_BIT_MODES or top > 255.0:
        peak = 65535.0
    else:
        peak = 1.0 if image.mode == "F" and top <= 1.0 else 255.0
    return Image.fromarray((array / peak * 255.0).round().clip(0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, CMYK, RGBA, I;16, I, F, ...) to RGB; alpha is composited over white."""
    if image.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The centred square of side min(w, h), resized to resolution x resolution.

    Only the square is resampled, so a long thin image (8 x 100000) costs no more than its square.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + side, top + side))


def read_image(path: str | Path) -> Image.Image:
    """A user's image (an edit's reference, a demo upload) as a PIL image; BadSample, saying why, wherever the
    data loader would skip it (missing, not an image, truncated, a decompression bomb, too small)."""
    load_image(path, MIN_SIDE)
    with Image.open(path) as image:
        return image.copy()


def load_image(path: str | Path | IO[bytes], resolution: int) -> torch.Tensor:
    """(3, R, R) float in [0, 1] from a file (or a file object: a shard member's bytes); raises BadSample."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if min(image.size) < MIN_SIDE:
                    raise BadSample(f"image smaller than {MIN_SIDE} px")
                tensor = prepare_image(image, resolution)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("missing file") from None
    except Exception as err:  # decoders parse untrusted bytes: whatever one raises makes this one file bad
        raise BadSample(f"unreadable image ({type(err).__name__})") from None
    return tensor


def prepare_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """Any PIL image -> (3, R, R) float in [0, 1]: RGB, shorter side resized, centre-cropped."""
    return to_tensor(resize_center_crop(to_rgb(image), resolution))


def list_images(root: str | Path) -> list[Path]:
    """Every image file below `root`, sorted. One directory scan: file types come from the directory
    entries, so a folder of a million files lists in seconds."""
    root = Path(root)
    files = []
    for folder, _, names in os.walk(root):
        files += [os.path.join(folder, name) for name in names if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} recursively)")
    return [Path(f) for f in sorted(files)]
