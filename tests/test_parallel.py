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
