"""The frozen multimodal LLM `g` of IOMM: a thin wrapper over Hugging Face VLMs.

Supported families (HF-native classes): InternVL (`InternVLForConditionalGeneration`, the paper's
InternVL3-2B in its `-hf` form) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Image preprocessing is done here in torch (resize, rescale, normalise, patchify): the HF
processors of these families need torchvision. The settings are read from the checkpoint's
`preprocessor_config.json` with the keys the HF image processors use (`GotOcr2ImageProcessor` for
InternVL: `size`, `image_mean`, `image_std`; `Qwen2VLImageProcessor` for Qwen2.5-VL: `patch_size`,
`merge_size`, `temporal_patch_size`, `min_pixels`/`max_pixels` or `size.{shortest,longest}_edge`).
InternVL's dynamic tiling (`crop_to_patches`) is not used: every image is one tile.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from iomm.conditioning.mllm_families import check_supported, family_for
from iomm.model_files import component_dir
from iomm.quantize import Quantize, transformers_loading

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PREPROCESSOR_FILE = "preprocessor_config.json"


# --------------------------------------------------------------------------------------------
# checkpoint directory checks
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_checkpoint_dir(path: Path, *, trust_remote_code: bool, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Fail early with a clear message if `path` is not a loadable VLM checkpoint; return config.json."""
    if not path.is_dir():
        raise FileNotFoundError(f"MLLM checkpoint directory {path} does not exist")
    tokenizer_dir = path if tokenizer_dir is None else tokenizer_dir
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(WEIGHT_FILES) + ")")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer ({' or '.join(TOKENIZER_FILES)}" + (f" in {tokenizer_dir})" if tokenizer_dir != path
                                                                       else ")"))
    if missing:
        raise FileNotFoundError(f"MLLM checkpoint {path} is missing: " + "; ".join(missing))
    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if "auto_map" in config and model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise ValueError(
            f"MLLM checkpoint {path} (model_type={model_type!r}) needs its own Python code (config.json has "
            "`auto_map`), which runs arbitrary code from that directory. Inspect it, then pass "
            "trust_remote_code=True (CLI: --trust-remote-code) to opt in, or use the HF-native "
            "checkpoint of the same model (e.g. OpenGVLab/InternVL3-2B-hf)."
        )
    return config


def read_preprocessing(path: Path) -> dict[str, Any]:
    """Image-processor settings of a checkpoint dir ({} if it has none: family defaults apply)."""
    if (path / PREPROCESSOR_FILE).is_file():
        return _read_json(path / PREPROCESSOR_FILE)
    if (path / "processor_config.json").is_file():
        return dict(_read_json(path / "processor_config.json").get("image_processor", {}))
    return {}


# What the families read from the image-processor settings (InternVL: mean, std, size; Qwen2.5-VL: mean, std,
# patch, merge and temporal patch sizes, min/max pixels), as the attribute names of their objects.
FAMILY_SETTINGS = ("mean", "std", "size", "patch", "merge", "temporal", "min_pixels", "max_pixels")


def _family_settings(family: Any) -> str:
    return ", ".join(f"{name}={getattr(family, name)}" for name in FAMILY_SETTINGS if hasattr(family, name))


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------


