"""FrozenMLLM over tiny InternVL and Qwen2.5-VL models built from configs (offline, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
)

from iomm.conditioning.mllm import FrozenMLLM
from iomm.nano.tokenizer import SPECIAL_TOKENS, build_tokenizer, nano_vocabulary

QWEN_SPECIALS = {
    **{k: v for k, v in SPECIAL_TOKENS.items() if k.endswith(("pad_token", "unk_token", "bos_token", "eos_token"))},
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
QWEN_PREPROCESSING = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 4,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 32 * 32,
    "max_pixels": 64 * 64,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
TEXTS = ["a photo of a red circle", "two blue squares and a green triangle"]


def tiny_internvl() -> tuple[InternVLForConditionalGeneration, object, dict]:
    tokenizer = build_tokenizer()
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=4)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, image_seq_length=16,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    preprocessing = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return InternVLForConditionalGeneration(config).eval(), tokenizer, preprocessing


def tiny_qwen() -> tuple[Qwen2_5_VLForConditionalGeneration, object, dict]:
    tokenizer = build_tokenizer(nano_vocabulary(), QWEN_SPECIALS, chat_template=None)
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer, dict(QWEN_PREPROCESSING)


BUILDERS = {"internvl": tiny_internvl, "qwen2_5_vl": tiny_qwen}


def save(model, tokenizer, preprocessing: dict, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    return path


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory) -> tuple[FrozenMLLM, FrozenMLLM]:
    """(in-memory wrapper, wrapper loaded back from a saved checkpoint dir) of one family."""
    model, tokenizer, preprocessing = BUILDERS[request.param]()
    path = save(model, tokenizer, preprocessing, tmp_path_factory.mktemp(request.param))
    return FrozenMLLM(model, tokenizer, preprocessing), FrozenMLLM.from_pretrained(path)


def sequence(mllm: FrozenMLLM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """concat(text, image tokens) embeddings and mask."""
    text, mask = mllm.embed_text(TEXTS)
    img = mllm.embed_images(images)
    ones = torch.ones(img.shape[:2], dtype=torch.bool)
    return torch.cat([text, img], 1), torch.cat([mask, ones], 1)


def test_shapes_and_reload_identical(pair) -> None:
    memory, loaded = pair
    images = torch.rand(2, 3, 32, 32)
    text, mask = loaded.embed_text(TEXTS)
    assert text.shape[:2] == mask.shape and text.shape[2] == loaded.hidden_size == 32
    assert mask.dtype == torch.bool and mask[:, 0].all() and not mask[0].all()  # right padded
    img = loaded.embed_images(images)
    assert img.shape == (2, loaded.num_image_tokens(32), 32) and loaded.num_image_tokens(32) == 16
    embeds, full_mask = sequence(loaded, images)
    out = loaded.forward_embeds(embeds, full_mask)
    assert out.shape == embeds.shape
    assert torch.equal(out, memory.forward_embeds(*sequence(memory, images)))
    assert loaded.embed_scale == pytest.approx(memory.embed_scale) and loaded.embed_scale > 0


def test_matches_hf_forward_with_image_tokens(pair) -> None:
    """embed_images + forward_embeds == the HF model's own image-token path (same 1-D positions)."""
    mllm = pair[1]
    images = torch.rand(1, 3, 32, 32)
    n = mllm.num_image_tokens(32)
    prompt = mllm.tokenizer("what color is the circle ?")["input_ids"]
    ids = torch.tensor([prompt[:1] + mllm.family.image_token_block(mllm.tokenizer, n) + prompt[1:]])
    extra = mllm.family.model_inputs(images, ids)
    positions = torch.arange(ids.shape[1])[None]
    hf = mllm.model.model(input_ids=ids, position_ids=mllm.family.position_ids(positions), **extra)
    embeds = mllm.model.get_input_embeddings()(ids)
    embeds[ids == mllm.model.config.image_token_id] = mllm.embed_images(images)[0]
    ours = mllm.forward_embeds(embeds, torch.ones_like(ids))
    torch.testing.assert_close(ours, hf.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_qwen_image_segments_get_the_hf_models_own_rotary_positions() -> None:
    """A condition packed from segments (text, an image on its grid, text; left padded) gives the hidden states
    Qwen2.5-VL computes itself from input ids and pixels, 3-D rotary positions (`get_rope_index`) included."""
    from iomm.conditioning.sequence import Segment, pack_left, positions_after

    model, tokenizer, preprocessing = tiny_qwen()
    mllm = FrozenMLLM(model, tokenizer, preprocessing)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n, grid = mllm.num_image_tokens(32), mllm.image_grid(32)
    assert grid == (4, 4) and grid[0] * grid[1] == n
    cfg = model.config
    befores = [tokenizer("describe the image")["input_ids"], tokenizer("what")["input_ids"]]
    after = tokenizer("a red circle .")["input_ids"]
    embed = model.get_input_embeddings()
    rows = [[*b, cfg.vision_start_token_id] for b in befores]
    width = max(map(len, rows))
    before = torch.stack([torch.tensor(r + [0] * (width - len(r))) for r in rows])
    before_valid = torch.stack([torch.tensor([True] * len(r) + [False] * (width - len(r))) for r in rows])
    after_ids = torch.tensor([[cfg.vision_end_token_id, *after]] * 2)
    with torch.no_grad():
        segments = [Segment(embed(before), before_valid),
                    Segment(mllm.embed_images(images), torch.ones(2, n, dtype=torch.bool), grid=grid),
                    Segment(embed(after_ids), torch.ones_like(after_ids, dtype=torch.bool))]
        packed = pack_left(segments)
        ours = mllm.forward_embeds(packed.embeds, packed.mask, packed.llm_positions)
        # the same sequences as token ids, left padded, through the HF model's own image and position handling
        ids = [[*r, *([cfg.image_token_id] * n), *after_ids[0].tolist()] for r in rows]
        length = max(map(len, ids))
        input_ids = torch.tensor([[0] * (length - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids])
        hf = model.model(input_ids=input_ids, attention_mask=mask, **mllm.family.model_inputs(images, input_ids))
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], hf.last_hidden_state[valid], rtol=1e-5, atol=1e-5)
    # queries appended after it continue from the largest position, as generation does (rope deltas)
    assert positions_after(packed, 2).shape == (3, 2, 2)
    assert positions_after(packed, 1)[:, 0, 0].tolist() == [packed.rope[:, 0].max().item() + 1] * 3


