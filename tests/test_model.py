"""The IOMM model on a tiny real-architecture MLLM: gradients, freezing, conditions, save/load."""

import pytest
import torch

from iomm.conditioning.masking import random_keep_mask
from iomm.data.mixed_batches import MixedBatches, build_sources
from iomm.model import IOMM


def _batch(cfg, step=0):
    sources = build_sources(cfg)
    images, pairs = sources.images, sources.pairs
    return MixedBatches(images, pairs, cfg.train.batch_size, cfg.train.mix_ratio, cfg.train.seed)[step]


def test_gradients_reach_adapter_and_connector_but_mllm_never_changes(tiny_config):
    cfg = tiny_config("train.cond_dropout=0.0")
    model = IOMM.from_config(cfg)
    before = {k: v.clone() for k, v in model.mllm.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    batch = _batch(cfg)
    loss = model.loss(batch.images, batch.captions, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.adapter.queries.grad is not None and model.adapter.queries.grad.abs().sum() > 0
    assert model.adapter.attn.in_proj_weight.grad.abs().sum() > 0
    assert model.connector.proj_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.mllm.parameters())
    optimizer.step()
    after = model.mllm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    assert not model.mllm.model.training


def test_image_condition_depends_on_the_image_and_mask(tiny_config):
    model = IOMM.from_config(tiny_config("masking.ratio=0.5"))
    images = _batch(tiny_config()).images
    a = model.condition_masked_images(images, torch.Generator().manual_seed(0)).tokens
    b = model.condition_masked_images(images, torch.Generator().manual_seed(0)).tokens
    c = model.condition_masked_images(images, torch.Generator().manual_seed(1)).tokens
    d = model.condition_masked_images(images.flip(0), torch.Generator().manual_seed(0)).tokens
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_a_masked_condition_returns_the_mask_it_drew(tiny_config):
    """As MAE's random_masking returns its mask: the keep mask is the one drawn from the generator's first draw,
    and the tokens it masks are the ones the LLM saw zeroed."""
    model = IOMM.from_config(tiny_config("masking.ratio=0.5"))
    images = _batch(tiny_config()).images
    cond = model.condition_masked_images(images, torch.Generator().manual_seed(0))
    tokens = model.image_tokens(images)
    drawn = random_keep_mask(*tokens.shape[:2], 0.5, min_keep=model.cfg.masking.min_keep,
                             generator=torch.Generator().manual_seed(0))
    assert cond.keep.dtype == torch.bool and torch.equal(cond.keep, drawn) and 0 < cond.keep.float().mean() < 1
    seen = model.image_segment(tokens, cond.keep).embeds
    assert torch.equal(seen[~cond.keep], torch.zeros_like(seen[~cond.keep]))
    assert torch.equal(seen[cond.keep], tokens[cond.keep])
    assert model.condition_masked_images(images, None, ratio=0.0).keep.all()


def test_drop_mode_matches_zero_mode_shapes_and_runs(tiny_config):
    model = IOMM.from_config(tiny_config("masking.mode=drop"))
    batch = _batch(tiny_config())
    cond = model.condition_masked_images(batch.images, torch.Generator().manual_seed(0))
    assert cond.tokens.shape == (4, 4, 32) and torch.isfinite(cond.tokens).all()


def test_baseline_adapters_build_and_run(tiny_config):
    for kind in ("raw", "free_queries"):
        model = IOMM.from_config(tiny_config(f"adapter.kind={kind}", "data.pairs=world:16", "train.mix_ratio=0.5"))
        batch = _batch(model.cfg)
        loss = model.loss(batch.images, batch.captions, torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss)
        assert model.connector.proj_in.weight.grad is not None


def test_samples_per_condition_reuses_each_condition_for_several_draws(tiny_config):
    cfg = tiny_config("flow.samples_per_condition=3", "train.cond_dropout=0.0")
    model = IOMM.from_config(cfg)
    seen = []
    model.generator.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    batch = _batch(cfg)
    model.loss(batch.images, batch.captions, torch.Generator().manual_seed(0)).backward()
    latents, tokens = seen[0]["hidden_states"], seen[0]["encoder_hidden_states"]
    assert latents.shape[0] == tokens.shape[0] == 3 * batch.images.shape[0]
    assert not torch.equal(latents[0], latents[1])  # one image, two (noise, t) draws
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[2], tokens[3])
    assert model.adapter.queries.grad.abs().sum() > 0


def test_building_a_builtin_model_leaves_the_random_state_alone(tmp_path):
    """A run whose cache is cold (the built-in model is trained first) starts from the same weights as a warm one."""
    from iomm.model import ensure_builtin
    from iomm.registry import BuiltinModel

    def train_then_return(cfg):
        torch.nn.Linear(64, 64)  # training draws random numbers
        torch.rand(1000)
        return tmp_path

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert ensure_builtin(BuiltinModel(ensure=train_then_return, architecture=lambda cfg: None), None) == str(tmp_path)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torch_distributed_rank_0_builds_a_builtin_while_the_others_wait(rank, monkeypatch):
    from iomm import model as model_module
    from iomm.registry import BuiltinModel

    events: list[str] = []
    monkeypatch.setattr(model_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(model_module.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(model_module.dist, "barrier", lambda: events.append("barrier"))
    builtin = BuiltinModel(ensure=lambda cfg: events.append("build") or "dir", architecture=lambda cfg: None)
    assert model_module.ensure_builtin(builtin, None) == "dir"
    assert events == (["build", "barrier"] if rank == 0 else ["barrier", "build"])  # the others find it built
