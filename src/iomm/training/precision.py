"""Mixed precision that is only used where the hardware runs it natively.

`auto` resolves to bf16 only where the device computes bf16 in hardware (`iomm.training.hardware`): a CUDA GPU
with bf16, a CPU with AVX512_BF16 or AMX. Elsewhere bf16 is emulated: 3x slower on an AVX512 Xeon without
those flags, about 100x on an AVX2-only EPYC (a 512x512 matmul: 2 ms in fp32, 208 ms in bf16).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from iomm.training.hardware import bf16_is_native, bf16_reason


def resolve_precision(requested: str, device_type: str = "cpu") -> str:
    """'auto' -> bf16 where native else fp32; an explicit 'bf16' without native support warns and runs fp32."""
    if requested == "fp32":
        return "fp32"
    if bf16_is_native(device_type):
        return "bf16"
    if requested == "bf16":
        warnings.warn(f"bf16 was asked for, but {bf16_reason(device_type)}: training in fp32", stacklevel=2)
    return "fp32"


def describe_precision(requested: str, device_type: str = "cpu") -> str:
    """The resolved precision and why, for the log and the run's records, e.g. 'fp32 (auto: this CPU has ...)'."""
    if requested == "fp32":
        return "fp32 (set in the config)"
    resolved = "bf16" if bf16_is_native(device_type) else "fp32"
    return f"{resolved} ({requested}: {bf16_reason(device_type)})"


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def store_frozen_in_bf16(module: torch.nn.Module, precision: str, device_type: str = "cpu") -> None:
    """Where bf16 runs natively, frozen weights (the MLLM, the VAE, a LoRA base) are stored in bf16: half their
    memory, and no gradients or optimizer state depend on their precision. Trained weights stay fp32."""
    if resolve_precision(precision, device_type) != "bf16":
        return
    for parameter in module.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
