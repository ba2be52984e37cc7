"""Frozen weights stored in int8 (`generator.quantize` / `mllm.quantize: int8`): torchao's int8 weight-only
quantization, applied the libraries' documented way, while diffusers or transformers load the model
(`from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))`). Each `nn.Linear` weight
becomes a torchao `Int8Tensor` (one byte a weight, one scale a row); peft puts its `TorchaoLoraLinear` on those
layers, so LoRA adapters train in full precision on top, and the saved adapters load onto the unquantized base.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iomm.config import Quantize

INT8_BYTES = 1


def _int8_config() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig  # torchao takes seconds to import: only when asked

    return Int8WeightOnlyConfig()


def diffusers_loading(quantize: Quantize) -> dict[str, Any]:
    """`from_pretrained` keywords of a diffusers model. fp32 for the layers left unquantized, as without
    quantization (diffusers' torchao loading defaults them to bf16): the trainer decides what is stored in bf16."""
    if quantize == "none":
        return {}
    from diffusers import TorchAoConfig

    return {"quantization_config": TorchAoConfig(_int8_config()), "torch_dtype": torch.float32}


def transformers_loading(quantize: Quantize) -> dict[str, Any]:
    """`from_pretrained` keywords of a transformers model (its output embedding stays unquantized)."""
    if quantize == "none":
        return {}
    from transformers import TorchAoConfig

    return {"quantization_config": TorchAoConfig(_int8_config())}


def int8_weight_count(module: nn.Module, skip: tuple[nn.Module | None, ...] = ()) -> int:
    """How many weights `*_loading("int8")` stores in int8: those of every `nn.Linear` but `skip` (a
    transformers model's output embedding); works on the meta device."""
    return sum(child.weight.numel() for child in module.modules()
               if isinstance(child, nn.Linear) and not any(child is s for s in skip))


def is_quantized(tensor: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


def leave_int8_out_of_state(module: nn.Module) -> None:
    """The int8 weights are the pretrained ones, quantized again at every load, so a checkpoint leaves them out
    of `state_dict` and `load_state_dict` does not ask for them (safetensors cannot write torchao's tensors)."""

    def drop(_module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        for key in [k for k, v in state.items() if is_quantized(v)]:
            del state[key]

    def forgive(_module: nn.Module, incompatible: Any) -> None:
        int8 = {name for name, p in module.named_parameters() if is_quantized(p)}
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in int8]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(forgive)
