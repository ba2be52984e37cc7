"""The generator F, chosen by config: the paper's diffusers MM-DiT, or a diffusers cross-attention U-Net.

Both read the condition tokens the same way (attention to `encoder_hidden_states`); the MM-DiT also takes
the pooled condition. The U-Net's convolutions give small models on small latents a locality prior that
the MM-DiT has to learn, which is what a CPU-sized budget cannot afford (bench/README.md, "A U-Net on
posterior means").
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from iomm.config import UNET_NORM_GROUPS, GeneratorConfig

GENERATOR_CLASSES: dict[str, type[SD3Transformer2DModel | UNet2DConditionModel]] = {
    "sd3": SD3Transformer2DModel, "unet": UNet2DConditionModel}


def build_generator(cfg: GeneratorConfig, *, in_channels: int, sample_size: int, cond_width: int) -> nn.Module:
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


def run_generator(generator: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor,
                  pooled: torch.Tensor) -> torch.Tensor:
    """The generator's raw output (velocity or clean sample, per `flow.prediction`) for noisy latents."""
    if isinstance(generator, UNet2DConditionModel):
        return generator(latents, timestep, encoder_hidden_states=tokens, return_dict=False)[0]
    return generator(hidden_states=latents, timestep=timestep, encoder_hidden_states=tokens,
                     pooled_projections=pooled, return_dict=False)[0]
