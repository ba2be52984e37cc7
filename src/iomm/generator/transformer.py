"""The generator F: a diffusers MM-DiT chosen by config."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from iomm.config import GeneratorConfig


def build_generator(cfg: GeneratorConfig, *, in_channels: int, sample_size: int,
                    cond_width: int) -> SD3Transformer2DModel:
    if cfg.pretrained is not None:
        return SD3Transformer2DModel.from_pretrained(cfg.pretrained).train()
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
