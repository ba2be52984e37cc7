"""Qwen-Image's own parts as IOMM's generator (`generator.kind: qwen_image`).

From a local diffusers `QwenImagePipeline` directory: `QwenImageTransformer2DModel` (the generator, on 2x2-packed
latents, reading the LLM's states through its own `txt_norm` / `txt_in`) and the pipeline's scheduler (dynamic
shift). Its `AutoencoderKLQwenImage` is the codec (`iomm.generator.codec.QwenImageCodec`), its Qwen2.5-VL
`text_encoder` and `tokenizer` the frozen MLLM (`iomm.conditioning.mllm`). Packing, unpacking and guidance are
the pipeline's own functions and formulas, so a LoRA trained here loads into `QwenImagePipeline` and gives the
same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import QwenImageTransformer2DModel as QwenImageTransformer

from iomm.config import GeneratorConfig
from iomm.generator.flow import TIMESTEP_SCALE
from iomm.model_files import QWEN_IMAGE_DIR, qwen_image_problem
from iomm.quantize import diffusers_loading, leave_int8_out_of_state


def check_pipeline_dir(path: str | Path) -> Path:
    problem = qwen_image_problem(path)
    if problem is not None:
        raise ValueError(f"expected {QWEN_IMAGE_DIR}, got {problem}")
    return Path(path)


def build_transformer(cfg: GeneratorConfig, *, latent_channels: int, cond_width: int) -> QwenImageTransformer:
    """The pipeline's transformer (its linear weights in int8 with `quantize: int8`), or (no `pretrained`) a
    randomly initialised one of the configured size."""
    if cfg.pretrained is not None:
        path = check_pipeline_dir(cfg.pretrained)
        transformer = QwenImageTransformer.from_pretrained(path, subfolder="transformer", local_files_only=True,
                                                           **diffusers_loading(cfg.quantize)).train()
        if cfg.quantize != "none":
            leave_int8_out_of_state(transformer)
        return transformer
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


def _pipeline() -> type:
    """`QwenImagePipeline`, imported when first used: the pipelines module takes a second to import."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline


def run_transformer(transformer: QwenImageTransformer, latents: torch.Tensor, timestep: torch.Tensor,
                    tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The velocity for (B, C, h, w) latents, called as `QwenImagePipeline.__call__` calls it (time in [0, 1])."""
    b, c, h, w = latents.shape
    packed = _pipeline()._pack_latents(latents, b, c, h, w)
    out = transformer(hidden_states=packed, timestep=timestep / TIMESTEP_SCALE, encoder_hidden_states=tokens,
                      encoder_hidden_states_mask=None if mask is None or bool(mask.all()) else mask,
                      img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return _pipeline()._unpack_latents(out, h, w, vae_scale_factor=1).squeeze(2)


def rescale_to_conditional(cond: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
    """`QwenImagePipeline`'s true CFG: the guided velocity of each packed 2x2 patch rescaled to the norm of the
    conditional one."""
    b, c, h, w = cond.shape
    cond, combined = (_pipeline()._pack_latents(v, b, c, h, w) for v in (cond, combined))
    out = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return _pipeline()._unpack_latents(out, h, w, vae_scale_factor=1).squeeze(2)

