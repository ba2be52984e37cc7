"""Latent codecs: pixel space for tiny images, or a diffusers VAE loaded from a local directory (an AutoencoderKL,
or Qwen-Image's AutoencoderKLQwenImage; either on its own or in a pipeline directory's `vae/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from iomm.model_files import component_dir, latent_factor
from iomm.per_sample_rng import Generators


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

    frames = False  # True: the VAE encodes videos (B, C, T, H, W), and an image goes in as one frame

    def __init__(self, vae: nn.Module, *, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        self.factor = latent_factor({"_class_name": type(vae).__name__, **vae.config})
        self.channels, scale, shift = self.normalisation(vae.config)
        for name, value in (("scale", scale), ("shift", shift)):
            if isinstance(value, torch.Tensor):  # per channel: moves with the module
                self.register_buffer(name, value, persistent=False)
            else:
                setattr(self, name, value)

    @staticmethod
    def normalisation(config: Any) -> tuple[int, float | torch.Tensor, float | torch.Tensor]:
        """The latent channels, and the scale and shift of latents = (posterior - shift) * scale."""
        return config.latent_channels, config.scaling_factor, config.shift_factor or 0.0

    @classmethod
    def from_pretrained(cls, path: str | Path, *, sample_posterior: bool = True) -> "VAECodec":
        return cls(AutoencoderKL.from_pretrained(path, local_files_only=True), sample_posterior=sample_posterior)

    def train(self, mode: bool = True) -> "VAECodec":
        return super().train(False)

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(2) if self.frames else x).to(self.vae.dtype)

    def _from_vae(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, 0] if self.frames else x).float()

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's parameters (B, 2C, h, w): mean and log-variance (what a latent cache stores)."""
        return self._from_vae(self.vae.encode(self._to_vae(images * 2.0 - 1.0)).latent_dist.parameters)

    def latents(self, moments: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return (latents - self.shift) * self.scale

    def encode(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return self.latents(self.moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self._from_vae(self.vae.decode(self._to_vae(latents / self.scale + self.shift)).sample)
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


class QwenImageCodec(VAECodec):
    """A frozen AutoencoderKLQwenImage (a video VAE) on single frames, its latents normalised per channel as
    Qwen-Image's pipelines do: (posterior - latents_mean) * (1 / latents_std)."""

    frames = True

    @staticmethod
    def normalisation(config: Any) -> tuple[int, torch.Tensor, torch.Tensor]:
        view = (1, config.z_dim, 1, 1)
        return (config.z_dim, 1.0 / torch.tensor(config.latents_std).view(view),
                torch.tensor(config.latents_mean).view(view))


def codec_for(vae: nn.Module, *, sample_posterior: bool = True) -> nn.Module:
    """The codec around a loaded diffusers VAE."""
    codec_class = QwenImageCodec if isinstance(vae, AutoencoderKLQwenImage) else VAECodec
    return codec_class(vae, sample_posterior=sample_posterior)


def load_codec(path: str | Path, *, sample_posterior: bool = True) -> nn.Module:
    """The codec of a VAE directory, or of a pipeline directory's `vae/`, loaded with the class its config names."""
    path = component_dir(path, "vae")
    kind = AutoencoderKL.load_config(path, local_files_only=True).get("_class_name", "AutoencoderKL")
    if kind == AutoencoderKLQwenImage.__name__:
        return codec_for(AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True),
                         sample_posterior=sample_posterior)
    return VAECodec.from_pretrained(path, sample_posterior=sample_posterior)