def test_left_padding_matches_unpadded(pair) -> None:
    mllm = pair[1]
    embeds, mask = mllm.embed_text(TEXTS[:1])
    pad = torch.zeros(1, 3, embeds.shape[2])
    padded = mllm.forward_embeds(torch.cat([pad, embeds], 1), torch.cat([torch.zeros(1, 3, dtype=torch.bool), mask], 1))
    torch.testing.assert_close(padded[:, 3:], mllm.forward_embeds(embeds, mask), rtol=1e-5, atol=1e-5)


def test_frozen_gradients_reach_inputs_only(pair) -> None:
    mllm = pair[1]
    assert not any(p.requires_grad for p in mllm.parameters())
    before = [p.clone() for p in mllm.parameters()]
    embeds, mask = sequence(mllm, torch.rand(2, 3, 32, 32))
    embeds = embeds.clone().requires_grad_(True)
    mllm.forward_embeds(embeds, mask).pow(2).mean().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in mllm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, mllm.parameters()))


def test_forward_suffix_equals_full_forward(pair) -> None:
    """Queries after a cached, no-grad prefix: same hidden states and query gradients as one full pass."""
    mllm = pair[1]
    embeds, mask = mllm.embed_text(TEXTS)  # left padded: the texts differ in length
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    queries = torch.randn(2, 3, embeds.shape[2], requires_grad=True)
    query_positions = positions.amax(1, keepdim=True) + 1 + torch.arange(3)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], 1)
    full = mllm.forward_embeds(torch.cat([embeds, queries], 1), full_mask,
                               torch.cat([positions, query_positions], 1))[:, -3:]
    (full_grad,) = torch.autograd.grad(full.pow(2).sum(), queries)
    suffix = mllm.forward_suffix(embeds, mask, positions, queries, query_positions)
    (suffix_grad,) = torch.autograd.grad(suffix.pow(2).sum(), queries)
    torch.testing.assert_close(suffix, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suffix_grad, full_grad, rtol=1e-4, atol=1e-5)
    assert full_grad.abs().sum() > 0


def test_train_keeps_eval_mode(pair) -> None:
    mllm = pair[1]
    wrapper = torch.nn.ModuleDict({"mllm": mllm, "head": torch.nn.Linear(2, 2)})
    wrapper.train()
    assert wrapper["head"].training
    assert not any(m.training for m in mllm.modules())


def test_gradient_checkpointing_same_gradient(tmp_path) -> None:
    model, tokenizer, preprocessing = tiny_internvl()
    path = save(model, tokenizer, preprocessing, tmp_path)
    plain = FrozenMLLM.from_pretrained(path)
    ckpt = FrozenMLLM.from_pretrained(path, gradient_checkpointing=True)
    ckpt.train()
    mlp = ckpt.language_model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute stops early
    grads = []
    for mllm in (plain, ckpt):
        embeds, mask = mllm.embed_text(TEXTS)
        embeds.requires_grad_(True)
        mllm.forward_embeds(embeds, mask).sum().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert len(calls) == 2  # forward, then the recompute in backward
    assert not mlp.training and not any(p.requires_grad for p in ckpt.parameters())


def test_batched_answers_are_the_answers_one_at_a_time(pair) -> None:
    mllm = pair[1]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    questions = ["what shape is it ?", "how many red circles are there in the image ?"]  # left padding differs
    for batch in (images, None):  # with an image each, and text only
        answers = mllm.answer_batch(batch, questions, max_new_tokens=3)
        assert answers == [mllm.answer(None if batch is None else batch[i], q, max_new_tokens=3)
                           for i, q in enumerate(questions)]
        assert all(isinstance(a, str) for a in answers)


def test_from_config_on_meta_device() -> None:
    model = tiny_internvl()[0]
    with torch.device("meta"):
        mllm = FrozenMLLM.from_config(model.config)
    assert all(p.is_meta for p in mllm.parameters())
    assert {n: p.shape for n, p in mllm.model.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert mllm.hidden_size == 32 and mllm.num_image_tokens(32) == 16


def test_remote_code_needs_opt_in(tmp_path) -> None:
    model, tokenizer, preprocessing = tiny_internvl()
    save(model, tokenizer, preprocessing, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="internvl_chat", auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        FrozenMLLM.from_pretrained(tmp_path)


def test_missing_files_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="weights.*tokenizer"):
        FrozenMLLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenMLLM.from_pretrained(tmp_path / "nowhere")
