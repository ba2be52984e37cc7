"""Masking of image patch tokens (Algorithm 1, step 2): Bernoulli keep with probability 1 - r per token."""

from __future__ import annotations

import torch

from iomm.per_sample_rng import Generators, rand


def random_keep_mask(batch: int, num_tokens: int, ratio: float, *, min_keep: int = 1,
                     generator: Generators = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (batch, num_tokens): True where a token is kept.

    Each token is kept independently with probability 1 - ratio. With few image tokens a high ratio
    can mask a whole image; `min_keep` tokens (chosen at random) are then forced back on.
    """
    # Drawn on the CPU so runs are reproducible on any accelerator.
    noise = rand((batch, num_tokens), generator).to(device)
    keep = noise >= ratio
    if min_keep > 0:
        # The min_keep tokens with the highest noise are the most "nearly kept" ones: a uniform random choice.
        top = noise.topk(min(min_keep, num_tokens), dim=1).indices
        keep.scatter_(1, top, True)
    return keep


def zero_masked(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mode `zero` (the paper): masked tokens are zeroed in place."""
    return tokens * keep.unsqueeze(-1).to(tokens.dtype)
