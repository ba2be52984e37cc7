"""Reconstruction fidelity on the nano world: does a stage-1 regeneration carry its own image?

A held-out world image is regenerated from its own stage-1 condition (the stage-1 prompt plus the image's
MLLM tokens, masked at ratio R), and the regeneration is compared with the original's scene metadata
through the shapes scorer's detector (`iomm.nano.scorer.detect_objects`).

Position tolerance: a detection is at an original object's place when the centre of its bbox lies within
`TOLERANCE` = 0.5 of the object's extent (Euclidean distance) of the object's centre: 4.5 px for a small
(9 px) and 6.5 px for a large (13 px) object at 32 px, twice that at 64 px. The bbox centre is used, not
the mass centroid, since a triangle's centroid sits extent / 6 below its bbox centre. Objects are laid
out with a gap, so a neighbouring object's centre is at least (e1 + e2) / 2 + gap away: a regeneration
that puts an object at a neighbour's place, or mirrors the layout, fails; blur, which keeps the half-way
contour (the detector's edge) in place, does not.

Per image (`compare`), each a bool:
- `exact`: the detections are exactly the original's multiset of (shape, colour) objects, each within
  tolerance: as many detections as objects and a one-to-one matching of objects to detections of the same
  shape and colour within tolerance (no extra, none missing).
- `shape`: the multiset of detected shapes equals the original's; `color`: the same for colours;
  `count`: as many detections as objects.
- `position`: every original object is matched one-to-one to a detection within tolerance, whatever its
  shape and colour (extra detections allowed).
- `placement`: the 3x3 grid cell of the centre of the largest detection (the largest bbox side, then the
  area) is the cell of an original object of the largest extent (any of them, when several share it).
Per image, two floats as in the training sample grid (`iomm.evaluation.sample_grid`), on [0, 1] pixels:
- `mse_own`: the mean squared error of the regeneration to its own original;
- `mse_other`: the same to another original, the previous image of the set (`originals.roll(1, dims=0)`):
  a regeneration that follows its condition has `mse_own` well below `mse_other` (equal for n = 1).
`summarize` averages each over the images; `evaluate_reconstruction` gives one summary per ratio.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from iomm.nano.scorer import Detection, detect_objects
from iomm.nano.world import SIZES, Scene, WorldObject

TOLERANCE = 0.5  # of the object's extent: the largest centre distance at which a detection is in place
GRID = 3  # placement compares cells of a GRID x GRID grid
ATTRIBUTES = ("exact", "shape", "color", "count", "position", "placement")


def tolerance_px(resolution: int) -> dict[str, float]:
    """The position tolerance in pixels per object size at a resolution."""
    return {size: TOLERANCE * int(round(frac * resolution)) for size, frac in SIZES.items()}


def _centre(detection: Detection) -> tuple[float, float]:
    x0, y0, x1, y1 = detection.bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _within(obj: WorldObject, detection: Detection) -> bool:
    cx, cy = _centre(detection)
    return math.hypot(cx - obj.cx, cy - obj.cy) <= TOLERANCE * obj.extent


def _matched(objects: Sequence[WorldObject], detections: Sequence[Detection],
             fits: Callable[[WorldObject, Detection], bool]) -> int:
    """Size of a largest one-to-one matching of objects to detections that `fits` (augmenting paths)."""
    owner = [-1] * len(detections)

    def augment(i: int, seen: set[int]) -> bool:
        for j, detection in enumerate(detections):
            if j not in seen and fits(objects[i], detection):
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(objects)))


def _cell(x: float, y: float, resolution: int) -> tuple[int, int]:
    def index(v: float) -> int:
        return min(GRID - 1, max(0, int(v * GRID / resolution)))

    return index(y), index(x)


def _placement(objects: Sequence[WorldObject], detections: Sequence[Detection], resolution: int) -> bool:
    if not objects or not detections:
        return not objects and not detections
    largest = max(o.extent for o in objects)
    cells = {_cell(o.cx, o.cy, resolution) for o in objects if o.extent == largest}
    top = max(detections, key=lambda d: (max(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]), d.area))
    return _cell(*_centre(top), resolution) in cells


def compare(scene: Scene, image: np.ndarray, resolution: int) -> dict[str, bool]:
    """How a regenerated image (uint8 HxWx3) reproduces an original scene: the attributes of the module doc."""
    if np.asarray(image).shape[:2] != (resolution, resolution):
        raise ValueError(f"compare: expected a {resolution}x{resolution} image, got shape {np.asarray(image).shape}")
    objects, detections = scene.objects, detect_objects(image)
    same = _matched(objects, detections, lambda o, d: o.shape == d.shape and o.color == d.color and _within(o, d))
    return {
        "exact": len(detections) == len(objects) and same == len(objects),
        "shape": Counter(o.shape for o in objects) == Counter(d.shape for d in detections),
        "color": Counter(o.color for o in objects) == Counter(d.color for d in detections),
        "count": len(detections) == len(objects),
        "position": _matched(objects, detections, _within) == len(objects),
        "placement": _placement(objects, detections, resolution),
    }


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of each key over per-image records (bools count as 0 / 1), plus `n`, the number of records."""
    records = list(records)
    if not records:
        raise ValueError("summarize: expected at least one record")
    keys = [key for key in records[0]]
    if any(set(r) != set(keys) for r in records):
        raise ValueError(f"summarize: expected every record to have the keys {keys}")
    summary: dict[str, Any] = {key: float(np.mean([float(r[key]) for r in records])) for key in keys}
    summary["n"] = len(records)
    return summary
