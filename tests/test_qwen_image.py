"""generator.kind: qwen_image over a tiny QwenImagePipeline built from config objects (offline): its conditions
are encode_prompt's, LoRA mix fine-tuning runs with both adapter kinds, the LoRA loads into plain diffusers and
gives iomm's images, the base stays bit-identical, resume is exact, and bad input fails clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel as QwenImageTransformer
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from iomm.cli import main
from iomm.conditioning.prompt_format import NEGATIVE_PROMPT, qwen_image_format
from iomm.config_checks import load_config
from iomm.evaluation.sample_grid import sample_grid
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.inference.sampling import sample_images
from iomm.model import IOMM
from iomm.training.trainer import Trainer
from iomm.typed_config import ConfigError

QWEN_SPECIALS = {"pad_token": "<|endoftext|>", "unk_token": "<unk>", "eos_token": "<|im_end|>",
                 "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
PROMPTS = ["a red circle", "two blue squares and a green triangle on a white background"]


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for Qwen2's tokenizer (the hub's cannot be downloaded here): the templates' words,
    punctuation and newlines are tokens, so the system prompt of QwenImagePipeline's template is 34 tokens, as
    in Qwen2's own tokenizer."""
    fmt = qwen_image_format()
    from iomm.nano.tokenizer import nano_vocabulary

    words = set(re.findall(r"\w+|[^\w\s]", (fmt.text + fmt.image).lower())) | set(nano_vocabulary())
    specials = [*QWEN_SPECIALS.values(), "<|im_start|>"]
    vocab = {t: i for i, t in enumerate([*specials, "\n", *sorted(words - set(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    words_and_newlines = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
                                                     words_and_newlines])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **QWEN_SPECIALS)


def tiny_qwen_image_pipeline() -> QwenImagePipeline:
    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"))).eval()
    transformer = QwenImageTransformer(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's settings, sequence lengths scaled down
        base_image_seq_len=16, max_image_seq_len=64, base_shift=0.5, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        use_dynamic_shifting=True, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


QWEN_PREPROCESSING = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "merge_size": 2,
                      "temporal_patch_size": 2, "min_pixels": 32 * 32, "max_pixels": 64 * 64,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A saved tiny QwenImagePipeline, with a `processor/` image-processor config as the edit pipelines have."""
    out = tmp_path_factory.mktemp("qwen-image")
    tiny_qwen_image_pipeline().save_pretrained(out)
    (out / "processor").mkdir()
    (out / "processor/preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSING))
    return out


class StandInProcessor:
    """Qwen2VLProcessor's text-and-images call (the real one needs torchvision for its video processor): the
    PIL image processor, each image token expanded to the image's merged patches, the tokenizer."""

    def __init__(self, tokenizer):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        settings = {k: v for k, v in QWEN_PREPROCESSING.items() if k != "image_processor_type"}
        self.image_processor, self.tokenizer = Qwen2VLImageProcessorPil(**settings), tokenizer

    def __call__(self, text, images, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        pixels = self.image_processor(images=images, return_tensors="pt")
        grids = iter(pixels["image_grid_thw"])
        merged = self.image_processor.merge_size ** 2
        text = [t.replace("<|image_pad|>", "<|image_pad|>" * int(next(grids).prod() // merged), 1) for t in text]
        return BatchFeature({**self.tokenizer(text, padding=padding, return_tensors=return_tensors), **pixels})


def qwen_config(qwen_dir: Path, *overrides: str):
    return load_config(None, [
        f"mllm.path={qwen_dir}", "generator.kind=qwen_image", f"generator.pretrained={qwen_dir}",
        "codec.kind=vae", f"codec.path={qwen_dir}", "connector.kind=identity", "train.cond_dropout=0",
        "adapter.kind=raw", "adapter.num_queries=4", "adapter.num_heads=2", "masking.ratio=0.5",
        "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2",
        "train.keep_last=10", "train.mixed_precision=fp32", "train.ema_decay=0.5", "flow.sample_steps=3",
        "train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=4", "data.pairs=world:16",
        "train.mix_ratio=0.5", *overrides])


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_text_conditions_are_encode_prompts(qwen_dir):
    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    expected, expected_mask = pipe.encode_prompt(PROMPTS, device="cpu")
    model = IOMM.from_config(qwen_config(qwen_dir))
    with torch.no_grad():
        cond = model.condition_texts(PROMPTS)
    assert cond.tokens.shape == expected.shape and torch.equal(cond.mask, expected_mask.bool())
    assert torch.allclose(cond.tokens, expected, atol=1e-5)
    assert model.format.text_drop == 34 and len(pipe.tokenizer(pipe.prompt_template_encode.split("{}")[0])
                                                  ["input_ids"]) == 34  # the stand-in drops what Qwen2's does


@pytest.mark.parametrize("adapter", ["raw", "rqa"])
def test_lora_mix_fine_tuning_loads_into_plain_diffusers(qwen_dir, tmp_path, adapter):
    cfg = qwen_config(qwen_dir, f"adapter.kind={adapter}", "train.steps=3", "train.lr=0.01")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    names = list(trainer.params)
    assert any("lora_" in n for n in names) and not any(n.startswith("generator.") and "lora_" not in n
                                                        for n in names)
    assert any(n.startswith("adapter.") for n in names) == (adapter == "rqa")  # a new RQA trains in full
    base = QwenImageTransformer.from_pretrained(qwen_dir, subfolder="transformer").state_dict()
    tuned = {k.replace(".base_layer", ""): v for k, v in trainer.model.generator.state_dict().items()
             if "lora_" not in k}
    assert tuned.keys() == base.keys() and all(torch.equal(v, tuned[k]) for k, v in base.items())
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path / "run").values())

    checkpoint = tmp_path / "run/checkpoints/step_00000003"
    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    pipe.load_lora_weights(checkpoint)  # plain diffusers, the file unchanged
    model = load_model(tmp_path / "run")
    if adapter == "raw":  # Qwen-Image's own conditioning: diffusers' call gives iomm's image
        generator = torch.Generator().manual_seed(3)
        ours = sample_images(model, model.condition_texts(PROMPTS[:1]), generator=generator, steps=3,
                             guidance_scale=1.0)
        theirs = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=3, output_type="pt",
                      generator=torch.Generator().manual_seed(3)).images
        assert torch.allclose(ours, theirs, atol=1e-5)
        # true CFG: the negative prompt " " as iomm's null condition, the guided velocity rescaled per patch
        guided = sample_images(model, model.condition_texts(PROMPTS[:1]), generator=torch.Generator().manual_seed(3),
                               steps=3, guidance_scale=4.0)
        theirs_guided = pipe(PROMPTS[0], negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=4.0, height=32, width=32,
                             num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(3)).images
        assert torch.allclose(guided, theirs_guided, atol=1e-5) and not torch.allclose(guided, ours, atol=1e-3)
        untuned = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)(
            PROMPTS[0], height=32, width=32, num_inference_steps=3, output_type="pt",
            generator=torch.Generator().manual_seed(3)).images
        assert not torch.allclose(untuned, theirs, atol=1e-4)  # the LoRA changed something
        # iomm export --lora: a pipeline directory with the adapters fused (and their file beside it)
        assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--lora"]) == 0
        exported = IOMMPipeline.from_pretrained(tmp_path / "export")(
            PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
            output_type="pt").images
        assert torch.allclose(exported, ours, atol=1e-4)


def test_qwen_image_resume_is_exact(qwen_dir, tmp_path):
    Trainer(qwen_config(qwen_dir, "train.steps=4"), tmp_path / "straight", progress=False).fit()
    Trainer(qwen_config(qwen_dir, "train.steps=2"), tmp_path / "resumed", progress=False).fit()
    Trainer(qwen_config(qwen_dir, "train.steps=4"), tmp_path / "resumed", progress=False).fit()
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() == {1, 2, 3, 4}
    assert all(abs(straight[s] - resumed[s]) < 1e-6 for s in straight)


def test_stage1_image_conditions_use_the_edit_template(qwen_dir):
    """Raw stage-1 conditions: QwenImageEditPipeline's template around the masked image and the stage-1 prompt,
    its first 64 tokens (the system prompt) dropped; the masked image tokens change the condition."""
    model = IOMM.from_config(qwen_config(qwen_dir))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before, after = model.format.image_parts(model.cfg.masking.prompt)
    assert before.endswith("<|vision_start|>") and after.startswith("<|vision_end|>" + model.cfg.masking.prompt)
    n_text = sum(len(model.mllm.tokenizer(t)["input_ids"]) for t in (before, after))
    with torch.no_grad():
        masked = model.condition_masked_images(images, torch.Generator().manual_seed(1))
        full = model.condition_masked_images(images, None, ratio=0.0)
    assert model.format.image_drop == 64
    assert masked.tokens.shape[1] == n_text + model.mllm.num_image_tokens(32) - 64 > 0
    assert not torch.allclose(masked.tokens, full.tokens, atol=1e-4)


def test_image_conditions_are_the_edit_pipelines_with_qwen25_vl_rotary_positions(qwen_dir):
    """Stage-1 / editing conditions (adapter raw, ratio 0) are QwenImageEditPipeline's prompt embeddings of the
    image and prompt, with the image tokens on Qwen2.5-VL's own 3-D rotary grid: equal to the text encoder's own
    forward given the processor's `mm_token_type_ids`. The installed pipeline leaves those out under
    transformers >= 5 (diffusers#14194) and so gives 1-D positions: it equals ours either way once that is
    accounted for."""
    from diffusers import QwenImageEditPipeline

    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    edit = QwenImageEditPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                 tokenizer=pipe.tokenizer, processor=StandInProcessor(pipe.tokenizer),
                                 transformer=pipe.transformer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]
    model = IOMM.from_config(qwen_config(qwen_dir))
    prompt = model.cfg.masking.prompt
    with torch.no_grad():
        ours = model.condition_masked_images(pixels, None, ratio=0.0).tokens
        inputs = edit.processor(text=[edit.prompt_template_encode.format(prompt)], images=[image])
        own = pipe.text_encoder(**inputs, mm_token_type_ids=(inputs["input_ids"] == pipe.text_encoder.config
                                                             .image_token_id).int(), output_hidden_states=True)
        theirs = edit._get_qwen_prompt_embeds([prompt], [image], device="cpu")[0]
        model.mllm.image_grid = lambda resolution: None  # 1-D positions, as the pipeline's fallback gives
        ours_1d = model.condition_masked_images(pixels, None, ratio=0.0).tokens
    torch.testing.assert_close(ours, own.hidden_states[-1][:, edit.prompt_template_encode_start_idx:])
    assert not torch.allclose(ours, ours_1d, atol=1e-4)
    assert torch.allclose(theirs, ours, atol=1e-6) or torch.allclose(theirs, ours_1d, atol=1e-6)


def test_bad_qwen_image_input_fails_clearly(qwen_dir, tmp_path):
    (tmp_path / "not_qwen").mkdir()
    with pytest.raises(ConfigError, match="QwenImagePipeline directory") as err:
        qwen_config(qwen_dir, f"generator.pretrained={tmp_path / 'not_qwen'}")
    assert err.value.field_path == "generator.pretrained" and "model_index.json" in str(err.value.got)
    with pytest.raises(ConfigError, match="train.lora.rank"):
        qwen_config(qwen_dir, "train.lora.rank=0")
    with pytest.raises(ConfigError, match="train.cond_dropout"):
        qwen_config(qwen_dir, "train.cond_dropout=0.1")
    with pytest.raises(ConfigError, match="train.lora.target_modules"):
        Trainer(qwen_config(qwen_dir, "train.lora.target_modules=[no_such_layer]", "train.steps=1"),
                tmp_path / "run", progress=False).fit()


def test_where_bf16_is_native_the_lora_base_is_stored_in_bf16(qwen_dir, tmp_path, monkeypatch):
    """(bf16 is emulated on this CPU: the test says it is native, to run the path a GPU takes.)"""
    monkeypatch.setattr("iomm.training.precision.bf16_is_native", lambda device_type="cpu": True)
    trainer = Trainer(qwen_config(qwen_dir, "train.steps=2", "train.mixed_precision=bf16", "adapter.kind=rqa",
                                  "train.sample_every=2"), tmp_path / "run", progress=False, sample_fn=sample_grid)
    trainer.fit()
    assert (tmp_path / "run/samples/step_00000002.png").is_file()  # sampling runs on the bf16 base too
    monkeypatch.undo()  # an fp32 machine loads the run
    model = load_model(tmp_path / "run")
    assert {p.dtype for p in model.generator.parameters()} == {torch.float32}
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert {dtypes[n] for n in dtypes if "lora_" in n or n.startswith("adapter.")} == {torch.float32}
    assert {dtypes[n] for n in dtypes if n.startswith(("generator.", "mllm.", "codec.")) and "lora_" not in n} \
        == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path / "run").values())
