"""Parameter counts, forward FLOPs and memory per GPU of a config's components (`iomm describe`), built on the meta
device (no weights allocated, no files needed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import build_connector
from iomm.conditioning.mllm_families import family_for
from iomm.config import Config
from iomm.generator.codec import PixelCodec, codec_for
from iomm.generator.lora import add_lora
from iomm.generator.network import GENERATOR_CLASSES, build_generator, run_generator
from iomm.model_files import component_dir
from iomm.quantize import INT8_BYTES, int8_weight_count
from iomm.registry import builtin_mllm, builtin_vae
from iomm.training.optimizers import muon_parameters


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


def qwen25_vl_7b() -> PretrainedConfig:
    """Qwen2.5-VL-7B-Instruct, Qwen-Image's text encoder: a 32-layer ViT with window attention + a 7B Qwen2."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        text_config={"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                     "max_position_embeddings": 128000, "tie_word_embeddings": False},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


# FLUX.1 VAE layout: 16 latent channels, 8x downsampling.
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)

# The vision half of an HF VLM: InternVL's vision tower and projector, Qwen2.5-VL's `visual` (merger included).
VISION_MODULES = ("vision_tower", "multi_modal_projector", "visual")
MLLM_ARCHITECTURES = {"internvl3-2b": internvl3_2b, "qwen2.5-vl-7b": qwen25_vl_7b}
# Qwen-Image's VAE: AutoencoderKLQwenImage's defaults are its layout
VAE_ARCHITECTURES = {"flux-vae": FLUX_VAE, "qwen-image-vae": {"_class_name": "AutoencoderKLQwenImage"}}


def _mllm_config(cfg: Config) -> PretrainedConfig:
    if cfg.mllm.architecture is not None:
        if cfg.mllm.architecture not in MLLM_ARCHITECTURES:
            raise ValueError(f"mllm.architecture: expected one of {sorted(MLLM_ARCHITECTURES)}, "
                             f"got {cfg.mllm.architecture!r}")
        return MLLM_ARCHITECTURES[cfg.mllm.architecture]()
    builtin = builtin_mllm(cfg.mllm.path)
    if builtin is not None:
        return builtin.architecture(cfg)
    return AutoConfig.from_pretrained(component_dir(cfg.mllm.path, "text_encoder"), local_files_only=True,
                                      trust_remote_code=cfg.mllm.trust_remote_code)


def _vae_config(cfg: Config) -> dict:
    builtin = builtin_vae(cfg.codec.path)
    if builtin is not None:
        return builtin.architecture(cfg)
    return dict(AutoencoderKL.load_config(component_dir(cfg.codec.path, "vae"), local_files_only=True))


def _vae(config: dict) -> nn.Module:
    vae_class = AutoencoderKLQwenImage if config.get("_class_name") == "AutoencoderKLQwenImage" else AutoencoderKL
    return vae_class.from_config({k: v for k, v in config.items() if k != "_class_name"})


def _generator(cfg: Config, channels: int, sample_size: int, cond_width: int) -> nn.Module:
    """The configured generator; a pretrained one from its config file when that is at hand, else the layout."""
    g = cfg.generator
    if g.pretrained is not None:
        folder = component_dir(g.pretrained, "transformer")
        if (folder / "config.json").is_file():
            generator_class = GENERATOR_CLASSES[g.kind]
            return generator_class.from_config(generator_class.load_config(folder, local_files_only=True))
        g = dataclasses.replace(g, pretrained=None)
    return build_generator(g, in_channels=channels, sample_size=sample_size, cond_width=cond_width)


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@dataclass
class MetaParts:
    """The configured model's parts on the meta device (shapes, no weights)."""

    mllm_config: PretrainedConfig
    mllm: nn.Module
    adapter: nn.Module | None
    connector: nn.Module
    vae: nn.Module | None
    factor: int  # pixels per latent cell
    channels: int  # latent channels
    generator: nn.Module


