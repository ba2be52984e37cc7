"""Image loading: a recursive image folder, resized on the shorter side and centre-cropped.

A bad file never crashes a run: it is skipped, counted and reported (see `DataReport`).
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MIN_SIDE = 8


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


class TooMuchBadData(RuntimeError):
    """Too many bad samples in a row to make a batch."""


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

    def summary(self) -> str:
        if not self.skipped:
            return f"data: {self.seen} samples read, none skipped"
        lines = [f"data: {self.seen} samples read, {sum(self.skipped.values())} skipped ({self.bad_fraction:.2%}):"]
        lines += [f"  {n:6d} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": self.examples}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, CMYK, RGBA, I;16, ...) to RGB; alpha is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255.0).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """(3, R, R) float in [0, 1]; raises BadSample with the reason."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if min(image.size) < MIN_SIDE:
                    raise BadSample(f"image smaller than {MIN_SIDE} px")
                rgb = resize_center_crop(to_rgb(image), resolution)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("missing file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as err:
        raise BadSample(f"unreadable image ({type(err).__name__})") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} recursively)")
    return files
