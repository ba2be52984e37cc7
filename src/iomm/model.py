"""The IOMM model: frozen MLLM -> Residual Query Adapter -> frozen LLM -> connector -> MM-DiT generator.

One file holds how the pieces meet (MetaQuery style); each piece lives in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn
from torch.nn import functional as F

from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import IdentityConnector, build_connector
from iomm.conditioning.masking import random_keep_mask, zero_masked
from iomm.conditioning.mllm import FrozenMLLM
from iomm.conditioning.prompt_format import NEGATIVE_PROMPT, prompt_format
from iomm.conditioning.sequence import Segment, keep_first, pack_left, positions_after
from iomm.config import Config
from iomm.data.encoded import EncodedImages
from iomm.generator.codec import PixelCodec, load_codec
from iomm.generator.flow import TIMESTEP_SCALE, flow_matching_loss, output_to_velocity
from iomm.generator.network import build_generator, generator_scheduler, run_generator
from iomm.per_sample_rng import Generators, rand, repeat_rows, select
from iomm.profiling import mark_gradient, phase
from iomm.registry import BuiltinModel, builtin_mllm, builtin_vae

TRAINABLE = ("adapter", "connector", "generator", "token_head")
Images = torch.Tensor | EncodedImages  # (B, 3, R, R) pixels in [0, 1], or the frozen encoders' outputs


@dataclass
class Condition:
    tokens: torch.Tensor  # (B, L, W) generator condition tokens
    pooled: torch.Tensor  # (B, W)
    # The batch rows conditioned on their own masked image, and those images' unmasked tokens (B_img, N, D):
    # the targets of `adapter.token_loss`; likewise the caption rows and their images' tokens, for
    # `adapter.caption_token_loss`.
    image_rows: list[int] | None = None
    image_tokens: torch.Tensor | None = None
    caption_rows: list[int] | None = None
    caption_tokens: torch.Tensor | None = None
    # (B, L) bool: the valid tokens, where rows differ in length (raw conditions); None: every token is valid
    mask: torch.Tensor | None = None
    # (B, N) bool: the image tokens a masked self-condition kept (`condition_masked_images`), as MAE returns its mask
    keep: torch.Tensor | None = None


def ensure_builtin(builtin: BuiltinModel, cfg: Config) -> str:
    """A built-in model's directory, built there first if need be; building one (training it) leaves the caller's
    random state as it was, so that a run's initial weights do not depend on whether the cache was warm. Under
    torch.distributed rank 0 builds it while the other ranks wait, then they load what it saved: two ranks writing
    one directory could leave it half one build, half the other."""
    distributed = dist.is_available() and dist.is_initialized()
    first = not distributed or dist.get_rank() == 0
    if not first:
        dist.barrier()
    with torch.random.fork_rng():
        path = str(builtin.ensure(cfg))
    if first and distributed:
        dist.barrier()
    return path


def load_mllm(cfg: Config) -> FrozenMLLM:
    builtin = builtin_mllm(cfg.mllm.path)
    path = ensure_builtin(builtin, cfg) if builtin is not None else cfg.mllm.path
    mllm = FrozenMLLM.from_pretrained(path, trust_remote_code=cfg.mllm.trust_remote_code, quantize=cfg.mllm.quantize)
    if cfg.mllm.gradient_checkpointing:
        mllm.enable_gradient_checkpointing()
    mllm.prefix_cache = cfg.mllm.prefix_cache
    return mllm


def build_codec(cfg: Config) -> nn.Module:
    if cfg.codec.kind == "pixel":
        return PixelCodec()
    builtin = builtin_vae(cfg.codec.path)
    path = ensure_builtin(builtin, cfg) if builtin is not None else cfg.codec.path
    return load_codec(path, sample_posterior=cfg.codec.sample_posterior)


class IOMM(nn.Module):
    def __init__(self, cfg: Config, mllm: FrozenMLLM, codec: nn.Module, generator: nn.Module | None = None,
                 scheduler: FlowMatchEulerDiscreteScheduler | None = None):
        """`generator` and `scheduler`: a pipeline's own (default: built, or loaded, from the config)."""
        super().__init__()
        self.cfg = cfg
        self.mllm = mllm
        self.codec = codec
        self.format = prompt_format(cfg)
        self.adapter = build_adapter(cfg.adapter, mllm.hidden_size, mllm.embed_scale)
        self.connector = build_connector(cfg.connector, mllm.hidden_size)
        self.generator = generator if generator is not None else build_generator(
            cfg.generator, in_channels=codec.channels, sample_size=cfg.data.resolution // codec.factor,
            cond_width=self.connector.width)
        self.scheduler = scheduler if generator is not None else generator_scheduler(cfg.generator)  # for sampling
        self.token_head = self._build_token_head(cfg, mllm, self.connector.width)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _build_token_head(cfg: Config, mllm: FrozenMLLM, width: int) -> nn.Linear | None:
        """The read-out of the token losses: condition token k -> image token k (training only)."""
        if cfg.adapter.token_loss == 0 and cfg.adapter.caption_token_loss == 0:
            return None
        n_image = mllm.num_image_tokens(cfg.data.resolution)
        if cfg.adapter.num_queries < n_image:
            raise ValueError(f"adapter.token_loss / caption_token_loss: expected adapter.num_queries >= the "
                             f"{n_image} image tokens of one {cfg.data.resolution}-px image, "
                             f"got {cfg.adapter.num_queries}")
        return nn.Linear(width, mllm.hidden_size)

    @classmethod
    def from_config(cls, cfg: Config) -> "IOMM":
        return cls(cfg, load_mllm(cfg), build_codec(cfg))

    def trainable(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in TRAINABLE if getattr(self, name) is not None}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the optimizer and EMA cover, by `<module>.<name>`."""
        return {f"{name}.{n}": p for name, module in self.trainable().items()
                for n, p in module.named_parameters() if p.requires_grad}

    # ---- conditions -------------------------------------------------------------------------
    def text_segment(self, texts: list[str]) -> Segment:
        """Texts as written into the condition, embedded (the fixed stage-1 prompt: once)."""
        if len(set(texts)) == 1:
            key = texts[0]
            if key not in self._prompt_cache:
                self._prompt_cache[key] = self.mllm.embed_text([key])
            embeds, mask = self._prompt_cache[key]
            return Segment(embeds.expand(len(texts), -1, -1), mask.expand(len(texts), -1))
        embeds, mask = self.mllm.embed_text(texts)
        return Segment(embeds, mask)

    def keep_mask(self, tokens: torch.Tensor, generator: Generators, ratio: float) -> torch.Tensor | None:
        """Bool (B, N): the image tokens (B, N, D) a condition masked at `ratio` keeps; None at ratio 0 (all)."""
        if ratio == 0.0:
            return None
        return random_keep_mask(tokens.shape[0], tokens.shape[1], ratio, min_keep=self.cfg.masking.min_keep,
                                generator=generator, device=tokens.device)

    def image_segment(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> Segment:
        """The segment of image tokens (B, N, D) from `mllm.embed_images`, masked where `keep` is False."""
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        grid = self.mllm.image_grid(self.cfg.data.resolution)
        if keep is None:
            return Segment(tokens, valid, grid=grid)
        if self.cfg.masking.mode == "zero":
            return Segment(zero_masked(tokens, keep), valid, grid=grid)
        return Segment(tokens, keep, counts_position=valid, grid=grid)

    def _prompted_image(self, prompts: list[str], tokens: torch.Tensor, keep: torch.Tensor | None) -> list[Segment]:
        """The segments of images (their tokens masked where `keep` is False) written into their prompts."""
        before, after = zip(*(self.format.image_parts(p) for p in prompts))
        segments = [self.text_segment(list(before))] if any(before) else []
        segments.append(self.image_segment(tokens, keep))
        return segments + ([self.text_segment(list(after))] if any(after) else [])

    def encode(self, segments: list[Segment], drop: int = 0) -> Condition:
        """Condition sequence c -> concat(c, adapter(c)) -> frozen LLM -> connector. Without an adapter the LLM's
        output of c itself is the condition, its first `drop` tokens left out, valid tokens first."""
        packed = pack_left(segments)
        if self.adapter is None:
            hidden = self.mllm.forward_embeds(packed.embeds, packed.mask, packed.llm_positions)
            hidden, mask = keep_first(hidden, packed.mask, drop)
            tokens, pooled = self.connector(hidden, mask)
            return Condition(tokens * mask.unsqueeze(-1).to(tokens.dtype), pooled, mask=mask)
        queries = self.adapter(packed.embeds, packed.mask, packed.positions)
        hidden = self.mllm.forward_suffix(packed.embeds, packed.mask, packed.llm_positions,
                                          queries, positions_after(packed, queries.shape[1]))
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return Condition(*self.connector(hidden, mask))

    def image_tokens(self, images: Images) -> torch.Tensor:
        """The frozen MLLM's image tokens v(x) (B, N, D), computed, or read from a latent cache."""
        if isinstance(images, EncodedImages):
            return images.tokens.to(self.mllm.device, self.mllm.dtype)
        return self.mllm.embed_images(images)

    def latents(self, images: Images, generator: Generators) -> torch.Tensor:
        """The codec's latents of the images, encoded, or drawn from a latent cache's posterior moments."""
        if isinstance(images, EncodedImages):
            return self.codec.latents(images.moments, generator)
        return self.codec.encode(images, generator)

    def condition_masked_images(self, images: Images, generator: Generators = None,
                                ratio: float | None = None) -> Condition:
        """Stage 1: c = concat(c_aux, mask(v(x))), masked at `ratio` (default: `masking.ratio`)."""
        tokens = self.image_tokens(images)
        ratio = self.cfg.masking.ratio if ratio is None else ratio
        prompts = [self.cfg.masking.prompt] * len(images)
        keep = self.keep_mask(tokens, generator, ratio)
        cond = self.encode(self._prompted_image(prompts, tokens, keep), self.format.image_drop)
        cond.image_rows, cond.image_tokens = list(range(len(images))), tokens
        cond.keep = keep if keep is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return cond

    def condition_texts(self, texts: list[str]) -> Condition:
        return self.encode([self.text_segment([self.format.text.format(t) for t in texts])], self.format.text_drop)

    def condition_edit(self, images: torch.Tensor, instructions: list[str]) -> Condition:
        """Zero-shot editing: the instruction and the unmasked reference image, as in stage 1's layout."""
        tokens = self.mllm.embed_images(images)
        return self.encode(self._prompted_image(instructions, tokens, None), self.format.image_drop)

    def null_condition(self, batch: int, length: int) -> Condition:
        """The unconditional input of guidance: the connector's learned null tokens; without a connector (a
        generator that reads the LLM directly, as Qwen-Image does) the condition of the empty prompt."""
        if isinstance(self.connector, IdentityConnector):
            return self.condition_texts([NEGATIVE_PROMPT] * batch)
        return Condition(*self.connector.null_condition(batch, length))

    def condition_batch(self, images: Images, captions: list[str | None], generator: Generators,
                        dropout: float) -> Condition:
        """Mixed batch: image-only samples (caption None) are masked self-conditions, the rest use captions.

        Samples hit by condition dropout get the null condition and skip the LLM.
        """
        b = len(images)
        dropped = (rand((b,), generator) < dropout).tolist()
        image_idx = [i for i in range(b) if captions[i] is None and not dropped[i]]
        text_idx = [i for i in range(b) if captions[i] is not None and not dropped[i]]
        parts: list[tuple[list[int], Condition]] = []
        image_tokens = caption_tokens = None
        if image_idx:
            image_cond = self.condition_masked_images(images[image_idx], select(generator, image_idx))
            parts.append((image_idx, image_cond))
            image_tokens = image_cond.image_tokens
        if text_idx:
            parts.append((text_idx, self.condition_texts([captions[i] for i in text_idx])))
            if self.cfg.adapter.caption_token_loss > 0:
                caption_tokens = self.image_tokens(images[text_idx])
        length = max([c.tokens.shape[1] for _, c in parts], default=self._null_length())
        null_tokens, null_pooled = self.connector.null_condition(b, length)
        # on the model's device: IdentityConnector's filler has no parameter to place it
        tokens, pooled = (x.to(self.mllm.device, images.dtype).clone() for x in (null_tokens, null_pooled))
        mask = torch.ones(b, length, dtype=torch.bool, device=tokens.device)
        for idx, cond in parts:
            n = cond.tokens.shape[1]
            tokens[idx, :n] = cond.tokens.to(tokens.dtype)
            pooled[idx] = cond.pooled.to(pooled.dtype)
            mask[idx, n:] = False
            if cond.mask is not None:
                mask[idx, :n] = cond.mask
        return Condition(tokens, pooled, image_idx, image_tokens, text_idx, caption_tokens,
                         mask=None if bool(mask.all()) else mask)

    def _null_length(self) -> int:
        return self.cfg.adapter.num_queries if self.adapter is not None else 1

    # ---- generator --------------------------------------------------------------------------
    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        out = run_generator(self.generator, latents, t * TIMESTEP_SCALE, cond.tokens, cond.pooled, cond.mask)
        return output_to_velocity(self.cfg.flow, latents, out, t)

    def forward(self, images: Images, captions: list[str | None], generator: Generators,
                cond_dropout: float | None = None) -> torch.Tensor:
        return self.loss(images, captions, generator, cond_dropout)

    def loss(self, images: Images, captions: list[str | None], generator: Generators,
             cond_dropout: float | None = None) -> torch.Tensor:
        """Flow-matching loss of one (mixed) batch; all randomness comes from `generator`. `cond_dropout`:
        default `train.cond_dropout` (0 scores every sample under its own condition)."""
        dropout = self.cfg.train.cond_dropout if cond_dropout is None else cond_dropout
        with phase("conditioning_forward"):
            cond = self.condition_batch(images, captions, generator, dropout)
        with phase("codec_encode"):
            latents = self.latents(images, generator)
        mark_gradient(cond.tokens, cond.pooled)
        with phase("generator_forward"):
            loss = self.flow_loss(latents, cond, generator)
        adapter = self.cfg.adapter
        if adapter.token_loss > 0 and cond.image_rows:
            loss = loss + adapter.token_loss * self.token_loss(cond.tokens[cond.image_rows], cond.image_tokens)
        if adapter.caption_token_loss > 0 and cond.caption_tokens is not None:
            loss = loss + adapter.caption_token_loss * self.token_loss(cond.tokens[cond.caption_rows],
                                                                       cond.caption_tokens)
        return loss

    def token_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MSE of the read-out of condition tokens 0..N-1 against N image tokens (B, N, D), layer-normed
        (scale-free: image tokens can be far larger than text embeddings)."""
        predicted = self.token_head(tokens[:, : targets.shape[1]])
        return F.mse_loss(predicted, F.layer_norm(targets.to(predicted.dtype), targets.shape[-1:]))

    def flow_loss(self, latents: torch.Tensor, cond: Condition, generator: Generators) -> torch.Tensor:
        """Flow-matching loss of latents under their conditions, `flow.samples_per_condition` draws each."""
        repeats = self.cfg.flow.samples_per_condition
        if repeats > 1:  # one conditioning pass, several (noise, t) draws: more generator samples per second
            latents = latents.repeat_interleave(repeats, dim=0)
            mask = None if cond.mask is None else cond.mask.repeat_interleave(repeats, dim=0)
            cond = Condition(*(x.repeat_interleave(repeats, dim=0) for x in (cond.tokens, cond.pooled)), mask=mask)
            generator = repeat_rows(generator, repeats)
        return flow_matching_loss(lambda x, t: self.velocity(x, t, cond), latents, self.cfg.flow, generator)
