"""Indexes of a run's data made once: the main rank builds (or reads) the index, the other ranks read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def main_rank_builds(read: Callable[[], T | None], build: Callable[[], T], *, main: bool,
                     barrier: Callable[[], None]) -> T:
    """`read()` gives the stored index or None when it is missing or stale; `build()` makes and stores it.

    The main rank reads or builds before the barrier; every other rank reads after it (and builds for
    itself only if the data changed in between).
    """
    value = read() if main else None
    if main and value is None:
        value = build()
    barrier()
    if value is None:
        value = read()
    return value if value is not None else build()
