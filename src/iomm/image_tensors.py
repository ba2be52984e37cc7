"""The one conversion between images (uint8 arrays, PIL) and float tensors in [0, 1], and image grids.

Arrays and PIL images are channels-last uint8 (H, W, 3); tensors are channels-first float (3, H, W)
or batched (B, 3, H, W) with values in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ImageLike = Union[np.ndarray, Image.Image]


def to_tensor(images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]; a (B, H, W, 3) array or a list of images -> (B, 3, H, W)."""
    if isinstance(images, (list, tuple)):
        return torch.stack([to_tensor(image) for image in images])
    array = np.asarray(images)
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(f"expected RGB images of shape (H, W, 3) or (B, H, W, 3), got {array.shape}")
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0)
    return tensor.permute(2, 0, 1) if array.ndim == 3 else tensor.permute(0, 3, 1, 2)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) floats in [0, 1] (clamped) -> channels-last uint8 arrays."""
    array = images.detach().float().clamp(0, 1).cpu().numpy() * 255
    channels_last = (1, 2, 0) if images.ndim == 3 else (0, 2, 3, 1)
    return array.round().astype(np.uint8).transpose(channels_last)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> one PIL image each."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def as_pil(image: ImageLike) -> Image.Image:
    """A PIL image as it is, or a (H, W, 3) uint8 array as a PIL image."""
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """Rows of (B, 3, H, W) images in [0, 1] -> one PIL image, rows stacked top to bottom on grey."""
    b, _, h, w = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = to_uint8(row)
        for i in range(len(pixels)):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y:y + h, x:x + w] = pixels[i]
    return Image.fromarray(grid)


def _wrap(text: str, width: float, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def captioned_grid(images: list[np.ndarray], captions: list[str], scale: int = 4, columns: int = 4) -> Image.Image:
    """A grid of images (upscaled `scale` times, nearest) with each caption word-wrapped beneath."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"captioned_grid: expected as many captions as images (>= 1), "
                         f"got {len(images)} images and {len(captions)} captions")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_h, tile_w = images[0].shape[0] * scale, images[0].shape[1] * scale
    wrapped = [_wrap(text, tile_w, measure, font) for text in captions]
    line_h, pad = 13, 4
    cell_h = tile_h + max(map(len, wrapped)) * line_h + 2 * pad
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * cell_h), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    for k, (image, lines) in enumerate(zip(images, wrapped)):
        x, y = pad + (k % columns) * (tile_w + pad), (k // columns) * cell_h + pad
        grid.paste(Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for i, line in enumerate(lines):
            draw.text((x, y + tile_h + 2 + i * line_h), line, fill=(0, 0, 0), font=font)
    return grid
