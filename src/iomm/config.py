"""Typed configuration: dataclasses read from YAML with `--set a.b=value` overrides, and the checks that need
only their values. The checks against the registry of built-ins and the file system, and `load_config` (reading
and every check), are in iomm.config_checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from iomm.typed_config import ConfigError, apply_overrides, build_dataclass, require

Quantize = Literal["none", "int8"]  # frozen weights: as loaded, or int8 (iomm.quantize)


@dataclass
class MLLMConfig:
    # A local Hugging Face VLM checkpoint, or a built-in model (iomm.registry; "nano": trained on first use)
    path: str = "nano"
    nano_dir: str = ".cache/nano-mllm"
    # A built-in architecture name (see iomm.footprint) used by `iomm describe` when no weights are at hand.
    architecture: str | None = None
    random_init: bool = False
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # The condition cannot attend to the queries after it (causal LLM): run it once without autograd
    # and differentiate the query positions only. Exact; off only to time the naive step.
    prefix_cache: bool = True
    # int8: its linear weights stored in int8 (torchao, iomm.quantize): half the bf16 memory
    quantize: Quantize = "none"


@dataclass
class AdapterConfig:
    kind: Literal["rqa", "free_queries", "raw"] = "rqa"
    num_queries: int = 256
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # Off in the paper. On: a learned embedding of each condition token's position is added to the RQA's keys and
    # values, so that its queries can tell where an image token (or a word) is, not only what it is.
    key_positions: bool = False
    # The RMS the RQA's outputs start at, in units of the LLM's text-embedding RMS (the paper: 1). Image tokens
    # can be far larger (the nano MLLM's: 47x), and small queries are swamped in the LLM's residual stream.
    query_scale: float = 1.0
    # Off in the paper (0). > 0: weight of an auxiliary stage-1 loss: condition token k predicts unmasked image
    # token k (a linear read-out), so the queries keep each image token's content, and so the layout, in order.
    token_loss: float = 0.0
    # Off in the paper (0). > 0: the same read-out on pairs: a caption's condition token k predicts its image's token k.
    caption_token_loss: float = 0.0


@dataclass
class MaskingConfig:
    ratio: float = 0.85
    mode: Literal["zero", "drop"] = "zero"
    min_keep: int = 1
    prompt: str = "Generate an image that is identical to the reference image:"


@dataclass
class ConnectorConfig:
    # identity: no connector, the LLM's states go to the generator as they are (a generator with its own input
    # layers for them, e.g. Qwen-Image's; no learned null condition, so train.cond_dropout must be 0)
    kind: Literal["transformer", "identity"] = "transformer"
    num_layers: int = 2
    num_heads: int = 8
    width: int = 1536
    # Off in the paper. On: a learned embedding of each token's index is added before the connector's blocks.
    token_positions: bool = False


UNET_NORM_GROUPS = 32  # group norm groups in the U-Net generator: its channel counts are multiples of this


@dataclass
class GeneratorConfig:
    # sd3: diffusers SD3Transformer2DModel (the paper's MM-DiT); zimage: ZImageTransformer2DModel (single-stream,
    # IOMM-XL); unet: UNet2DConditionModel (cross-attention at every level); qwen_image: QwenImageTransformer2DModel
    # (`pretrained`: a QwenImagePipeline directory), conditions written as Qwen-Image's pipelines write them
    kind: Literal["sd3", "zimage", "unet", "qwen_image"] = "sd3"
    pretrained: str | None = None
    # int8: the frozen LoRA base's linear weights stored in int8 (torchao; kind=qwen_image with `pretrained`)
    quantize: Quantize = "none"
    attention_head_dim: int = 32  # both kinds
    # kind=sd3 / zimage
    num_layers: int = 4
    num_attention_heads: int = 4
    patch_size: int = 2
    refiner_layers: int = 2  # kind=zimage: the image's and the condition's own layers before the joint ones
    dual_attention_layers: list[int] = field(default_factory=list)
    qk_norm: Literal["rms_norm", "layer_norm", None] = "rms_norm"
    # kind=unet: channels per resolution level (each level after the first halves the latent side)
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1


@dataclass
class CodecConfig:
    kind: Literal["pixel", "vae"] = "pixel"
    # kind=vae: a local diffusers AutoencoderKL, or a built-in model (iomm.registry; "nano": trained on first use)
    path: str | None = None
    nano_dir: str = ".cache/nano-vae"
    architecture: str | None = None
    # Train on posterior samples (diffusers' training scripts) or on the posterior mean. The nano VAE's
    # posterior std is half its latent scale, noise the generator would otherwise have to learn to draw.
    sample_posterior: bool = True


@dataclass
class FlowConfig:
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sample_steps: int = 25
    guidance_scale: float = 3.0
    # Guidance when regenerating an image from its own stage-1 condition (sample grids, `iomm eval reconstruct`,
    # the pipeline's `reconstruct`); None: guidance_scale. Kept apart because the two need not agree: on the nano
    # recipe, 1.5 raised regeneration `exact` from 0.465 to 0.621 while text-to-image gains nothing above 1.
    reconstruct_guidance_scale: float | None = None
    # What the generator outputs: the velocity z - x (SD3 / FLUX, the paper), or the clean sample x, from which
    # the velocity (x_t - x) / t is derived (x-prediction, as in JiT: pixel-space models with few parameters
    # learn the low-dimensional image far faster than the full-dimensional noise). Loss, guidance and sampler
    # all work on the velocity either way.
    prediction: Literal["velocity", "sample"] = "velocity"
    # x-prediction divides by t: t is clamped to at least this in that division
    min_t: float = 0.05
    # Training draws this many (noise, t) per image and condition. The frozen-MLLM pass is shared, so where
    # conditioning is a large part of the step the generator sees more samples per second.
    samples_per_condition: int = 1

    @property
    def reconstruct_guidance(self) -> float:
        return self.guidance_scale if self.reconstruct_guidance_scale is None else self.reconstruct_guidance_scale


@dataclass
class LoRAConfig:
    """LoRA on the generator (peft adapters via diffusers' `add_adapter`): only the adapters train."""

    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0
    # peft `target_modules`: the attention projections, as in diffusers' LoRA training examples
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    # The run or checkpoint whose (EMA) weights the adapters start from, all of them frozen. None: the generator's
    # own (`generator.pretrained`) frozen, the adapter and connector new and trained in full.
    base: str | None = None


FILE_KINDS = ("folder", "jsonl", "webdataset", "hf")  # data.source values read from files; any other is a built-in


@dataclass
class DataConfig:
    # "folder" (image files below `path`), "jsonl", "webdataset" (tar shards: a brace pattern, a directory or a
    # comma-separated list), "hf" (a `save_to_disk` directory or a folder of parquet / arrow files), or a
    # built-in source (iomm.registry; "world": the nano testbed)
    source: str = "world"
    path: str | None = None
    resolution: int = 32
    world_max_objects: int = 4
    num_workers: int = 0
    # Stage 2: text-image pairs: KIND:LOCATION (KIND jsonl, webdataset or hf), a JSONL path, or "NAME:N".
    pairs: str | None = None
    # Captions: None reads a shard's `txt` member and an HF dataset's `text` column; a name reads that field of
    # a shard's `json` member, or that column.
    caption_field: str | None = None
    image_column: str = "image"  # HF datasets: the column holding the images
    # HF parquet folders: read as a `datasets` stream (shuffle buffer of `stream_buffer` rows) instead of
    # converting them into the Arrow cache first; nothing is held out for the sample grids.
    streaming: bool = False
    stream_buffer: int = 1000
    # A latent cache written by `iomm data cache` for this config: training reads the frozen encoders' outputs
    # from it (the VAE's posterior, the MLLM's image tokens) instead of encoding every image at every step.
    latents: str | None = None
    max_bad_fraction: float = 0.01
    # Files and shards: this many samples (spread over the list) never train; the sample grids regenerate them.
    holdout: int = 8
    # Built-in pairs (NAME:N): this many more, never drawn for training; stage 2 logs their loss (`heldout_loss`).
    # Pair files and datasets have no held-out split: nothing is set aside from them and no such loss is logged.
    holdout_pairs: int = 64


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global, over all ranks: each of N ranks takes batch_size / N per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # Warmup-stable-decay: the LR falls linearly to 0 over this final fraction of `steps` (0: constant).
    decay_fraction: float = 0.0
    ema_decay: float = 0.999
    # auto: bf16 autocast where the hardware runs bf16 natively, else fp32
    mixed_precision: Literal["fp32", "bf16", "auto"] = "fp32"
    cond_dropout: float = 0.1
    # Fraction of image-only samples in each batch (stage 2); 1.0 is pure image-only pre-training.
    mix_ratio: float = 1.0
    seed: int = 0
    threads: int = 0
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    keep_last: int = 2
    keep_every: int = 0
    max_nonfinite_in_row: int = 5
    # ddp: a replica per rank; fsdp: FSDP2 shards of the trainable weights, gradients, optimizer state and EMA;
    # hsdp: FSDP2 shards within each group of `shard_size` ranks (a node), replicated across the groups
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_size: int | None = None  # hsdp: ranks per shard group (null: a node's, torchrun's LOCAL_WORLD_SIZE)
    activation_checkpointing: bool = False  # recompute each generator block in the backward pass
    compile: bool = False  # torch.compile each generator block (compiled on the first steps)
    fused_optimizer: bool = False  # AdamW's fused kernel (CPU and CUDA) instead of its per-parameter loop
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: the generator blocks' matrices (iomm.training.optimizers)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class FinetuneConfig:
    """What `iomm finetune` changes in `train` (stage 2: mixed fine-tuning)."""

    steps: int = 1000
    mix_ratio: float = 0.5
    lr: float | None = None


@dataclass
class Config:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> Config:
    """A YAML config (or the defaults) with `--set` overrides applied: typed, its values checked (`parse_config`)."""
    source = config_source(path)
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(source, "<file>", "an existing YAML file", str(path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(source, "<file>", "valid YAML", str(err).splitlines()[0]) from None
    data = apply_overrides(data, list(overrides or []))
    source = config_source(path, overrides)  # the bad value may come from the command line rather than the file
    return parse_config(data, source)


def parse_config(data: dict[str, Any], source: str) -> Config:
    """A config from plain data (a YAML file's, or one saved inside a model directory): types and values checked."""
    config = build_dataclass(Config, data, source)
    check_values(config, source)
    return config


def config_source(path: str | Path | None, overrides: Sequence[str] | None = None) -> str:
    """How errors name a config: its file (or "<defaults>") and the `--set` overrides applied to it."""
    source = str(path) if path else "<defaults>"
    return source + " with --set " + " ".join(overrides) if overrides else source


def check_values(cfg: Config, source: str = "<config>") -> None:
    """Range and consistency checks that need more than the types, and nothing but the values."""
    m, t, d = cfg.masking, cfg.train, cfg.data
    require(0.0 <= m.ratio < 1.0, source, "masking.ratio", "a value in [0, 1)", m.ratio)
    require(m.min_keep >= 0, source, "masking.min_keep", ">= 0", m.min_keep)
    require(0.0 <= t.mix_ratio <= 1.0, source, "train.mix_ratio", "a value in [0, 1]", t.mix_ratio)
    require(0.0 <= cfg.finetune.mix_ratio <= 1.0, source, "finetune.mix_ratio", "a value in [0, 1]",
           cfg.finetune.mix_ratio)
    require(cfg.finetune.steps >= 1, source, "finetune.steps", ">= 1", cfg.finetune.steps)
    require(0.0 <= t.cond_dropout < 1.0, source, "train.cond_dropout", "a value in [0, 1)", t.cond_dropout)
    require(0.0 < cfg.flow.min_t < 1.0, source, "flow.min_t", "a value in (0, 1)", cfg.flow.min_t)
    require(0.0 <= t.ema_decay < 1.0, source, "train.ema_decay", "a value in [0, 1)", t.ema_decay)
    require(len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas), source, "train.betas", "two values in [0, 1)",
           t.betas)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_nonfinite_in_row"):
        require(getattr(t, name) >= 1, source, f"train.{name}", ">= 1", getattr(t, name))
    for name in ("warmup_steps", "sample_every", "keep_last", "keep_every", "threads"):
        require(getattr(t, name) >= 0, source, f"train.{name}", ">= 0", getattr(t, name))
    require(t.shard_size is None or t.shard_size >= 1, source, "train.shard_size", "null or >= 1", t.shard_size)
    require(0.0 <= t.decay_fraction <= 1.0, source, "train.decay_fraction", "a value in [0, 1]", t.decay_fraction)
    if t.lora.enabled:
        require(t.lora.rank >= 1, source, "train.lora.rank", ">= 1", t.lora.rank)
        require(t.lora.alpha > 0, source, "train.lora.alpha", "> 0", t.lora.alpha)
        require(len(t.lora.target_modules) >= 1, source, "train.lora.target_modules", "at least one layer name",
               t.lora.target_modules)
    require(math.isfinite(t.lr) and t.lr > 0, source, "train.lr", "a finite number > 0", t.lr)
    require(math.isfinite(t.weight_decay) and t.weight_decay >= 0, source, "train.weight_decay", "a finite number >= 0",
           t.weight_decay)
    require(cfg.flow.sample_steps >= 1, source, "flow.sample_steps", ">= 1", cfg.flow.sample_steps)
    require(math.isfinite(cfg.flow.guidance_scale) and cfg.flow.guidance_scale >= 0, source, "flow.guidance_scale",
           "a finite number >= 0", cfg.flow.guidance_scale)
    regeneration = cfg.flow.reconstruct_guidance_scale
    require(regeneration is None or math.isfinite(regeneration) and regeneration >= 0, source,
           "flow.reconstruct_guidance_scale", "null or a finite number >= 0", regeneration)
    require(cfg.flow.samples_per_condition >= 1, source, "flow.samples_per_condition", ">= 1",
           cfg.flow.samples_per_condition)
    require(math.isfinite(cfg.flow.logit_std) and cfg.flow.logit_std > 0, source, "flow.logit_std",
           "a finite number > 0", cfg.flow.logit_std)
    for section, name in (("adapter", "num_heads"), ("connector", "num_layers"), ("connector", "num_heads"),
                          ("generator", "num_layers"), ("generator", "attention_head_dim"),
                          ("generator", "num_attention_heads")):
        value = getattr(getattr(cfg, section), name)
        require(value >= 1, source, f"{section}.{name}", ">= 1", value)
    require(t.grad_clip >= 0, source, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    require(cfg.adapter.num_queries >= 1, source, "adapter.num_queries", ">= 1", cfg.adapter.num_queries)
    require(cfg.adapter.query_scale > 0, source, "adapter.query_scale", "> 0", cfg.adapter.query_scale)
    for name in ("token_loss", "caption_token_loss"):
        weight = getattr(cfg.adapter, name)
        require(math.isfinite(weight) and weight >= 0, source, f"adapter.{name}", "a finite number >= 0", weight)
        require(weight == 0 or cfg.adapter.kind != "raw", source, f"adapter.{name}",
               "0 with adapter.kind=raw (the loss reads the query tokens)", weight)
    require(cfg.connector.width % cfg.connector.num_heads == 0, source, "connector.width",
           f"a multiple of connector.num_heads={cfg.connector.num_heads}", cfg.connector.width)
    require(t.cond_dropout == 0 or cfg.connector.kind != "identity", source, "train.cond_dropout",
            "0 with connector.kind=identity (no learned null condition to drop to)", t.cond_dropout)
    _check_generator(cfg.generator, source)
    _check_quantize(cfg, source)
    _check_data(d, t.mix_ratio, source)


def _check_data(d: DataConfig, mix_ratio: float, source: str) -> None:
    require(d.num_workers >= 0, source, "data.num_workers", ">= 0", d.num_workers)
    require(d.holdout >= 0, source, "data.holdout", ">= 0", d.holdout)
    require(d.holdout_pairs >= 0, source, "data.holdout_pairs", ">= 0", d.holdout_pairs)
    require(0.0 <= d.max_bad_fraction <= 1.0, source, "data.max_bad_fraction", "a value in [0, 1]", d.max_bad_fraction)
    require(d.resolution >= 8, source, "data.resolution", ">= 8", d.resolution)
    require(d.source not in FILE_KINDS or bool(d.path), source, "data.path", f"a location for data.source={d.source}",
           d.path)
    require(mix_ratio == 1.0 or d.pairs is not None, source, "data.pairs",
           "a pair source (KIND:LOCATION, a JSONL path or NAME:N) when train.mix_ratio < 1", d.pairs)
    uses_hf = d.source == "hf" or (d.pairs or "").startswith("hf:")
    require(not d.streaming or uses_hf, source, "data.streaming", "false unless data.source or data.pairs is hf",
           d.streaming)
    require(d.stream_buffer >= 1, source, "data.stream_buffer", ">= 1", d.stream_buffer)


def _check_quantize(cfg: Config, source: str) -> None:
    """int8 weights are frozen: only a LoRA base loaded from a pipeline (int8 weights cannot train in full, and an
    iomm checkpoint's base would be loaded into them after quantization)."""
    g, lora = cfg.generator, cfg.train.lora
    if g.quantize == "none":
        return
    field = "generator.quantize"
    require(lora.enabled, source, field, "none without train.lora.enabled (int8 weights cannot be fine-tuned in "
            "full)", g.quantize)
    require(lora.base is None, source, field, "none with train.lora.base (the base is an iomm checkpoint)", g.quantize)
    require(g.kind == "qwen_image" and g.pretrained is not None, source, field,
            "none unless generator.kind=qwen_image with generator.pretrained", f"{g.quantize} (kind={g.kind}, "
            f"pretrained={g.pretrained})")


PATCH_KINDS = ("sd3", "zimage", "qwen_image")  # transformers that cut the latent grid into patches


def _check_generator(g: GeneratorConfig, source: str) -> None:
    """What the generator's own fields must be; the latent grid it must divide is checked in iomm.config_checks."""
    if g.kind == "zimage":
        require(g.attention_head_dim % 16 == 0, source, "generator.attention_head_dim",
               "a multiple of 16 for kind=zimage (its three rotary axes)", g.attention_head_dim)
    if g.kind in PATCH_KINDS:
        require(g.patch_size >= 1, source, "generator.patch_size", ">= 1", g.patch_size)
        require(g.patch_size == 2 or g.kind != "qwen_image", source, "generator.patch_size",
                "2 for kind=qwen_image (QwenImagePipeline packs 2x2 latent patches)", g.patch_size)
    else:
        channels = g.block_out_channels
        require(len(channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in channels), source,
               "generator.block_out_channels", "a non-empty list of positive integers", channels)
        for c in channels:
            require(c % UNET_NORM_GROUPS == 0 and c % g.attention_head_dim == 0, source,
                   "generator.block_out_channels", f"multiples of {UNET_NORM_GROUPS} and of "
                   f"generator.attention_head_dim={g.attention_head_dim}", channels)
        require(g.layers_per_block >= 1, source, "generator.layers_per_block", ">= 1", g.layers_per_block)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