class FrozenMLLM(nn.Module):
    """A frozen VLM: text/image embedding, LLM forward on embeddings, and question answering.

    Every parameter has `requires_grad=False` and the module is in eval mode whatever `train()` is
    asked; gradients still flow through `forward_embeds` into its `inputs_embeds`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        preprocessing: dict[str, Any] | None = None,
        *,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessing = dict(preprocessing or {})
        self.family = family_for(model.config, self.preprocessing)
        self.model.requires_grad_(False)
        self._embed_scale: float | None = None
        self.gradient_checkpointing = False
        self.prefix_cache = True
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.train(False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        quantize: Quantize = "none",
    ) -> "FrozenMLLM":
        """Load model, tokenizer and image preprocessing settings from a local directory, offline: a VLM
        checkpoint, or a diffusers pipeline directory (its `text_encoder/`, `tokenizer/` and `processor/`).
        `quantize="int8"`: the linear weights stored in int8 (`iomm.quantize`)."""
        root = Path(path)
        path, tokenizer_dir = component_dir(root, "text_encoder"), component_dir(root, "tokenizer")
        raw = check_checkpoint_dir(path, trust_remote_code=trust_remote_code, tokenizer_dir=tokenizer_dir)
        if "auto_map" not in raw:  # unsupported family: fail before loading anything (custom code: below)
            check_supported(raw.get("model_type"), f"MLLM checkpoint {path}")
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(path, **kwargs)
        check_supported(config.model_type, f"MLLM checkpoint {path}")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs,
                                                            **transformers_loading(quantize))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **kwargs)
        preprocessing = read_preprocessing(component_dir(root, "processor"))
        mllm = cls(model, tokenizer, preprocessing, gradient_checkpointing=gradient_checkpointing)
        if not preprocessing:
            warnings.warn(f"MLLM checkpoint {path} has no image-processor settings ({PREPROCESSOR_FILE} or "
                          f"processor_config.json): images are preprocessed with the {config.model_type} defaults "
                          f"{_family_settings(mllm.family)}", UserWarning, stacklevel=2)
        return mllm

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        tokenizer: Any = None,
        preprocessing: dict[str, Any] | None = None,
    ) -> "FrozenMLLM":
        """Randomly initialised model of `config` (works under `with torch.device("meta"):`)."""
        model = AutoModelForImageTextToText.from_config(config)
        return cls(model, tokenizer, preprocessing)

    # ---------------------------------------------------------------- frozen behaviour

    def train(self, mode: bool = True) -> "FrozenMLLM":
        """Always eval: the MLLM is frozen (dropout off); `mode` is ignored."""
        super().train(False)
        self._set_checkpointing_flags()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's layer activations in backward (non-reentrant, so gradients reach
        `inputs_embeds` though no parameter requires grad)."""
        self.language_model.activation_checkpointing_enable({"use_reentrant": False})
        self.gradient_checkpointing = True
        self._set_checkpointing_flags()

    def _set_checkpointing_flags(self) -> None:
        # HF checkpoints a layer only when the layer's own `training` flag is set; set it on the
        # decoder layers alone (not their children), so dropout stays off.
        if not getattr(self, "gradient_checkpointing", False):
            return
        for module in self.language_model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.training = True

    # ---------------------------------------------------------------- properties

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def embed_scale(self) -> float:
        """RMS of the LLM's input token-embedding rows (rows of the tokenizer's tokens only)."""
        if self._embed_scale is None:
            weight = self.model.get_input_embeddings().weight
            if weight.is_meta:
                raise RuntimeError("embed_scale is undefined for a model on the meta device")
            rows = weight[: len(self.tokenizer)] if self.tokenizer is not None else weight
            self._embed_scale = float(rows.detach().float().pow(2).mean().sqrt())
        return self._embed_scale

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def num_image_tokens(self, resolution: int) -> int:
        """LLM tokens one square `resolution`-pixel image becomes (InternVL: fixed, the image is resized)."""
        return self.family.tokens_for(resolution, resolution)

    def image_grid(self, resolution: int) -> tuple[int, int] | None:
        """(rows, columns) of one square image's LLM tokens where the LLM places them on a 3-D rotary grid
        (Qwen2.5-VL), else None (1-D positions: InternVL)."""
        return self.family.grid_for(resolution, resolution)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("this FrozenMLLM has no tokenizer (built from a config without one)")
        return self.tokenizer

    # ---------------------------------------------------------------- embeddings

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token embeddings (B, L, D) and a bool mask (B, L) of `texts`, right padded."""
        tokenizer = self._require_tokenizer()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        return self.model.get_input_embeddings()(ids), batch["attention_mask"].to(self.device).bool()

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> patch embeddings in the LLM input space (B, N_img, D)."""
        return self.family.image_features(self.model, images.to(self.device))

    # ---------------------------------------------------------------- LLM forward

    def forward_embeds(
        self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states (B, L, D) of the language model on `inputs_embeds`.

        Gradients flow to `inputs_embeds`. Default positions count the unmasked tokens
        (cumsum(mask) - 1, clamped at 0), so left padding works. Qwen2.5-VL's 3-row (mrope) positions
        are the 1-D positions repeated unless `position_ids` is given with 3 rows.
        """
        mask = attention_mask.long()
        if position_ids is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=self.family.position_ids(position_ids),
            use_cache=False,
            return_dict=True,
        )
        return out.last_hidden_state

    forward = forward_embeds

    def forward_suffix(
        self, prefix_embeds: Tensor, prefix_mask: Tensor, prefix_positions: Tensor,
        suffix_embeds: Tensor, suffix_positions: Tensor,
    ) -> Tensor:
        """Last hidden states (B, S, D) of `suffix_embeds` appended after a left-padded prefix.

        Equal to `forward_embeds` on the concatenation, cut to the suffix. Causal attention means the
        prefix never sees the suffix, so its keys and values are computed once without autograd and
        the backward pass runs over the suffix positions alone (no gradient reaches the prefix).
        HF decoder layers drop the KV cache under gradient checkpointing: then (or with `prefix_cache`
        off) the plain forward over the concatenation runs.
        """
        suffix_mask = torch.ones(suffix_embeds.shape[:2], dtype=prefix_mask.dtype, device=prefix_mask.device)
        if not self.prefix_cache or self.gradient_checkpointing or prefix_embeds.shape[1] == 0:
            embeds = torch.cat([prefix_embeds.detach(), suffix_embeds.to(prefix_embeds.dtype)], 1)
            mask = torch.cat([prefix_mask, suffix_mask], 1)
            positions = torch.cat([prefix_positions, suffix_positions], -1)
            return self.forward_embeds(embeds, mask, positions)[:, prefix_embeds.shape[1]:]
        with torch.no_grad():
            cache = self.language_model(
                inputs_embeds=prefix_embeds,
                attention_mask=prefix_mask.long(),
                position_ids=self.family.position_ids(prefix_positions),
                use_cache=True,
                return_dict=True,
            ).past_key_values
        out = self.language_model(
            inputs_embeds=suffix_embeds.to(prefix_embeds.dtype),
            attention_mask=torch.cat([prefix_mask, suffix_mask], 1).long(),
            position_ids=self.family.position_ids(suffix_positions),
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        return out.last_hidden_state

    # ---------------------------------------------------------------- understanding

    def prompt_ids(self, question: str, with_image: bool, n_image_tokens: int) -> list[int]:
        """Token ids of a one-turn prompt, the image context token expanded to `n_image_tokens`."""
        tokenizer = self._require_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return self._expand_image_token(ids, n_image_tokens) if with_image else ids
        ids = tokenizer(question)["input_ids"]
        return (self.family.image_token_block(tokenizer, n_image_tokens) if with_image else []) + ids

    def _expand_image_token(self, ids: list[int], n: int) -> list[int]:
        context = self.model.config.image_token_id
        if context not in ids:
            raise ValueError("the chat template rendered no image token for an image message")
        i = ids.index(context)
        start, end = self.family.start_end_ids(self.tokenizer)
        block = self.family.image_token_block(self.tokenizer, n)
        if start is not None and i > 0 and ids[i - 1] == start:
            block = block[1:]
        if end is not None and i + 1 < len(ids) and ids[i + 1] == end:
            block = block[:-1]
        return ids[:i] + block + ids[i + 1 :]

    @torch.no_grad()
    def answer(self, image: Tensor | None, question: str, max_new_tokens: int = 16) -> str:
        """Greedy answer to `question` about `image` ((3, H, W) or (1, 3, H, W) in [0, 1], or None)."""
        images = None if image is None else (image if image.ndim == 4 else image.unsqueeze(0))
        return self.answer_batch(images, [question], max_new_tokens)[0]

    @torch.no_grad()
    def answer_batch(self, images: Tensor | None, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers through the HF model's `generate()`: one question per image (B, 3, H, W),
        or text-only questions when `images` is None. Prompts are left padded."""
        tokenizer = self._require_tokenizer()
        if images is not None and len(images) != len(questions):
            raise ValueError(f"answer_batch: {len(images)} images for {len(questions)} questions")
        n_img = 0 if images is None else self.family.tokens_for(*images.shape[-2:])
        prompts = [self.prompt_ids(q, images is not None, n_img) for q in questions]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids, attention_mask = _left_pad(prompts, pad_id, self.device)
        extra = {} if images is None else self.family.model_inputs(images.to(self.device), input_ids)
        extra = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in extra.items()}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            **extra,
        )
        new = out[:, input_ids.shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = 1
    return ids.to(device), mask.to(device)
