"""What `train.parallel` and friends set up, in one process: the FSDP2 policy and blocks, activation
checkpointing, and Muon's share of the parameters (tests/test_distributed.py runs them on two ranks)."""

import pytest
import torch
from torch import nn

from iomm.config import TrainConfig
from iomm.model import IOMM
from iomm.training import parallel
from iomm.training.optimizers import build_optimizers, muon_parameters
from iomm.training.parallel import distribute, fsdp_policy, generator_blocks


def test_fsdp_computes_in_bf16_and_reduces_in_fp32_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(parallel, "resolve_precision", lambda requested, device: "bf16")
    policy = fsdp_policy(TrainConfig(mixed_precision="auto"), "cuda")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    monkeypatch.setattr(parallel, "resolve_precision", lambda requested, device: "fp32")
    assert fsdp_policy(TrainConfig(mixed_precision="auto"), "cpu").param_dtype is None


# Tiny overrides of every generator kind (on top of tiny_config's), for the FSDP tests here and on two ranks.
TINY_GENERATORS = {
    "sd3": ("generator.kind=sd3",),
    "unet": ("generator.kind=unet", "generator.block_out_channels=[32,32]", "generator.attention_head_dim=16"),
    "zimage": ("generator.kind=zimage", "generator.attention_head_dim=16", "generator.refiner_layers=1"),
    "qwen_image": ("generator.kind=qwen_image", "generator.patch_size=2", "generator.attention_head_dim=32",
                   "generator.num_attention_heads=1"),
}


@pytest.mark.parametrize("kind", TINY_GENERATORS)
def test_generator_blocks_hold_every_no_split_module_once(tiny_config, kind):
    """fully_shard takes each parameter once: a listed class inside another (the U-Net's ResnetBlock2D in its
    CrossAttnUpBlock2D) is part of the outer block, never a block of its own."""
    generator = IOMM.from_config(tiny_config(*TINY_GENERATORS[kind])).generator
    blocks = generator_blocks(generator)
    inside = [id(m) for block in blocks for m in block.modules()]
    assert blocks and len(inside) == len(set(inside))  # no block inside another
    listed = [m for m in generator.modules() if type(m).__name__ in generator._no_split_modules]
    assert all(id(m) in inside for m in listed)
    if kind == "unet":
        assert [type(b).__name__ for b in blocks].count("CrossAttnUpBlock2D") == 2


def test_generator_blocks_are_the_diffusers_no_split_modules(tiny_config):
    model = IOMM.from_config(tiny_config("generator.num_layers=2"))
    blocks = generator_blocks(model.generator)
    assert [type(b).__name__ for b in blocks] == ["JointTransformerBlock"] * 2
    with pytest.raises(ValueError, match="names no blocks"):
        generator_blocks(nn.Linear(2, 2))


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config):
    images, captions = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), [None, "a", None, "b"]
    results = []
    for checkpointing in (False, True):
        cfg = tiny_config(f"train.activation_checkpointing={checkpointing}")
        torch.manual_seed(0)
        model = IOMM.from_config(cfg)
        forward = distribute(model, model.generator, cfg.train, 1, torch.device("cpu"))
        model.train()
        loss = forward(images, captions, torch.Generator().manual_seed(1))
        loss.backward()
        assert model.generator.gradient_checkpointing is checkpointing
        results.append((loss.detach(), [p.grad.clone() for p in model.generator.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and len(grads_a) == len(grads_b) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_config):
    cfg = tiny_config("train.optimizer=muon")
    model = IOMM.from_config(cfg)
    params = model.trainable_parameters()
    matrices = muon_parameters(model.generator, params)
    assert matrices and all(params[n].ndim == 2 and n.startswith("generator.transformer_blocks.") for n in matrices)
    muon, adamw = build_optimizers(params, model.generator, cfg.train)
    assert type(muon).__name__ == "Muon" and isinstance(adamw, torch.optim.AdamW)
    counts = [sum(len(g["params"]) for g in optimizer.param_groups) for optimizer in (muon, adamw)]
    assert counts[0] == len(matrices) and sum(counts) == len(params)
