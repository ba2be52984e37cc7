"""The loss of held-out pairs, logged next to the training loss in stage 2: a pair set small enough to be
memorised shows as a held-out loss that stops falling, or climbs, while the training loss goes on down.

It is the training objective of pair rows, under their own captions (no condition dropout). Each row's noise,
timestep and posterior sample come from a generator seeded by the run's seed and the row alone, made anew for
every evaluation: each step's value scores the same draws, so the curve compares one model with the next.
"""

from __future__ import annotations

import torch

from iomm.data.mixed_batches import Batch
from iomm.per_sample_rng import sample_generators
from iomm.training.parallel import Forward

# Seeds the held-out rows' draws as if they were a step's: one no run reaches, so no training sample shares them.
HELD_OUT_STEP = 2**62


@torch.no_grad()
def held_out_loss(forward: Forward, pairs: Batch, seed: int, chunk: int, device: torch.device) -> float:
    """Mean loss over the held-out pairs, `chunk` rows per forward. Under DDP or FSDP every rank calls it on all
    the pairs (its forwards are collective there), so every rank gets the same value."""
    total, rows = 0.0, len(pairs.captions)
    for start in range(0, rows, chunk):
        chunk_rows = range(start, min(start + chunk, rows))
        generators = sample_generators(seed, HELD_OUT_STEP, 0, chunk_rows)
        images = pairs.images[start:chunk_rows.stop].to(device)
        loss = forward(images, pairs.captions[start:chunk_rows.stop], generators, cond_dropout=0.0)
        total += float(loss) * len(chunk_rows)  # the rows' mean: a chunk's loss is the mean of its rows
    return total / rows
