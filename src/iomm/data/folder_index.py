"""The file list of an image folder, made once per run and split into training files and a held-out set.

Rank 0 lists the folder and writes the list into the run directory; the other ranks read it. A later
run in the same directory (a resume) reuses the list while the folder's modification time is unchanged.
The held-out files (`data.holdout` of them, spread evenly over the sorted list) never enter training:
the sample grids regenerate them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iomm.data.images import list_images
from iomm.data.run_index import main_rank_builds

INDEX_FILE = "data_index.json"


@dataclass(frozen=True)
class HeldOutSplit:
    train: list
    held_out: list


def _mtime(root: Path) -> int:
    return os.stat(root).st_mtime_ns


def _read(index: Path, root: Path) -> list[Path] | None:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("root") != str(root.resolve()) or data.get("mtime_ns") != _mtime(root):
        return None
    return [Path(p) for p in data["files"]]


def indexed_images(root: str | Path, run_dir: Path | None, *, main: bool = True,
                   barrier: Callable[[], None] = lambda: None) -> list[Path]:
    """The sorted image files below `root`, listed by the main rank only (cached in `run_dir`)."""
    root = Path(root)
    if run_dir is None:
        return list_images(root)
    index = run_dir / INDEX_FILE

    def build() -> list[Path]:
        files = list_images(root)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps({"root": str(root.resolve()), "mtime_ns": _mtime(root),
                                       "files": [str(p) for p in files]}), encoding="utf-8")
            tmp.replace(index)
        return files

    return main_rank_builds(lambda: _read(index, root), build, main=main, barrier=barrier)


def split_held_out(files: list, n: int) -> HeldOutSplit:
    """`n` items spread evenly over the list are held out (fewer when the list is small); the rest train."""
    n = min(n, len(files) // 2)
    chosen = {round(i * (len(files) - 1) / max(n - 1, 1)) for i in range(n)} if n else set()
    return HeldOutSplit([p for i, p in enumerate(files) if i not in chosen],
                       [p for i, p in enumerate(files) if i in chosen])
