"""Latent codecs: pixel space for tiny images, or a diffusers VAE loaded from a local directory (an AutoencoderKL,
or Qwen-Image's AutoencoderKLQwenImage; either on its own or in a pipeline directory's `vae/`)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from iomm.config_checks import component_dir, vae_factor
from iomm.row_generators import Generators


class PixelCodec(nn.Module):
    """Identity codec: images in [0, 1] <-> "latents" in [-1, 1] (its "moments" are the latents)."""

    factor = 1
    channels = 3

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def latents(self, moments: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return moments

    def encode(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return self.latents(self.moments(images), generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)


class VAECodec(nn.Module):
    """A frozen AutoencoderKL (SD3 / FLUX style: latents = (mean - shift) * scale)."""

    def __init__(self, vae: AutoencoderKL, *, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        self.factor = vae_factor(vae.config.block_out_channels)
        self.channels = vae.config.latent_channels
        self.scale = vae.config.scaling_factor
        self.shift = vae.config.shift_factor or 0.0

    @classmethod
    def from_pretrained(cls, path: str | Path, *, sample_posterior: bool = True) -> "VAECodec":
        return cls(AutoencoderKL.from_pretrained(path, local_files_only=True), sample_posterior=sample_posterior)

    def train(self, mode: bool = True) -> "VAECodec":
        return super().train(False)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's parameters (B, 2C, h, w): mean and log-variance (what a latent cache stores)."""
        return self.vae.encode(images * 2.0 - 1.0).latent_dist.parameters

    def latents(self, moments: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return (latents - self.shift) * self.scale

    def encode(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return self.latents(self.moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents / self.scale + self.shift).sample
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def codec_for(vae: nn.Module, *, sample_posterior: bool = True) -> nn.Module:
    """The codec around a loaded diffusers VAE."""
    from iomm.generator.qwen_image import QwenImageCodec

    if isinstance(vae, AutoencoderKL):
        return VAECodec(vae, sample_posterior=sample_posterior)
    return QwenImageCodec(vae, sample_posterior=sample_posterior)


def load_codec(path: str | Path, *, sample_posterior: bool = True) -> nn.Module:
    """The codec of a VAE directory, or of a pipeline directory's `vae/`, loaded with the class its config names."""
    from diffusers import AutoencoderKLQwenImage

    path = component_dir(path, "vae")
    kind = AutoencoderKL.load_config(path, local_files_only=True).get("_class_name", "AutoencoderKL")
    if kind == AutoencoderKLQwenImage.__name__:
        return codec_for(AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True),
                         sample_posterior=sample_posterior)
    return VAECodec.from_pretrained(path, sample_posterior=sample_posterior)
