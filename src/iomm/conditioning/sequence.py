"""Condition sequences of variable length, packed for a causal LLM.

A condition is a list of segments (text embeddings, image embeddings) whose valid tokens are
concatenated per sample. Sequences are left padded so that the query tokens appended after them
sit right after the last real token; position ids count every token of the unpacked layout, so
tokens removed by `drop` masking keep the positions they had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Segment:
    embeds: torch.Tensor  # (B, L, D)
    valid: torch.Tensor  # (B, L) bool: present in the sequence
    counts_position: torch.Tensor | None = None  # (B, L) bool: occupies a position even if absent (drop mode)


@dataclass
class Packed:
    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) long

    @property
    def next_position(self) -> torch.Tensor:
        return (self.positions.masked_fill(~self.mask, -1).amax(dim=1) + 1).clamp(min=0)


def pack_left(segments: list[Segment]) -> Packed:
    embeds = torch.cat([s.embeds for s in segments], dim=1)
    valid = torch.cat([s.valid for s in segments], dim=1)
    counts = torch.cat([s.valid if s.counts_position is None else s.counts_position for s in segments], dim=1)
    positions = counts.long().cumsum(dim=1) - 1
    length = int(valid.sum(dim=1).max().item()) if valid.numel() else 0
    # A stable sort of ~valid puts invalid tokens first and keeps valid tokens in order: left padding.
    order = torch.sort((valid.long()), dim=1, stable=True).indices[:, valid.shape[1] - length:]
    gather = order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    return Packed(embeds.gather(1, gather), valid.gather(1, order), positions.gather(1, order).clamp(min=0))


def positions_after(packed: Packed, n: int) -> torch.Tensor:
    """(B, n) positions of `n` tokens appended after the packed condition."""
    return packed.next_position.unsqueeze(1) + torch.arange(n, device=packed.positions.device)


def sincos_positions(n: int, width: int) -> torch.Tensor:
    """(n, width) Transformer sin-cos embeddings of positions 0..n-1 (RMS about 0.7): the start of the
    learned position embeddings, so that positions are told apart from the first step."""
    position = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(n, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table
