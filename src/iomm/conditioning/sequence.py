"""Condition sequences of variable length, packed for a causal LLM.

A condition is a list of segments (text embeddings, image embeddings) whose valid tokens are
concatenated per sample. Sequences are left padded so that the query tokens appended after them
sit right after the last real token; position ids count every token of the unpacked layout, so
tokens removed by `drop` masking keep the positions they had.

An image segment with a `grid` also gets the 3-D rotary positions of Qwen2.5-VL's language model (time, row,
column), laid out as its `get_rope_index` lays them out: the image's tokens at (s, s + row, s + column), the text
after it from s + max(rows, columns) on.
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
    grid: tuple[int, int] | None = None  # (rows, columns) of an image's tokens, for 3-D rotary positions


@dataclass
class Packed:
    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) long
    rope: torch.Tensor | None = None  # (3, B, L) long: 3-D rotary positions, where a segment has a grid

    @property
    def llm_positions(self) -> torch.Tensor:
        """What the language model takes: the 3-D rotary positions where there are any, else the 1-D ones."""
        return self.positions if self.rope is None else self.rope

    @property
    def next_position(self) -> torch.Tensor:
        """(B,) the LLM position after the last valid token (on every rotary axis)."""
        last = self.llm_positions.masked_fill(~self.mask, -1).amax(dim=-1)  # (B,), or (3, B) with rotary ones
        return (last if self.rope is None else last.amax(dim=0)) + 1


def pack_left(segments: list[Segment]) -> Packed:
    embeds = torch.cat([s.embeds for s in segments], dim=1)
    valid = torch.cat([s.valid for s in segments], dim=1)
    counts = torch.cat([s.valid if s.counts_position is None else s.counts_position for s in segments], dim=1)
    positions = counts.long().cumsum(dim=1) - 1
    length = int(valid.sum(dim=1).max().item()) if valid.numel() else 0
    # A stable sort of ~valid puts invalid tokens first and keeps valid tokens in order: left padding.
    order = torch.sort((valid.long()), dim=1, stable=True).indices[:, valid.shape[1] - length:]
    gather = order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    rope = None
    if any(s.grid is not None for s in segments):
        rope = _rope_positions(segments).gather(2, order.unsqueeze(0).expand(3, -1, -1)).clamp(min=0)
    return Packed(embeds.gather(1, gather), valid.gather(1, order), positions.gather(1, order).clamp(min=0), rope)


def _rope_positions(segments: list[Segment]) -> torch.Tensor:
    """(3, B, L) rotary positions of the unpacked layout: text on the diagonal, an image on its grid."""
    batch = segments[0].embeds.shape[0]
    start = torch.zeros(batch, 1, dtype=torch.long, device=segments[0].embeds.device)
    parts = []
    for s in segments:
        counts = s.valid if s.counts_position is None else s.counts_position
        if s.grid is None:
            parts.append((start + counts.long().cumsum(dim=1) - 1).unsqueeze(0).expand(3, -1, -1))
            start = start + counts.long().sum(dim=1, keepdim=True)
            continue
        rows, columns = s.grid
        k = torch.arange(s.embeds.shape[1], device=start.device)
        parts.append(torch.stack([start.expand(-1, len(k)), start + k // columns, start + k % columns]))
        start = start + max(rows, columns)
    return torch.cat(parts, dim=2)


def positions_after(packed: Packed, n: int) -> torch.Tensor:
    """LLM positions of `n` tokens appended after the packed condition: (B, n), or (3, B, n) with rotary ones."""
    after = packed.next_position.unsqueeze(1) + torch.arange(n, device=packed.positions.device)
    return after if packed.rope is None else after.unsqueeze(0).expand(3, -1, -1)


def keep_first(tokens: torch.Tensor, mask: torch.Tensor, drop: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid tokens after its first `drop`, moved to the front (right padded), and their mask."""
    keep = mask & (mask.long().cumsum(dim=1) > drop)
    length = int(keep.sum(dim=1).max().item()) if keep.numel() else 0
    order = torch.sort((~keep).long(), dim=1, stable=True).indices[:, :length]
    gathered = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return gathered, keep.gather(1, order)


def sincos_positions(n: int, width: int) -> torch.Tensor:
    """(n, width) Transformer sin-cos embeddings of positions 0..n-1 (RMS about 0.7): the start of the
    learned position embeddings, so that positions are told apart from the first step."""
    position = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(n, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table
