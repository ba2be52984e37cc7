"""LoRA on the generator, the diffusers way: peft adapters added with the model's `add_adapter`, saved as
`pytorch_lora_weights.safetensors` by the generator's own pipeline class (`save_lora_weights`: keys prefixed
`transformer.` or `unet.`), and read back with `load_lora_adapter`, so plain diffusers loads them too.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from iomm.config import LoRAConfig
from iomm.typed_config import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
# generator.kind -> the diffusers pipeline whose LoRA format it uses (imported when saving: pipelines pull in
# transformers' image processors), that format's keyword and key prefix
LORA_FORMATS = {"sd3": ("StableDiffusion3Pipeline", "transformer_lora_layers", "transformer"),
                "zimage": ("ZImagePipeline", "transformer_lora_layers", "transformer"),
                "qwen_image": ("QwenImagePipeline", "transformer_lora_layers", "transformer"),
                "unet": ("StableDiffusionPipeline", "unet_lora_layers", "unet")}


def add_lora(generator: nn.Module, lora: LoRAConfig, source: str = "train.lora") -> None:
    """Freeze the generator and add the trainable adapters (B starts at zero: the model is unchanged)."""
    generator.requires_grad_(False)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                        target_modules=list(lora.target_modules))
    try:
        generator.add_adapter(config)
    except ValueError as err:  # peft: no module matched
        raise ConfigError(source, "train.lora.target_modules",
                          f"names of layers in the {type(generator).__name__} ({err})".split(". ")[0] + ")",
                          lora.target_modules) from None


def lora_state(generator: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapters' weights in peft's naming (full tensors, also of an FSDP2-sharded generator:
    collective). A copy, not a view: the EMA weights swapped in to be saved are swapped out again."""
    state = get_peft_model_state_dict(generator)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().to("cpu", copy=True)
            for k, v in state.items()}


def save_lora(state: dict[str, torch.Tensor], kind: str, out: Path) -> Path:
    """`out/pytorch_lora_weights.safetensors` in the diffusers format of the generator's pipeline."""
    pipeline, keyword, _ = LORA_FORMATS[kind]
    getattr(diffusers, pipeline).save_lora_weights(str(out), **{keyword: state}, safe_serialization=True)
    return out / LORA_FILE


def load_lora(generator: nn.Module, kind: str, path: Path) -> None:
    """A saved LoRA (a file or its directory) into the generator, as the pipeline's `load_lora_weights` does."""
    path = path / LORA_FILE if path.is_dir() else path
    generator.load_lora_adapter(str(path), prefix=LORA_FORMATS[kind][2])
