"""Epochs over a finite sample set: which item a rank reads at each position of its stream.

Epoch e is a permutation of all items drawn from (seed, stream, e). Rank r reads every `world`-th item of
it, starting at r, so across the ranks an epoch visits each item exactly once, and position p of a rank's
stream is item `share * e + k` of that rank's share (e, k = divmod(p, share)). The position alone fixes the
item: a run resumed at a saved position reads what the uninterrupted run would have read.
"""

from __future__ import annotations

import numpy as np

IMAGE_STREAM, PAIR_STREAM = 0, 1  # the two sample sets of a run shuffle independently


class EpochOrder:
    def __init__(self, n: int, seed: int, stream: int = IMAGE_STREAM, rank: int = 0, world: int = 1):
        if n < world:
            raise ValueError(f"{n} samples cannot be shared by {world} ranks: every rank needs at least one")
        self.n, self.seed, self.stream, self.rank, self.world = n, seed, stream, rank, world
        self.share = len(range(rank, n, world))
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def epoch(self, position: int) -> int:
        return position // self.share

    def item(self, position: int) -> int:
        """The item (0 .. n-1) at `position` of this rank's stream."""
        epoch, k = divmod(position, self.share)
        if epoch != self._epoch:  # one permutation in memory at a time: 8 bytes an item
            self._order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._order[self.rank + k * self.world])
