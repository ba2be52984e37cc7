"""How a condition is laid out for the frozen MLLM: the text around a caption or around the masked image and its
prompt, and how many leading tokens of the LLM's last hidden states a raw condition (`adapter.kind: raw`) drops.

The paper's layout is the bare caption, and the prompt followed by the image. A Qwen-Image generator reads its
conditions the way its own pipelines write them: `QwenImagePipeline.encode_prompt`'s chat template for a caption,
`QwenImageEditPipeline`'s for an image and its instruction, each with its system prompt dropped. Both are read
from the diffusers pipelines themselves, so they follow the installed diffusers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from iomm.config import Config

IMAGE_SLOT = "<image>"  # where the image tokens go in `PromptFormat.image`
QWEN_IMAGE_TOKEN = "<|image_pad|>"
# The unconditional prompt of guidance where no learned null condition exists (Qwen-Image's examples use " ")
NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class PromptFormat:
    text: str  # "{}" is the caption
    image: str  # IMAGE_SLOT is the image, "{}" its prompt
    text_drop: int = 0  # leading tokens of a caption's hidden states that a raw condition leaves out
    image_drop: int = 0

    def image_parts(self, prompt: str) -> tuple[str, str]:
        """The text before and after the image tokens, the prompt written in."""
        before, after = self.image.split(IMAGE_SLOT)
        return before.format(prompt) if "{}" in before else before, after.format(prompt) if "{}" in after else after


PAPER = PromptFormat(text="{}", image="{}" + IMAGE_SLOT)


@functools.cache
def qwen_image_format() -> PromptFormat:
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    text = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    edit = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=None)
    return PromptFormat(text=text.prompt_template_encode, text_drop=text.prompt_template_encode_start_idx,
                        image=edit.prompt_template_encode.replace(QWEN_IMAGE_TOKEN, IMAGE_SLOT),
                        image_drop=edit.prompt_template_encode_start_idx)


def prompt_format(cfg: Config) -> PromptFormat:
    return qwen_image_format() if cfg.generator.kind == "qwen_image" else PAPER