def meta_parts(cfg: Config) -> MetaParts:
    mllm_config = _mllm_config(cfg)
    hidden = int(mllm_config.get_text_config().hidden_size)
    with torch.device("meta"):
        mllm = AutoModelForImageTextToText.from_config(mllm_config)
        adapter = build_adapter(cfg.adapter, hidden, embed_scale=1.0)
        connector = build_connector(cfg.connector, hidden)
        if cfg.codec.kind == "vae":
            vae = _vae(VAE_ARCHITECTURES.get(cfg.codec.architecture or "") or _vae_config(cfg))
            codec = codec_for(vae)
        else:
            vae, codec = None, PixelCodec()
        factor, channels = codec.factor, codec.channels
        generator = _generator(cfg, channels, cfg.data.resolution // factor, connector.width)
    return MetaParts(mllm_config, mllm, adapter, connector, vae, factor, channels, generator)


def describe(cfg: Config) -> dict[str, int]:
    parts = meta_parts(cfg)
    mllm, adapter, connector, vae, generator = parts.mllm, parts.adapter, parts.connector, parts.vae, parts.generator
    generator_count = _count(generator)
    int8 = {"generator_int8": int8_weight_count(generator) if cfg.generator.quantize == "int8" else 0,
            "mllm_int8": int8_weight_count(mllm, skip=(mllm.get_output_embeddings(),))
            if cfg.mllm.quantize == "int8" else 0}
    if cfg.train.lora.enabled:
        with torch.device("meta"):
            add_lora(generator, cfg.train.lora)
    vision = sum(_count(getattr(mllm.model, name, None)) for name in VISION_MODULES)
    counts = {
        "mllm_vision": vision,
        "mllm_language": _count(mllm) - vision,
        "adapter": _count(adapter),
        "connector": _count(connector),
        "generator": generator_count,
        "vae": _count(vae),
    }
    lora = cfg.train.lora
    total = sum(counts.values())
    if lora.enabled:  # build_model: the base frozen; adapter and connector too when they come from lora.base
        counts["lora"] = _count(generator) - generator_count
        counts["trainable"] = counts["lora"] + (0 if lora.base else counts["adapter"] + counts["connector"])
        counts["lora_base"] = counts["generator"] + (counts["adapter"] + counts["connector"] if lora.base else 0)
        total += counts["lora"]
    else:
        counts["trainable"] = counts["adapter"] + counts["connector"] + counts["generator"]
    if cfg.train.optimizer == "muon":  # of the trainable, what build_optimizers gives Muon
        trainable = {f"generator.{name}": p for name, p in generator.named_parameters() if p.requires_grad}
        counts["muon_matrices"] = sum(trainable[name].numel() for name in muon_parameters(generator, trainable))
    counts |= {name: n for name, n in int8.items() if n}  # of the frozen weights, those stored in int8
    counts["total"] = total
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return "\n".join(f"{name:>15s}  {n:>15,d}  ({n / 1e6:9.2f} M)" for name, n in counts.items())


# Bytes per parameter. Trainable: fp32 master weights, fp32 gradients, the optimizer's fp32 state, an fp32 EMA
# (FSDP2's MixedPrecisionPolicy computes in bf16 and reduces in fp32, from these fp32 shards). Frozen: bf16.
ADAMW_STATE_BYTES = 8  # two moments
MUON_STATE_BYTES = 4  # one momentum buffer (torch.optim.Muon), for the matrices it steps
TRAINABLE_BYTES = {"parameters": 4, "gradients": 4, "optimizer": ADAMW_STATE_BYTES, "ema": 4}
FROZEN_BYTES = 2
GIB = 1024**3


def memory_per_gpu(counts: dict[str, int], gpus: int, parallel: str, shard_size: int | None = None) -> dict[str, float]:
    """GiB per GPU of the model state (activations excluded: they scale with the batch and checkpointing).

    ddp: every rank holds everything. fsdp: the trainable state is sharded over `gpus` ranks (plus, while a
    block computes, its gathered bf16 parameters: the largest block at most, left out here); hsdp: over
    `shard_size` ranks (default `gpus`), as fsdp on one node. The frozen MLLM and VAE are replicated in bf16,
    since they have no gradients or optimizer state to shard.
    """
    shards = {"fsdp": gpus, "hsdp": min(shard_size or gpus, gpus)}.get(parallel, 1)
    out = {name: counts["trainable"] * size / shards / GIB for name, size in TRAINABLE_BYTES.items()}
    muon = counts.get("muon_matrices", 0)
    out["optimizer"] = (muon * MUON_STATE_BYTES + (counts["trainable"] - muon) * ADAMW_STATE_BYTES) / shards / GIB
    saved = FROZEN_BYTES - INT8_BYTES  # by each int8 weight (its per-row scales left out: a weight in thousands)
    if "lora_base" in counts:  # a LoRA base: inside the sharded modules, so sharded by FSDP2 too
        base_bytes = counts["lora_base"] * FROZEN_BYTES - counts.get("generator_int8", 0) * saved
        out["frozen_base"] = base_bytes / shards / GIB
    out["frozen_mllm"] = ((counts["mllm_vision"] + counts["mllm_language"]) * FROZEN_BYTES
                          - counts.get("mllm_int8", 0) * saved) / GIB
    out["frozen_vae"] = counts["vae"] * FROZEN_BYTES / GIB
    out["total"] = sum(out.values())
    return out


def format_memory(memory: dict[str, float], gpus: int, parallel: str, counts: dict[str, int],
                  gpu_gib: float, gpu_origin: str) -> str:
    """The table of `memory_per_gpu`, the room it leaves on a GPU of `gpu_gib` (chosen as `gpu_origin` says) and,
    under Muon, how the optimizer state splits."""
    lines = [f"per-GPU model state, {parallel} on {gpus} GPUs (GiB; activations not included):"]
    lines += [f"{name:>15s}  {gib:9.2f}" for name, gib in memory.items()]
    room = gpu_gib - memory["total"]
    lines.append(f"{'left of ' + format(gpu_gib, 'g') + ' GiB':>15s}  {room:9.2f}  for activations"
                 + ("" if room > 0 else " (does not fit: use fsdp or more GPUs)") + f" ({gpu_origin})")
    muon = counts.get("muon_matrices", 0)
    if muon:
        rest = counts["trainable"] - muon
        lines.append(f"optimizer: Muon's one fp32 momentum for the {muon / 1e9:.2f} B parameters of the generator "
                     f"blocks' matrices, AdamW's two fp32 moments for the other {rest / 1e9:.2f} B")
    return "\n".join(lines)


# The stage-1 prompt ("Generate an image that is identical to the reference image:") in InternVL3's and
# Qwen2.5-VL's tokenizer (Qwen2's BPE): its length, for counting without a tokenizer at hand.
PROMPT_TOKENS = 12
# Qwen-Image's image template around the image and its prompt, beyond the system prompt it drops:
# <|vision_end|>, then <|im_end|> \n <|im_start|> assistant \n
QWEN_TEMPLATE_TAIL_TOKENS = 6


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _template_tokens(cfg: Config) -> tuple[int, int]:
    """Tokens the condition's template adds around the prompt and image, and how many of them a raw condition
    drops: none in the paper's layout; Qwen-Image's system prompt (dropped) and its chat tail."""
    if cfg.generator.kind != "qwen_image":
        return 0, 0
    from iomm.conditioning.prompt_format import qwen_image_format

    drop = qwen_image_format().image_drop
    return drop + QWEN_TEMPLATE_TAIL_TOKENS, drop


def _vision_flops(parts: MetaParts, family: Any, resolution: int) -> int:
    """Forward FLOPs of the vision tower on one square image."""
    if parts.mllm_config.model_type == "qwen2_5_vl":
        # Qwen2.5-VL's tower reads its grid's values (window layout, rotary positions), which a meta tensor does
        # not hold: the grid stays on the CPU, the patches and the precomputed positions go to the meta device.
        from transformers.vision_utils import get_vision_position_ids

        height, width = family.target_size(resolution, resolution)
        grid = torch.tensor([[1, height // family.patch, width // family.patch]], device="cpu")
        visual = parts.mllm.model.visual
        patches = torch.empty(int(grid.prod()), 3 * family.temporal * family.patch**2, device="meta",
                              dtype=visual.dtype)
        positions = get_vision_position_ids(grid, family.merge).to("meta")
        return _flops(lambda: visual(patches, grid_thw=grid, position_ids=positions))
    images = torch.rand(1, 3, resolution, resolution, device="meta")
    return _flops(lambda: family.image_features(parts.mllm, images))


def forward_flops(cfg: Config) -> dict[str, dict[str, float]]:
    """Forward FLOPs of one stage-1 sample through each part (`FlopCounterMode` on the meta device), the token
    counts, and the proportions the training step's cost follows (MLLM and VAE against the generator)."""
    parts = meta_parts(cfg)
    family = family_for(parts.mllm_config, {})
    resolution, hidden = cfg.data.resolution, int(parts.mllm_config.get_text_config().hidden_size)
    n_image = family.tokens_for(resolution, resolution)
    template, drop = _template_tokens(cfg)
    n_prompt = PROMPT_TOKENS + template
    n_prefix = n_prompt + n_image
    n_queries = cfg.adapter.num_queries if parts.adapter is not None else 0
    n_condition = n_queries or n_prefix - drop
    side = resolution // parts.factor
    patch = cfg.generator.patch_size if cfg.generator.kind != "unet" else 1
    width = parts.connector.width
    flops = {"mllm_vision": _vision_flops(parts, family, resolution)}
    with torch.device("meta"):
        images, ones = torch.rand(1, 3, resolution, resolution), torch.ones(1, n_prefix, dtype=torch.bool)
        prefix, positions = torch.randn(1, n_prefix, hidden), torch.arange(n_prefix).unsqueeze(0)
        flops |= {
            "mllm_language": _flops(lambda: parts.mllm.model.language_model(
                inputs_embeds=torch.randn(1, n_prefix + n_queries, hidden))),
            "adapter": _flops(lambda: parts.adapter(prefix, ones, positions)) if parts.adapter is not None else 0,
            "connector": _flops(lambda: parts.connector(torch.randn(1, n_condition, hidden),
                                                        torch.ones(1, n_condition, dtype=torch.bool))),
            "vae_encode": _flops(lambda: codec_for(parts.vae).moments(images)) if parts.vae is not None else 0,
            "generator": _flops(lambda: run_generator(
                parts.generator, torch.randn(1, parts.channels, side, side), torch.tensor([500.0]),
                torch.randn(1, n_condition, width), torch.randn(1, width))),
        }
    generator = max(flops["generator"], 1)
    return {
        "flops": {k: float(v) for k, v in flops.items()},
        "tokens": {"prompt": n_prompt, "image": n_image, "queries": n_queries,
                   "latent": (side // patch) ** 2},
        "ratios": {"mllm_to_generator": (flops["mllm_vision"] + flops["mllm_language"]) / generator,
                   "vae_to_generator": flops["vae_encode"] / generator,
                   "condition_to_latent_tokens": n_prefix / (side // patch) ** 2,
                   "queries_to_latent_tokens": n_queries / (side // patch) ** 2},
    }


def format_flops(result: dict[str, dict[str, float]]) -> str:
    lines = ["forward FLOPs of one stage-1 sample:"]
    lines += [f"{name:>15s}  {value / 1e9:12.2f} GFLOP" for name, value in result["flops"].items()]
    lines.append("tokens: " + ", ".join(f"{k} {v:g}" for k, v in result["tokens"].items()))
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)
