"""Qwen-Image's own parts as IOMM's generator and codec (`generator.kind: qwen_image`).

From a local diffusers `QwenImagePipeline` directory: `QwenImageTransformer2DModel` (the generator, on 2x2-packed
latents, reading the LLM's states through its own `txt_norm` / `txt_in`), `AutoencoderKLQwenImage` with its
per-channel latent mean and std (the codec), the pipeline's scheduler (dynamic shift), and its Qwen2.5-VL
`text_encoder` and `tokenizer` (the frozen MLLM: `iomm.conditioning.mllm`). Packing, unpacking and the
normalisation are the pipeline's own functions and formulas, so a LoRA trained here loads into
`QwenImagePipeline` and gives the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel as QwenImageTransformer
from torch import nn

from iomm.config import GeneratorConfig
from iomm.config_checks import QWEN_IMAGE_DIR, latent_factor, qwen_image_problem
from iomm.generator.flow import TIMESTEP_SCALE
from iomm.row_generators import Generators


def check_pipeline_dir(path: str | Path) -> Path:
    problem = qwen_image_problem(path)
    if problem is not None:
        raise ValueError(f"expected {QWEN_IMAGE_DIR}, got {problem}")
    return Path(path)


def build_transformer(cfg: GeneratorConfig, *, latent_channels: int, cond_width: int) -> QwenImageTransformer:
    """The pipeline's transformer, or (no `pretrained`) a randomly initialised one of the configured size."""
    if cfg.pretrained is not None:
        path = check_pipeline_dir(cfg.pretrained)
        return QwenImageTransformer.from_pretrained(path, subfolder="transformer", local_files_only=True).train()
    d = cfg.attention_head_dim  # rotary axes (frame, height, width) as in Qwen-Image: 16 + 56 + 56 of 128
    return QwenImageTransformer(
        patch_size=cfg.patch_size, in_channels=latent_channels * 4, out_channels=latent_channels,
        num_layers=cfg.num_layers, attention_head_dim=d, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cond_width, axes_dims_rope=(d // 8, 7 * d // 16, d - d // 8 - 7 * d // 16))


def load_scheduler(cfg: GeneratorConfig) -> FlowMatchEulerDiscreteScheduler | None:
    """The pipeline's own scheduler (None without `pretrained`: the flow's default)."""
    if cfg.pretrained is None:
        return None
    path = check_pipeline_dir(cfg.pretrained)
    return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)


def run_transformer(transformer: QwenImageTransformer, latents: torch.Tensor, timestep: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The velocity for (B, C, h, w) latents, called as `QwenImagePipeline.__call__` calls it (time in [0, 1])."""
    b, c, h, w = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, b, c, h, w)
    out = transformer(hidden_states=packed, timestep=timestep / TIMESTEP_SCALE, encoder_hidden_states=tokens,
                      encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
                      img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h, w, vae_scale_factor=1).squeeze(2)


def rescale_to_conditional(cond: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
    """`QwenImagePipeline`'s true CFG: the guided velocity of each packed 2x2 patch rescaled to the norm of the
    conditional one."""
    b, c, h, w = cond.shape
    cond, combined = (QwenImagePipeline._pack_latents(v, b, c, h, w) for v in (cond, combined))
    out = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return QwenImagePipeline._unpack_latents(out, h, w, vae_scale_factor=1).squeeze(2)


class QwenImageCodec(nn.Module):
    """A frozen AutoencoderKLQwenImage on single frames: latents = (mean - latents_mean) / latents_std."""

    def __init__(self, vae: AutoencoderKLQwenImage, *, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        self.factor = latent_factor(vae.config)
        self.channels = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "QwenImageCodec":
        return super().train(False)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's mean and log-variance (B, 2C, h, w) of (B, 3, H, W) images in [0, 1]."""
        return self.vae.encode((images * 2.0 - 1.0).unsqueeze(2)).latent_dist.parameters.squeeze(2)

    def latents(self, moments: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments)
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return (latents - self.mean.to(latents)) / self.std.to(latents)

    def encode(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return self.latents(self.moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.std.to(latents) + self.mean.to(latents)
        images = self.vae.decode(z.to(self.vae.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
