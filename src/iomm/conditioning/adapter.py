"""Residual Query Adapter (RQA) and the two ablation baselines of the paper.

Every adapter turns a packed condition sequence `c` into the tokens appended to it before the frozen
LLM (`None` for `raw`: the LLM output of `c` itself is the condition). Query outputs are RMS-normalised
to the LLM's input-embedding scale, so that the queries are not swamped by (or swamp) the condition tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from iomm.conditioning.sequence import sincos_positions
from iomm.config import AdapterConfig

MAX_POSITIONS = 4096  # condition positions a position embedding covers (256 image tokens + a long prompt fit)


class ResidualQueryAdapter(nn.Module):
    """N learned queries in one pre-norm cross-attention transformer block over the condition sequence."""

    def __init__(self, width: int, num_queries: int, num_heads: int, mlp_ratio: float, embed_scale: float,
                 key_positions: bool = False):
        super().__init__()
        self.key_positions = nn.Embedding(MAX_POSITIONS, width) if key_positions else None
        if self.key_positions is not None:
            with torch.no_grad():
                self.key_positions.weight.copy_(sincos_positions(MAX_POSITIONS, width))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * embed_scale)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.out_norm = nn.RMSNorm(width)
        nn.init.constant_(self.out_norm.weight, embed_scale)

    def forward(self, cond: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(cond.shape[0], -1, -1).to(cond.dtype)
        kv = self.norm_kv(cond)
        if self.key_positions is not None:
            if positions is None:
                raise ValueError("adapter.key_positions needs the condition's positions")
            kv = kv + self.key_positions(positions.clamp(max=MAX_POSITIONS - 1)).to(kv.dtype)
        x = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=~mask, need_weights=False)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return self.out_norm(x)


class FreeQueries(nn.Module):
    """MetaQuery-style learnable query tokens: no cross-attention, the LLM alone mixes them with `c`."""

    def __init__(self, width: int, num_queries: int, embed_scale: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * embed_scale)

    def forward(self, cond: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.queries.unsqueeze(0).expand(cond.shape[0], -1, -1).to(cond.dtype)


def build_adapter(cfg: AdapterConfig, width: int, embed_scale: float) -> nn.Module | None:
    scale = embed_scale * cfg.query_scale
    if cfg.kind == "rqa":
        return ResidualQueryAdapter(width, cfg.num_queries, cfg.num_heads, cfg.mlp_ratio, scale,
                                    key_positions=cfg.key_positions)
    if cfg.kind == "free_queries":
        return FreeQueries(width, cfg.num_queries, scale)
    return None
