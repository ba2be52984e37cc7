"""Exact GenEval-style scorer for the nano world, by classical image analysis (numpy only).

Detection: background = median of the border pixels; a pixel is an object pixel when it is far
from the background and near one world colour (blurry edge pixels, between two colours, are
rejected); connected components per colour; a component is a shape when its bbox is roughly square
and its fill / mass profile match one: square fill ~1.0, disc ~0.8, upright triangle ~0.55 with
only ~1/3 of its mass in the top half.

Judging mirrors GenEval's `evaluation/evaluate_images.py` (`evaluate`): include items need at
least `count` detections of the class; colour and position are checked on the `count` most
confident detections of that class only; position uses GenEval's `relative_position` on bboxes
(threshold 0.1); any exclude item fails the prompt when `count` or more detections of its class
are found. The score per tag is the fraction of correct images; `overall` is the mean over the
tags present (GenEval's `summary_scores.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iomm.evaluation.prompt_images import image_entries, read_jsonl
from iomm.nano.world import COLORS, COMPOSITION_KINDS, COMPOSITIONS, GENEVAL_TAGS, relative_position, validate_prompt

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)
MIN_ALPHA, MAX_ALPHA = 0.5, 1.6  # a pixel's position along the background -> colour segment
MAX_RESIDUAL = 60.0  # RGB distance from that line; between two world colours it is >= ~100
MIN_AREA_FRACTION = 0.012  # of the image area: 12 px at 32 px (a small triangle has ~49 px)
MAX_ASPECT = 1.5
TRIANGLE_MAX_TOP_MASS = 0.42  # share of the mass in the bbox's top half: triangle <= 0.40, others >= 0.45
SQUARE_MIN_CORNERS = 0.25  # covered share of the bbox outside the inscribed disc: square >= 0.4, disc <= 0.1
MIN_FILL = 0.6  # discs and squares fill >= 0.73 of their bbox even blurred


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 with x1 = x0 + width
    score: float  # shape-fit margin in [0, 1]; orders detections like a detector's confidence


def _to_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image: expected an HxWx3 array or a PIL image, got shape {array.shape}")
    array = array[..., :3].astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and array.max() <= 1.0:
        array *= 255.0
    return array


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: (labels with 0 = background, count).

    Min-label propagation with pointer jumping; numpy only, so no scipy dependency.
    """
    h, w = mask.shape
    sentinel = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), sentinel)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new[~mask] = sentinel
        flat = np.append(new.ravel(), sentinel)
        new = flat[flat[new]]  # jump to the label's own label: halves the remaining distance
        if np.array_equal(new, labels):
            break
        labels = new
    roots, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(h, w) + 1
    inverse[~mask] = 0
    return inverse, int(np.sum(roots < sentinel))


