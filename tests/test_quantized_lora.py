"""`generator.quantize` / `mllm.quantize: int8` on the tiny QwenImagePipeline of test_qwen_image: LoRA mix
fine-tuning on a torchao int8 base (activation checkpointing on) keeps the int8 weights unchanged, its LoRA file
loads with plain diffusers onto the unquantized base, and gives iomm's images within int8's error."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline
from torchao.quantization import Int8Tensor

from iomm.conditioning.mllm import FrozenMLLM
from iomm.config import Config
from iomm.inference.pipeline import load_model
from iomm.inference.sampling import sample_images
from iomm.model import IOMM, build_codec
from iomm.training.trainer import Trainer
from iomm.typed_config import ConfigError
from tests import test_qwen_image
from tests.test_qwen_image import PROMPTS, _losses, qwen_config

qwen_dir = test_qwen_image.qwen_dir  # its fixture: the saved tiny QwenImagePipeline

INT8 = ("generator.quantize=int8", "mllm.quantize=int8")
# Largest pixel difference (images in [0, 1], 3 Euler steps) between iomm's int8 model and plain diffusers on the
# fp32 base with the same LoRA, from int8 weight-only rounding (each weight to 1/127 of its row's largest) in the
# MLLM and the transformer: measured 0.0016, where the 2-step LoRA itself moves the image by 0.0044.
INT8_TOLERANCE = 0.005


def quantized_mllm_model(cfg: Config) -> IOMM:
    """IOMM.from_config with the MLLM loaded as `mllm.quantize` says (what `iomm.model.load_mllm` is to pass)."""
    return IOMM(cfg, FrozenMLLM.from_pretrained(cfg.mllm.path, quantize=cfg.mllm.quantize), build_codec(cfg))


def _int8_weights(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (p.qdata.clone(), p.scale.clone()) for name, p in module.named_parameters()
            if isinstance(p, Int8Tensor)}


def _image(pipe_or_model: QwenImagePipeline | IOMM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if isinstance(pipe_or_model, IOMM):
        return sample_images(pipe_or_model, pipe_or_model.condition_texts(PROMPTS[:1]), generator=generator,
                             steps=3, guidance_scale=1.0)
    return pipe_or_model(PROMPTS[0], height=32, width=32, num_inference_steps=3, output_type="pt",
                         generator=generator).images


def test_lora_on_an_int8_base_loads_into_plain_diffusers(qwen_dir, tmp_path):
    cfg = qwen_config(qwen_dir, *INT8, "train.steps=2", "train.lr=0.01", "train.activation_checkpointing=true")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, model_fn=quantized_mllm_model)
    base, mllm = _int8_weights(trainer.model.generator), _int8_weights(trainer.model.mllm)
    assert mllm and any(".base_layer." in name for name in base)  # the LoRA targets' weights among them
    trainer.fit()
    assert all(n.startswith("generator.") and "lora_" in n for n in trainer.params)
    for module, before in ((trainer.model.generator, base), (trainer.model.mllm, mllm)):
        after = _int8_weights(module)
        assert after.keys() == before.keys()
        assert all(torch.equal(a, b) for name in before for a, b in zip(after[name], before[name]))
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path / "run").values())

    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)  # unquantized, plain diffusers
    untuned = _image(pipe)
    pipe.load_lora_weights(tmp_path / "run/checkpoints/step_00000002")  # the file unchanged
    theirs = _image(pipe)
    model = load_model(tmp_path / "run", model_fn=quantized_mllm_model)
    assert isinstance(model.generator.transformer_blocks[0].attn.to_q.base_layer.weight, Int8Tensor)
    ours = _image(model)
    error = (ours - theirs).abs().max()
    assert error < INT8_TOLERANCE and error < (ours - untuned).abs().max()  # and the LoRA is in iomm's model


def test_int8_needs_a_lora_on_a_pipelines_transformer(qwen_dir):
    with pytest.raises(ConfigError, match="train.lora.enabled") as err:
        qwen_config(qwen_dir, "generator.quantize=int8", "train.lora.enabled=false")
    assert err.value.field_path == "generator.quantize"
    with pytest.raises(ConfigError, match="kind=qwen_image"):
        qwen_config(qwen_dir, "generator.quantize=int8", "generator.pretrained=null")
    with pytest.raises(ConfigError) as err:
        qwen_config(qwen_dir, "mllm.quantize=int4")
    assert err.value.field_path == "mllm.quantize" and err.value.got == "int4"
