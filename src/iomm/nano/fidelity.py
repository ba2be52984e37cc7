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
Per image, two floats as in the training sample grid (`iomm.evaluation.reconstruction`), on [0, 1] pixels:
- `mse_own`: the mean squared error of the regeneration to its own original;
- `mse_other`: the same to another original, the previous image of the set (`originals.roll(1, dims=0)`):
  a regeneration that follows its condition has `mse_own` well below `mse_other` (equal for n = 1).
`summarize` averages each over the images; `evaluate_reconstruction` gives one summary per ratio.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from iomm.image_tensors import to_tensor, to_uint8
from iomm.inference.sampling import sample_images
from iomm.nano.builtins import HELD_OUT_SEED, WORLD
from iomm.nano.scorer import Detection, detect_objects
from iomm.nano.world import SIZES, Scene, World, WorldConfig, WorldObject

if TYPE_CHECKING:
    from iomm.model import IOMM

TOLERANCE = 0.5  # of the object's extent: the largest centre distance at which a detection is in place
GRID = 3  # placement compares cells of a GRID x GRID grid
ATTRIBUTES = ("exact", "shape", "color", "count", "position", "placement")
BATCH = 32  # images regenerated at once


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


def held_out_scenes(model: IOMM, n: int) -> tuple[torch.Tensor, list[Scene]]:
    """The first n images of the world's held-out stream (the sample grid's originals first) and their scenes."""
    cfg = model.cfg
    if cfg.data.source != WORLD:
        raise ValueError(f"eval reconstruct: expected a run trained on data.source={WORLD!r} (scene metadata "
                         f"is needed), got data.source={cfg.data.source!r}")
    stream = World(WorldConfig(resolution=cfg.data.resolution, max_objects=cfg.data.world_max_objects)).images(
        HELD_OUT_SEED)
    drawn = [next(stream) for _ in range(n)]
    return to_tensor([image for image, _ in drawn]), [scene for _, scene in drawn]


@torch.no_grad()
def regenerate(model: IOMM, originals: torch.Tensor, ratio: float, seed: int, steps: int | None = None,
               guidance_scale: float | None = None) -> torch.Tensor:
    """Regenerations (B, 3, R, R) in [0, 1] of originals from their stage-1 condition masked at `ratio`."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a value in [0, 1), got {ratio}")
    cfg = model.cfg
    steps = steps or cfg.flow.sample_steps
    scale = cfg.flow.guidance_scale if guidance_scale is None else guidance_scale
    device = next(model.generator.parameters()).device
    masks = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    model.cfg = dataclasses.replace(cfg, masking=dataclasses.replace(cfg.masking, ratio=ratio))
    try:
        out = []
        for chunk, start in enumerate(range(0, originals.shape[0], BATCH)):
            cond = model.condition_masked_images(originals[start:start + BATCH].to(device), masks)
            out.append(sample_images(model, cond, seed=seed + chunk, steps=steps, guidance_scale=scale).cpu())
    finally:
        model.cfg = cfg
        model.train(was_training)
    return torch.cat(out)


def records_for(scenes: Sequence[Scene], originals: torch.Tensor, recon: torch.Tensor) -> list[dict[str, Any]]:
    """One record per image: the `compare` attributes plus `mse_own` and `mse_other`."""
    resolution = originals.shape[-1]
    own = ((recon - originals) ** 2).mean(dim=(1, 2, 3))
    other = ((recon - originals.roll(1, dims=0)) ** 2).mean(dim=(1, 2, 3))
    return [{**compare(scene, image, resolution), "mse_own": float(own[i]), "mse_other": float(other[i])}
            for i, (scene, image) in enumerate(zip(scenes, to_uint8(recon)))]


def default_ratios(model: IOMM) -> list[float]:
    """0 (the whole image) and the run's training ratio `masking.ratio`."""
    return sorted({0.0, float(model.cfg.masking.ratio)})


def evaluate_reconstruction(model: IOMM, ratios: Sequence[float] | None = None, n: int = 64, seed: int = 0, *,
                            steps: int | None = None, guidance_scale: float | None = None) -> dict[float, dict]:
    """{ratio: summary} of the first n held-out world images regenerated at each masking ratio.

    Masks and noise come from `seed` (the same for each ratio); the images are fixed (the held-out stream).
    """
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    ratios = default_ratios(model) if ratios is None else [float(r) for r in ratios]
    originals, scenes = held_out_scenes(model, n)
    return {ratio: summarize(records_for(scenes, originals, regenerate(model, originals, ratio, seed, steps,
                                                                         guidance_scale)))
            for ratio in ratios}
