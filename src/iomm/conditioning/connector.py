"""Connector: a shallow transformer and projection from the LLM width to the generator's condition width, or none
(`connector.kind: identity`) for a generator with its own input layers for the LLM's states (Qwen-Image)."""

from __future__ import annotations

import torch
from torch import nn

from iomm.conditioning.sequence import sincos_positions
from iomm.config import ConnectorConfig

MAX_TOKENS = 4096  # condition tokens an index embedding covers


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, W), bool (B, L) -> (B, W): the mean over each row's valid tokens (the pooled condition)."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Connector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, in_width: int):
        super().__init__()
        self.width = cfg.width
        self.proj_in = nn.Linear(in_width, cfg.width)
        # Query tokens carry no index of their own: with token_positions each gets a learned one.
        self.token_positions = nn.Embedding(MAX_TOKENS, cfg.width) if cfg.token_positions else None
        if self.token_positions is not None:
            with torch.no_grad():
                self.token_positions.weight.copy_(sincos_positions(MAX_TOKENS, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.num_heads, 4 * cfg.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        # The null condition for classifier-free guidance: learned tokens, so dropped samples skip the LLM.
        self.null = nn.Parameter(torch.zeros(1, 1, cfg.width))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D_llm), bool (B, L) -> tokens (B, L, W), pooled (B, W)."""
        x = self.proj_in(hidden)
        if self.token_positions is not None:
            index = torch.arange(x.shape[1], device=x.device).clamp(max=MAX_TOKENS - 1)
            x = x + self.token_positions(index).to(x.dtype)
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        return x, masked_mean(x, mask)

    def null_condition(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.null.expand(batch, length, -1)
        return tokens, tokens[:, 0]


class IdentityConnector(nn.Module):
    """The LLM's hidden states are the condition tokens; pooled: their masked mean. No learned null condition."""

    def __init__(self, in_width: int):
        super().__init__()
        self.width = in_width

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden, masked_mean(hidden, mask)

    def null_condition(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros: the filler of rows no condition is written into (there is no condition dropout without a null)."""
        tokens = torch.zeros(batch, length, self.width)
        return tokens, tokens[:, 0]


def build_connector(cfg: ConnectorConfig, in_width: int) -> Connector | IdentityConnector:
    return IdentityConnector(in_width) if cfg.kind == "identity" else Connector(cfg, in_width)
