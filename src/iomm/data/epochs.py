"""Epochs over a finite sample set: which item each position of a run's sample stream reads.

Epoch e is a permutation of all items drawn from (seed, stream, e); position p reads item k of epoch e
(e, k = divmod(p, n)). The stream is global: the ranks share each batch's positions (`MixedBatches`), so
across the ranks an epoch visits each item exactly once, and the position alone fixes the item: a run
resumed at a saved position reads what the uninterrupted run would have read, at any world size.
"""

from __future__ import annotations

import numpy as np

IMAGE_STREAM, PAIR_STREAM = 0, 1  # the two sample sets of a run shuffle independently


class EpochOrder:
    def __init__(self, n: int, seed: int, stream: int = IMAGE_STREAM):
        if n < 1:
            raise ValueError("an epoch needs at least one sample")
        self.n, self.seed, self.stream = n, seed, stream
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def epoch(self, position: int) -> int:
        return position // self.n

    def item(self, position: int) -> int:
        """The item (0 .. n-1) at `position` of the stream."""
        epoch, k = divmod(position, self.n)
        if epoch != self._epoch:  # one permutation in memory at a time: 8 bytes an item
            self._order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._order[k])
