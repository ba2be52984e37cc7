"""The generator F, chosen by config: the paper's diffusers MM-DiT, the single-stream Z-Image DiT (IOMM-XL),
Qwen-Image's MM-DiT (`iomm.generator.qwen_image`), or a diffusers cross-attention U-Net.

All read the condition tokens (the MM-DiT and the U-Net as `encoder_hidden_states`, Z-Image as `cap_feats`
in one joint sequence with the image); the MM-DiT also takes the pooled condition. The U-Net's convolutions
give small models on small latents a locality prior that the MM-DiT has to learn, which is what a CPU-sized
budget cannot afford (bench/README.md, "A U-Net on posterior means").
"""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    ZImageTransformer2DModel,
)
from torch import nn

from iomm.config import UNET_NORM_GROUPS, GeneratorConfig
from iomm.generator.flow import TIMESTEP_SCALE, Rescale
from iomm.generator.qwen_image import build_transformer, load_scheduler, rescale_to_conditional, run_transformer

GENERATOR_CLASSES: dict[str, type[nn.Module]] = {
    "sd3": SD3Transformer2DModel, "unet": UNet2DConditionModel, "zimage": ZImageTransformer2DModel,
    "qwen_image": QwenImageTransformer2DModel}


def build_generator(cfg: GeneratorConfig, *, in_channels: int, sample_size: int, cond_width: int) -> nn.Module:
    if cfg.kind == "qwen_image":
        return build_transformer(cfg, latent_channels=in_channels, cond_width=cond_width)
    if cfg.pretrained is not None:
        return GENERATOR_CLASSES[cfg.kind].from_pretrained(cfg.pretrained).train()
    if cfg.kind == "unet":
        levels = len(cfg.block_out_channels)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=("CrossAttnDownBlock2D",) * levels,
            up_block_types=("CrossAttnUpBlock2D",) * levels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cond_width,
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads per level
            attention_head_dim=tuple(c // cfg.attention_head_dim for c in cfg.block_out_channels),
            norm_num_groups=UNET_NORM_GROUPS,
        )
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.kind == "zimage":
        d = cfg.attention_head_dim  # rotary axes (frame, height, width) as in Z-Image: 32 + 48 + 48 of 128
        return ZImageTransformer2DModel(
            all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=in_channels, dim=inner,
            n_layers=cfg.num_layers, n_refiner_layers=cfg.refiner_layers, n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_attention_heads, cap_feat_dim=cond_width, axes_dims=[d // 4, 3 * d // 8, 3 * d // 8],
            # rotary table lengths: condition tokens run along the first axis (Z-Image's 1024), the image the others
            axes_lens=[1024, max(sample_size // cfg.patch_size, 1), max(sample_size // cfg.patch_size, 1)])
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=cfg.patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cond_width,
        caption_projection_dim=inner,
        pooled_projection_dim=cond_width,
        pos_embed_max_size=max(sample_size // cfg.patch_size, 1),
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm,
    )


def generator_scheduler(cfg: GeneratorConfig) -> FlowMatchEulerDiscreteScheduler | None:
    """The sampling scheduler a pretrained generator comes with (Qwen-Image's); None: the flow's default."""
    return load_scheduler(cfg) if cfg.kind == "qwen_image" else None


def guidance_rescale(cfg: GeneratorConfig) -> Rescale | None:
    """How the generator's own pipeline rescales guided velocities (Qwen-Image's); None: plain CFG."""
    return rescale_to_conditional if cfg.kind == "qwen_image" else None


def run_generator(generator: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor,
                  pooled: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The generator's raw output (velocity or clean sample, per `flow.prediction`) for noisy latents. `mask`
    (B, L) marks the valid condition tokens; only Qwen-Image reads it (the others see padding as zeros)."""
    if isinstance(generator, QwenImageTransformer2DModel):
        return run_transformer(generator, latents, timestep, tokens, mask)
    if isinstance(generator, UNet2DConditionModel):
        return generator(latents, timestep, encoder_hidden_states=tokens, return_dict=False)[0]
    if isinstance(generator, ZImageTransformer2DModel):
        # Z-Image takes a list of (C, frames, H, W) latents, time from noise (0) to image (1), and predicts
        # image - noise (ZImagePipeline): the flip of both gives this flow's time and velocity.
        out = generator([x.unsqueeze(1) for x in latents], 1.0 - timestep / TIMESTEP_SCALE, list(tokens),
                        patch_size=generator.config.all_patch_size[0], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
    return generator(hidden_states=latents, timestep=timestep, encoder_hidden_states=tokens,
                     pooled_projections=pooled, return_dict=False)[0]
