"""Positional options on the conditioning path (off by default, as in the paper): the RQA's keys can know
where each condition token is, and the connector's tokens can carry their index."""

import torch

from iomm.conditioning.adapter import build_adapter
from iomm.conditioning.connector import Connector
from iomm.config import AdapterConfig, ConnectorConfig
from iomm.training.trainer import Trainer


def _cond(b=2, n=6, width=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, n, width, generator=g), torch.ones(b, n, dtype=torch.bool), torch.arange(n).expand(b, n)


def test_the_paper_adapter_is_blind_to_token_order_and_key_positions_are_not():
    cond, mask, positions = _cond()
    order = torch.tensor([3, 1, 5, 0, 2, 4])
    torch.manual_seed(0)
    blind = build_adapter(AdapterConfig(num_queries=4, num_heads=2), 16, embed_scale=1.0)
    assert torch.allclose(blind(cond, mask, positions), blind(cond[:, order], mask, positions), atol=1e-5)
    torch.manual_seed(0)
    aware = build_adapter(AdapterConfig(num_queries=4, num_heads=2, key_positions=True), 16, embed_scale=1.0)
    with torch.no_grad():
        aware.key_positions.weight.normal_()
    change = (aware(cond, mask, positions) - aware(cond[:, order], mask, positions)).norm()
    assert change / aware(cond, mask, positions).norm() > 0.05


def test_connector_token_positions_make_its_output_depend_on_the_order():
    tokens, mask, _ = _cond(width=32)
    order = torch.tensor([5, 4, 3, 2, 1, 0])
    for on in (False, True):
        torch.manual_seed(0)
        connector = Connector(ConnectorConfig(num_layers=1, num_heads=2, width=16, token_positions=on), 32)
        if on:
            with torch.no_grad():
                connector.token_positions.weight.normal_()
        out, _ = connector(tokens, mask)
        permuted, _ = connector(tokens[:, order], mask)
        assert torch.allclose(out[:, order], permuted, atol=1e-5) != on  # plain: permutation-equivariant


def test_training_with_both_options_saves_and_reloads_them(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=2", "adapter.key_positions=true", "connector.token_positions=true")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.model.adapter.key_positions.weight.grad is not None
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    resumed.resume()
    for name in ("adapter.key_positions.weight", "connector.token_positions.weight"):
        assert torch.equal(dict(resumed.model.named_parameters())[name], dict(trainer.model.named_parameters())[name])


def test_query_scale_sets_the_rms_the_queries_start_at():
    cond, mask, positions = _cond()
    for kind in ("rqa", "free_queries"):
        for scale in (1.0, 47.0):
            torch.manual_seed(0)
            adapter = build_adapter(AdapterConfig(kind=kind, num_queries=64, num_heads=2, query_scale=scale), 16,
                                    embed_scale=0.1)
            rms = adapter(cond, mask, positions).pow(2).mean().sqrt().item()
            assert abs(rms - 0.1 * scale) < 0.02 * scale