def _inscribed_disc(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2 <= 1.0


def _classify(component: np.ndarray) -> tuple[str, float] | None:
    """(shape, score) of a component cropped to its bbox, or None when it is no world shape.

    Features: the share of the mass in the bbox's top half (upright triangle ~0.3, disc and
    square 0.5) and how much of the bbox outside the inscribed disc is covered (square ~1, disc ~0);
    both stay well apart under blur, unlike the plain fill ratio.
    """
    h, w = component.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return None
    area = component.sum()
    fill = area / (h * w)
    row_mass = component.sum(axis=1).astype(np.float64)
    top_mass = (row_mass[: h // 2].sum() + (row_mass[h // 2] / 2 if h % 2 else 0.0)) / area
    outside = ~_inscribed_disc(h, w)
    corners = (component & outside).sum() / max(1, outside.sum())
    if top_mass < TRIANGLE_MAX_TOP_MASS:
        return ("triangle", min(1.0, (TRIANGLE_MAX_TOP_MASS - top_mass) / 0.08)) if fill < 0.9 else None
    if fill < MIN_FILL:
        return None
    if corners >= SQUARE_MIN_CORNERS:
        return "square", min(1.0, (corners - SQUARE_MIN_CORNERS) / 0.2)
    return "circle", min(1.0, (SQUARE_MIN_CORNERS - corners) / 0.2)


def _assign_colors(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour index, assigned mask) per pixel.

    A pixel is modelled as a blend of the background and one world colour: alpha is its position
    along the background -> colour segment, the residual its distance from that line. Pixels with
    alpha >= 0.5 are inside the object: under blur the half-way contour is the true edge, so shapes
    keep their size and corners instead of eroding.
    """
    background = _background(pixels)
    offset = pixels - background
    directions = PALETTE - background  # (K, 3)
    alpha = offset @ directions.T / np.maximum((directions ** 2).sum(axis=1), 1.0)
    residual = np.linalg.norm(offset[:, :, None] - alpha[..., None] * directions, axis=-1)
    valid = (alpha >= MIN_ALPHA) & (alpha <= MAX_ALPHA) & (residual < MAX_RESIDUAL)
    residual = np.where(valid, residual, np.inf)
    return residual.argmin(axis=-1), valid.any(axis=-1)


def detect_objects(image: Any) -> list[Detection]:
    """World shapes in an image (uint8 HxWx3 array, float array in [0, 1], or PIL image),
    most confident first."""
    pixels = _to_array(image)
    h, w, _ = pixels.shape
    nearest, assigned = _assign_colors(pixels)
    min_area = MIN_AREA_FRACTION * h * w
    detections = []
    for color_index in np.unique(nearest[assigned]):
        labels, count = label_components(assigned & (nearest == color_index))
        for index in range(1, count + 1):
            ys, xs = np.nonzero(labels == index)
            if ys.size < min_area:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            shape = _classify(labels[y0:y1, x0:x1] == index)
            if shape is not None:
                detections.append(Detection(shape[0], COLOR_NAMES[color_index], float(xs.mean() + 0.5),
                                            float(ys.mean() + 0.5), int(ys.size),
                                            (int(x0), int(y0), int(x1), int(y1)), float(shape[1])))
    return sorted(detections, key=lambda d: (-d.score, -d.area))


def _evaluate(objects: dict[str, list[Detection]], meta: Mapping[str, Any]) -> tuple[bool, str]:
    """GenEval's `evaluate` on detections grouped by class (each list most confident first)."""
    correct, reason, matched_groups = True, [], []
    for req in meta.get("include", []):
        classname, count = req["class"], req["count"]
        found = objects.get(classname, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(f"expected {req['color']} {classname}>={count}, found "
                                  f"{colors.count(req['color'])} {req['color']}; and "
                                  + ", ".join(f"{colors.count(c)} {c}" for c in COLOR_NAMES if c in colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                targets = matched_groups[target_group]
                if targets is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in targets:
                            true_rels = relative_position(obj.bbox, target.bbox)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {classname} {expected_rel} target, found "
                                              f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        found = objects.get(req["class"], [])
        if len(found) >= req["count"]:
            correct = False
            reason.append(f"expected {req['class']}<{req['count']}, found {len(found)}")
    return correct, "\n".join(reason)


def judge_detections(detections: list[Detection], meta: Mapping[str, Any]) -> tuple[bool, str]:
    """(pass, reason) for detections (most confident first) against one GenEval-style prompt dict."""
    validate_prompt(meta)
    objects: dict[str, list[Detection]] = {}
    for detection in detections:
        objects.setdefault(detection.shape, []).append(detection)
    return _evaluate(objects, meta)


def judge(image: Any, meta: Mapping[str, Any]) -> tuple[bool, str]:
    """(pass, reason) for one image against one GenEval-style prompt dict."""
    return judge_detections(detect_objects(image), meta)


def _tally(passes: list[bool]) -> dict[str, Any]:
    return {"n": len(passes), "passed": int(sum(passes)),
            "accuracy": float(np.mean(passes)) if passes else None}


def score(results: Iterable[tuple[Mapping[str, Any], bool]]) -> dict[str, Any]:
    """Per-tag accuracy over images, `overall` = mean over GenEval's tags present, counts per tag, for the
    colour-bearing tags the split between held-out and seen combinations, and for the held-out compositions
    (tag `compositions`, not part of `overall`) the accuracy per kind and their mean."""
    by_tag: dict[str, list[bool]] = {}
    split: dict[str, list[bool]] = {"held_out": [], "seen": []}
    by_kind: dict[str, list[bool]] = {}
    for meta, passed in results:
        by_tag.setdefault(meta["tag"], []).append(bool(passed))
        if meta["tag"] in ("colors", "color_attr") and "held_out" in meta:
            split["held_out" if meta["held_out"] else "seen"].append(bool(passed))
        if meta["tag"] == COMPOSITIONS:
            by_kind.setdefault(meta.get("kind", "unknown"), []).append(bool(passed))
    tags = [tag for tag in GENEVAL_TAGS if tag in by_tag] + [tag for tag in by_tag if tag not in GENEVAL_TAGS]
    metrics: dict[str, Any] = {tag: float(np.mean(by_tag[tag])) for tag in tags}
    geneval = [tag for tag in tags if tag in GENEVAL_TAGS]
    metrics["overall"] = float(np.mean([metrics[tag] for tag in geneval])) if geneval else 0.0
    metrics["counts"] = {tag: {"n": len(by_tag[tag]), "passed": int(sum(by_tag[tag]))} for tag in tags}
    metrics["colors_held_out"] = _tally(split["held_out"])
    metrics["colors_seen"] = _tally(split["seen"])
    if by_kind:
        kinds = [kind for kind in COMPOSITION_KINDS if kind in by_kind] + sorted(set(by_kind) - {*COMPOSITION_KINDS})
        for kind in kinds:
            metrics[f"{COMPOSITIONS}_{kind}"] = float(np.mean(by_kind[kind]))
        metrics[COMPOSITIONS] = float(np.mean([metrics[f"{COMPOSITIONS}_{kind}"] for kind in kinds]))
    return metrics


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt dicts from a JSONL file, each validated (errors name the file and line)."""
    prompts = []
    for source, meta in read_jsonl(Path(path)):
        validate_prompt(meta, source)
        prompts.append(meta)
    return prompts


def judge_directory(images_dir: str | Path) -> list[dict[str, Any]]:
    """One record per image: filename, tag, prompt, correct, reason, metadata."""
    records = []
    for source, meta, paths in image_entries(Path(images_dir)):
        validate_prompt(meta, source)
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{source}: image {path} does not exist")
            with Image.open(path) as image:
                correct, reason = judge(image, meta)
            records.append({"filename": str(path), "tag": meta["tag"], "prompt": meta.get("prompt"),
                            "correct": correct, "reason": reason,
                            "metadata": {k: v for k, v in meta.items() if k != "images"}})
    return records


def score_directory(images_dir: str | Path) -> dict[str, Any]:
    """Metrics (see `score`) for a folder written by `save_prompt_images` or in GenEval's layout."""
    records = judge_directory(images_dir)
    return score((r["metadata"], r["correct"]) for r in records)

