"""Keeping other libraries' noise out of iomm's logs: their progress bars when nobody watches a terminal, and the
warnings known to be harmless here. Called once, from the CLI entry point."""

from __future__ import annotations

import logging

# diffusers.loaders.ip_adapter imports CLIPImageProcessor and SiglipImageProcessor from transformers, which without
# torchvision falls back to their PIL versions and says so through its logger (not `warnings`), once per name.
# iomm reads images with its own preprocessing and never uses these processors.
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
TORCHVISION_FALLBACK_LOGGER = "transformers.utils.import_utils"
# torchao (the int8 frozen base, `generator.quantize`) says at import that its optional fused kernels (mxfp8,
# CUTLASS: GPU builds for another Python) are missing, torch that torchao registers enums it no longer needs to,
# and diffusers that it cannot list torchao's tensor classes for torch.load: iomm quantizes at load and never
# torch.loads a torchao checkpoint (weights load through safetensors only).
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    (TORCHVISION_FALLBACK_LOGGER, TORCHVISION_FALLBACK),
    ("torchao", "Failed to load"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()

    def __eq__(self, other: object) -> bool:  # logging's addFilter skips a filter equal to one it holds
        return isinstance(other, _DropMessage) and other.fragment == self.fragment

    def __hash__(self) -> int:
        return hash(self.fragment)


def quiet_libraries(*, show_progress: bool) -> None:
    """Drop the known-harmless messages; without `show_progress`, also transformers', diffusers', the Hub's and
    datasets' own progress bars (iomm's own progress is its log lines)."""
    for logger, fragment in KNOWN_HARMLESS:
        logging.getLogger(logger).addFilter(_DropMessage(fragment))
    if show_progress:
        return
    import datasets
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
