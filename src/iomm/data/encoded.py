"""Images as the frozen parts see them: what a latent cache stores (`iomm data cache`, `data.latents`).

A cached image is the codec's posterior parameters (`moments`: a VAE's mean and log-variance, so that
`codec.sample_posterior` still samples at training time) and the frozen MLLM's image tokens before any
masking. Training from them runs exactly the online path after those two frozen encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save

CACHE_EXTENSION = "safetensors"


@dataclass
class EncodedImages:
    moments: torch.Tensor  # (B, M, h, w)
    tokens: torch.Tensor  # (B, N, D)

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, rows: list[int]) -> "EncodedImages":
        return EncodedImages(self.moments[rows], self.tokens[rows])

    @property
    def dtype(self) -> torch.dtype:
        return self.moments.dtype

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "EncodedImages":
        return EncodedImages(self.moments.to(device, non_blocking=non_blocking),
                             self.tokens.to(device, non_blocking=non_blocking))

    @classmethod
    def stack(cls, samples: list["EncodedImages"]) -> "EncodedImages":
        return cls(torch.cat([s.moments for s in samples]), torch.cat([s.tokens for s in samples]))

    def sample_bytes(self, i: int, dtype: torch.dtype = torch.float32) -> bytes:
        """Sample i as a safetensors file."""
        return save({name: getattr(self, name)[i].to(dtype).contiguous() for name in ("moments", "tokens")})

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncodedImages":
        """One sample (a batch of 1, float32) from `sample_bytes`; raises KeyError / ValueError if malformed."""
        tensors = load(data)
        return cls(tensors["moments"].float()[None], tensors["tokens"].float()[None])


def stack_images(images: list) -> "torch.Tensor | EncodedImages":
    """A batch from per-sample images: (3, R, R) tensors, or cached samples."""
    if all(isinstance(image, EncodedImages) for image in images):
        return EncodedImages.stack(images)
    return torch.stack(images)
