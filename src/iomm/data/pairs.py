"""Text-image pairs from JSONL: one {"image": path, "caption": text} per line; paths may be relative to the file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iomm.data.images import DataReport


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


def _is_file(path: Path) -> bool:
    """Path.is_file that says False instead of raising for names no file can have (too long, NUL, surrogates)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_pairs(path: str | Path, report: DataReport | None = None) -> list[Pair]:
    """Valid pairs in file order; bad lines (not JSON, missing fields, empty caption, missing image,
    duplicates, non-UTF-8) are skipped and counted in `report`. A UTF-8 byte-order mark is ignored."""
    path = Path(path)
    report = report if report is not None else DataReport()
    pairs, seen = [], set()
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            line = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            report.bad(where, "caption file line is not UTF-8")
            continue
        except (json.JSONDecodeError, RecursionError):
            report.bad(where, "line is not JSON")
            continue
        if not isinstance(line, dict) or not isinstance(line.get("image"), str):
            report.bad(where, "line has no 'image' string")
            continue
        caption = line.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            report.bad(where, "empty or missing caption")
            continue
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800")
            report.bad(where, "caption file line is not UTF-8")
            continue
        image = Path(line["image"])
        image = image if image.is_absolute() else path.parent / image
        if not _is_file(image):
            report.bad(where, "image path does not exist")
            continue
        key = (str(image), caption.strip())
        if key in seen:
            report.bad(where, "duplicate line")
            continue
        seen.add(key)
        report.ok()
        pairs.append(Pair(image, caption.strip()))
    return pairs
