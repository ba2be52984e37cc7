"""`adapter.token_loss` / `caption_token_loss`: auxiliary losses that make condition token k carry image token k
(of the masked image itself / of a caption's paired image); off by default."""

import pytest
import torch

from iomm.config import ConfigError
from iomm.model import IOMM
from iomm.training.trainer import Trainer


def test_off_by_default_and_the_paper_loss_is_unchanged(tiny_config):
    model = IOMM.from_config(tiny_config())
    assert model.token_head is None and "token_head" not in model.trainable()


def test_the_token_loss_adds_to_the_flow_loss_and_trains_the_queries(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=3", "adapter.token_loss=1.0", "train.mix_ratio=1.0")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    model = trainer.model
    images = torch.rand(4, 3, cfg.data.resolution, cfg.data.resolution)
    cond = model.condition_batch(images, [None] * 4, torch.Generator().manual_seed(0), dropout=0.0)
    assert cond.image_rows == [0, 1, 2, 3] and cond.image_tokens.shape[1] == model.mllm.num_image_tokens(32)
    token = model.token_loss(cond.tokens[cond.image_rows], cond.image_tokens)
    assert token > 0
    token.backward()
    assert model.adapter.queries.grad is not None and model.adapter.queries.grad.abs().sum() > 0
    assert model.token_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    texts = model.condition_batch(images, ["a red circle"] * 4, torch.Generator().manual_seed(0), dropout=0.0)
    assert texts.image_rows == [] and texts.caption_tokens is None  # caption_token_loss is off
    trainer.fit()
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    resumed.resume()
    assert torch.equal(resumed.model.token_head.weight, trainer.model.token_head.weight)


def test_the_caption_token_loss_ties_a_captions_tokens_to_its_images(tiny_config):
    model = IOMM.from_config(tiny_config("adapter.caption_token_loss=0.5"))
    images = torch.rand(4, 3, 32, 32)
    captions = ["a red circle", None, "two blue squares", None]
    cond = model.condition_batch(images, captions, torch.Generator().manual_seed(0), dropout=0.0)
    assert cond.caption_rows == [0, 2] and cond.image_rows == [1, 3]
    assert torch.equal(cond.caption_tokens, model.mllm.embed_images(images[[0, 2]]))
    flow_only = IOMM.from_config(tiny_config())
    flow_only.load_state_dict(model.state_dict(), strict=False)
    loss = model.loss(images, captions, torch.Generator().manual_seed(1))
    flow = flow_only.loss(images, captions, torch.Generator().manual_seed(1))
    caption_term = model.token_loss(cond.tokens[[0, 2]], cond.caption_tokens)
    assert caption_term > 0
    torch.testing.assert_close(loss, flow + 0.5 * caption_term)
    loss.backward()
    assert model.adapter.queries.grad.abs().sum() > 0 and model.token_head.weight.grad.abs().sum() > 0


def test_bad_token_loss_settings_fail_before_any_compute(tiny_config):
    with pytest.raises(ConfigError, match="adapter.token_loss"):
        tiny_config("adapter.token_loss=-1")
    with pytest.raises(ConfigError, match="adapter.kind=raw"):
        tiny_config("adapter.token_loss=1", "adapter.kind=raw")
    with pytest.raises(ConfigError, match="adapter.caption_token_loss"):
        tiny_config("adapter.caption_token_loss=nan")
    with pytest.raises(ValueError, match="adapter.num_queries >= the"):
        IOMM.from_config(tiny_config("adapter.token_loss=1", "adapter.num_queries=2"))
