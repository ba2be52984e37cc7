"""Parameter counts per component, built on the meta device (no weights allocated, no files needed)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from iomm.builtins import builtin_mllm, builtin_vae
from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import Connector
from iomm.config import Config, vae_factor
from iomm.generator.network import build_generator


def internvl3_2b() -> PretrainedConfig:
    """InternVL3-2B (HF-native layout): InternViT-300M-448px + Qwen2.5-1.5B."""
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                       "intermediate_size": 4096, "image_size": [448, 448], "patch_size": [14, 14],
                       "use_qk_norm": False, "layer_scale_init_value": 0.1, "norm_type": "layer_norm"},
        text_config={"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
                     "vocab_size": 151674, "max_position_embeddings": 32768, "tie_word_embeddings": False},
        downsample_ratio=0.5, image_token_id=151667, tie_word_embeddings=False)


# FLUX.1 VAE layout: 16 latent channels, 8x downsampling.
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)

# The vision half of an HF VLM: InternVL's vision tower and projector, Qwen2.5-VL's `visual` (merger included).
VISION_MODULES = ("vision_tower", "multi_modal_projector", "visual")
MLLM_ARCHITECTURES = {"internvl3-2b": internvl3_2b}
VAE_ARCHITECTURES = {"flux-vae": FLUX_VAE}


def _mllm_config(cfg: Config) -> PretrainedConfig:
    if cfg.mllm.architecture is not None:
        if cfg.mllm.architecture not in MLLM_ARCHITECTURES:
            raise ValueError(f"mllm.architecture: expected one of {sorted(MLLM_ARCHITECTURES)}, "
                             f"got {cfg.mllm.architecture!r}")
        return MLLM_ARCHITECTURES[cfg.mllm.architecture]()
    builtin = builtin_mllm(cfg.mllm.path)
    if builtin is not None:
        return builtin.architecture(cfg)
    return AutoConfig.from_pretrained(cfg.mllm.path, local_files_only=True,
                                      trust_remote_code=cfg.mllm.trust_remote_code)


def _vae_config(cfg: Config) -> dict:
    builtin = builtin_vae(cfg.codec.path)
    if builtin is not None:
        return builtin.architecture(cfg)
    return dict(AutoencoderKL.load_config(cfg.codec.path, local_files_only=True))


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(cfg: Config) -> dict[str, int]:
    mllm_config = _mllm_config(cfg)
    hidden = int(mllm_config.get_text_config().hidden_size)
    with torch.device("meta"):
        mllm = AutoModelForImageTextToText.from_config(mllm_config)
        adapter = build_adapter(cfg.adapter, hidden, embed_scale=1.0)
        connector = Connector(cfg.connector, hidden)
        if cfg.codec.kind == "vae":
            vae_config = VAE_ARCHITECTURES.get(cfg.codec.architecture or "") or _vae_config(cfg)
            vae = AutoencoderKL.from_config(vae_config)
            factor, channels = vae_factor(vae.config.block_out_channels), vae.config.latent_channels
        else:
            vae, factor, channels = None, 1, 3
        generator = build_generator(cfg.generator, in_channels=channels, sample_size=cfg.data.resolution // factor,
                                    cond_width=cfg.connector.width)
    vision = sum(_count(getattr(mllm.model, name, None)) for name in VISION_MODULES)
    counts = {
        "mllm_vision": vision,
        "mllm_language": _count(mllm) - vision,
        "adapter": _count(adapter),
        "connector": _count(connector),
        "generator": _count(generator),
        "vae": _count(vae),
    }
    counts["trainable"] = counts["adapter"] + counts["connector"] + counts["generator"]
    counts["total"] = sum(v for k, v in counts.items() if k != "trainable")
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return "\n".join(f"{name:>15s}  {n:>15,d}  ({n / 1e6:9.2f} M)" for name, n in counts.items())


# Bytes per parameter. Trainable: fp32 master weights, fp32 gradients, AdamW's two fp32 moments, an fp32 EMA
# (FSDP2's MixedPrecisionPolicy computes in bf16 and reduces in fp32, from these fp32 shards). Frozen: bf16.
TRAINABLE_BYTES = {"parameters": 4, "gradients": 4, "optimizer": 8, "ema": 4}
FROZEN_BYTES = 2
GIB = 1024**3


def memory_per_gpu(counts: dict[str, int], gpus: int, parallel: str) -> dict[str, float]:
    """GiB per GPU of the model state (activations excluded: they scale with the batch and checkpointing).

    ddp: every rank holds everything. fsdp: the trainable state is sharded over `gpus` ranks (plus, while a
    block computes, its gathered bf16 parameters: the largest block at most, left out here); the frozen MLLM
    and VAE are replicated in bf16, since they have no gradients or optimizer state to shard.
    """
    shards = gpus if parallel == "fsdp" else 1
    out = {name: counts["trainable"] * size / shards / GIB for name, size in TRAINABLE_BYTES.items()}
    out["frozen_mllm"] = (counts["mllm_vision"] + counts["mllm_language"]) * FROZEN_BYTES / GIB
    out["frozen_vae"] = counts["vae"] * FROZEN_BYTES / GIB
    out["total"] = sum(out.values())
    return out


def format_memory(memory: dict[str, float], gpus: int, parallel: str, gpu_gib: float = 80.0) -> str:
    lines = [f"per-GPU model state, {parallel} on {gpus} GPUs (GiB; activations not included):"]
    lines += [f"{name:>15s}  {gib:9.2f}" for name, gib in memory.items()]
    room = gpu_gib - memory["total"]
    lines.append(f"{'left of ' + format(gpu_gib, 'g') + ' GiB':>15s}  {room:9.2f}  for activations"
                 + ("" if room > 0 else " (does not fit: use fsdp or more GPUs)"))
    return "\n".join(lines)
