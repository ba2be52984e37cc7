"""What differs between the supported VLM families (InternVL, Qwen2.5-VL): image preprocessing done in torch
(resize, rescale, normalise, patchify; the HF processors of these families need torchvision), image features
and the position ids of the language model. Settings come from the checkpoint's `preprocessor_config.json`
with the keys the HF image processors use."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------------


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of (B, 3, H, W) images in [0, 1] (what the HF processors do)."""
    if tuple(images.shape[-2:]) == size:
        return images
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def _normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _check_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) floats in [0, 1], got shape {tuple(images.shape)}")
    return images.float()


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, pixel count within [min_pixels, max_pixels]."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------------------------
# model families: what differs between InternVL and Qwen2.5-VL
# --------------------------------------------------------------------------------------------


class _Family:
    """Vision preprocessing, image features and position ids of one VLM family."""

    def __init__(self, config: PretrainedConfig, preprocessing: dict[str, Any]) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.mean = tuple(preprocessing.get("image_mean", self.default_mean))
        self.std = tuple(preprocessing.get("image_std", self.default_std))

    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def tokens_for(self, height: int, width: int) -> int:
        """LLM tokens of one (height x width) image."""
        raise NotImplementedError

    def image_features(self, model: nn.Module, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) embeddings in the LLM input space."""
        raise NotImplementedError

    def grid_for(self, height: int, width: int) -> tuple[int, int] | None:
        """(rows, columns) of an image's LLM tokens on the language model's 3-D rotary grid; None: 1-D positions."""
        return None

    def model_inputs(self, images: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        """Keyword arguments carrying the image for the HF model's forward() / generate()."""
        raise NotImplementedError

    def position_ids(self, positions: Tensor) -> Tensor:
        """(B, L) 1-D positions -> what the language model takes."""
        return positions

    def image_token_block(self, tokenizer: Any, n: int) -> list[int]:
        """Token ids of one image: [start] + [context] * n + [end] (start/end where the family has them)."""
        start, end = self.start_end_ids(tokenizer)
        return [t for t in (start,) if t is not None] + [self.config.image_token_id] * n + [
            t for t in (end,) if t is not None
        ]

    def start_end_ids(self, tokenizer: Any) -> tuple[int | None, int | None]:
        raise NotImplementedError


class _InternVL(_Family):
    def __init__(self, config: PretrainedConfig, preprocessing: dict[str, Any]) -> None:
        super().__init__(config, preprocessing)
        size = preprocessing.get("size")
        if isinstance(size, dict) and "height" in size:
            self.size = (int(size["height"]), int(size["width"]))
        else:
            self.size = _pair(config.vision_config.image_size)

    def tokens_for(self, height: int, width: int) -> int:
        patch = _pair(self.config.vision_config.patch_size)
        grid = (self.size[0] // patch[0]) * (self.size[1] // patch[1])
        return int(round(grid * self.config.downsample_ratio**2))

    def pixel_values(self, images: Tensor, dtype: torch.dtype) -> Tensor:
        images = _resize(_check_images(images), self.size)
        return _normalize(images, self.mean, self.std).to(dtype)

    def image_features(self, model: nn.Module, images: Tensor) -> Tensor:
        pixel_values = self.pixel_values(images, model.dtype)
        return model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output

    def model_inputs(self, images: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        return {"pixel_values": self.pixel_values(images, torch.float32)}

    def start_end_ids(self, tokenizer: Any) -> tuple[int | None, int | None]:
        start = getattr(tokenizer, "start_image_token", None) or "<img>"
        end = getattr(tokenizer, "end_image_token", None) or "</img>"
        return _token_id(tokenizer, start), _token_id(tokenizer, end)


class _Qwen25VL(_Family):
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def __init__(self, config: PretrainedConfig, preprocessing: dict[str, Any]) -> None:
        super().__init__(config, preprocessing)
        vision = config.vision_config
        self.patch = int(preprocessing.get("patch_size", vision.patch_size))
        self.merge = int(preprocessing.get("merge_size", vision.spatial_merge_size))
        self.temporal = int(preprocessing.get("temporal_patch_size", vision.temporal_patch_size))
        size = preprocessing.get("size") or {}
        self.min_pixels = int(preprocessing.get("min_pixels", size.get("shortest_edge", 56 * 56)))
        self.max_pixels = int(preprocessing.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)

    def tokens_for(self, height: int, width: int) -> int:
        h, w = self.target_size(height, width)
        return (h // self.patch) * (w // self.patch) // self.merge**2

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.target_size(height, width)
        return h // (self.patch * self.merge), w // (self.patch * self.merge)

    def patchify(self, images: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Qwen2VLImageProcessor.patchify: (B*gh*gw, C*T*P*P) patches and the (B, 3) grid."""
        images = _check_images(images)
        size = self.target_size(*images.shape[-2:])
        x = _normalize(_resize(images, size), self.mean, self.std)
        b, c, h, w = x.shape
        p, m, gh, gw = self.patch, self.merge, size[0] // self.patch, size[1] // self.patch
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        patches = x.reshape(b * gh * gw, c * self.temporal * p * p).to(dtype)
        grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)
        return patches, grid

    def image_features(self, model: nn.Module, images: Tensor) -> Tensor:
        patches, grid = self.patchify(images, model.dtype)
        out = model.model.get_image_features(patches, grid, return_dict=True).pooler_output
        return torch.stack(list(out))

    def model_inputs(self, images: Tensor, input_ids: Tensor) -> dict[str, Tensor]:
        patches, grid = self.patchify(images, torch.float32)
        mm_types = (input_ids == self.config.image_token_id).int()
        return {"pixel_values": patches, "image_grid_thw": grid, "mm_token_type_ids": mm_types}

    def position_ids(self, positions: Tensor) -> Tensor:
        return positions.unsqueeze(0).expand(3, -1, -1) if positions.ndim == 2 else positions

    def start_end_ids(self, tokenizer: Any) -> tuple[int | None, int | None]:
        return self.config.vision_start_token_id, self.config.vision_end_token_id


FAMILIES: dict[str, type[_Family]] = {"internvl": _InternVL, "qwen2_5_vl": _Qwen25VL}


def check_supported(model_type: Any, where: str = "the model") -> None:
    """ValueError naming `where` and the supported model types unless `model_type` is one of them."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where} has model_type={model_type!r}; FrozenMLLM supports the HF-native model types "
            f"{', '.join(sorted(FAMILIES))}. For InternVL use the '-hf' checkpoints (e.g. OpenGVLab/InternVL3-2B-hf)."
        )


def family_for(config: PretrainedConfig, preprocessing: dict[str, Any]) -> _Family:
    check_supported(config.model_type)
    return FAMILIES[config.model_type](config, preprocessing)


def _token_id(tokenizer: Any, token: str) -> int | None:
    if tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)
