"""Random draws made row by row: one torch.Generator per sample, diffusers' `list[torch.Generator]` convention.

Training seeds each sample's generator from its global index in the batch (never from the rank), so every
mask, condition dropout, posterior sample, noise and timestep of a global batch is the same at any world
size, and a resume at another world size continues the same stream. A single generator (or None) draws the
whole batch at once, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Generators = torch.Generator | list[torch.Generator] | None


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro-step, sample); stable across processes and runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def in_stream(parts: tuple[int, ...], stream: int) -> tuple[int, ...]:
    """The seed parts of a draw in a run's `stream`: a run started from another run's weights draws its own
    (the trainer's `_continue_from`); stream 0 keeps the parts as they were, so stage 1 draws as it always did."""
    return parts if stream == 0 else (*parts, stream)


def sample_generators(seed: int, step: int, micro_step: int, rows: range, stream: int = 0) -> list[torch.Generator]:
    """The generators of the samples at global indices `rows` of micro-batch `micro_step` of `step`, in the run's
    `stream` (`in_stream`)."""
    parts = in_stream((seed, step, micro_step), stream)
    return [torch.Generator().manual_seed(step_seed(*parts, row)) for row in rows]


def _draw(fn: Callable[..., torch.Tensor], shape: Sequence[int], generator: Generators) -> torch.Tensor:
    return per_row(lambda n, g: fn((n, *shape[1:]), generator=g), shape[0], generator)


def rand(shape: Sequence[int], generator: Generators) -> torch.Tensor:
    """Uniform [0, 1) of `shape` (on the CPU: the same values on any accelerator)."""
    return _draw(torch.rand, shape, generator)


def randn(shape: Sequence[int], generator: Generators) -> torch.Tensor:
    """Standard normal of `shape` (on the CPU)."""
    return _draw(torch.randn, shape, generator)


def per_row(fn: Callable[[int, torch.Generator | None], torch.Tensor], batch: int,
            generator: Generators) -> torch.Tensor:
    """`fn(batch, generator)` for a single generator, else `fn(1, g)` for each row's g, concatenated."""
    if not isinstance(generator, list):
        return fn(batch, generator)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch} rows")
    return torch.cat([fn(1, g) for g in generator]) if generator else fn(0, None)


def select(generator: Generators, rows: Sequence[int]) -> Generators:
    """The generators of `rows` (a single generator is shared by any subset)."""
    return [generator[i] for i in rows] if isinstance(generator, list) else generator


def repeat_rows(generator: Generators, times: int) -> Generators:
    """Each row's generator `times` times in a row (for `repeat_interleave`d rows)."""
    return [g for g in generator for _ in range(times)] if isinstance(generator, list) else generator
