"""Paired comparison of two evaluations of the same items (same prompts, same noise, same seeds).

Each item belongs to a category (a GenEval tag) and a cluster (its prompt, or its scene): the several
images of one prompt share the prompt's difficulty, so the bootstrap resamples clusters, and within each
resampled cluster its images. The score of a category is the mean over its items; `overall` is the mean
over categories, as the GenEval score is. The 95% interval of a difference (B - A) decides it: above 0,
B is better; below 0, A is; containing 0, the comparison is inconclusive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OVERALL = "overall"


@dataclass(frozen=True)
class PairedItem:
    category: str
    cluster: str
    a: float
    b: float


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "b_better"
    if high < 0:
        return "a_better"
    return "inconclusive"


def _category_arrays(items: Sequence[PairedItem]) -> dict[str, list[np.ndarray]]:
    """{category: [per-cluster array (n_items, 2) of (a, b)]}, in first-seen order."""
    grouped: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for item in items:
        grouped.setdefault(item.category, {}).setdefault(item.cluster, []).append((item.a, item.b))
    return {cat: [np.asarray(rows, dtype=np.float64) for rows in clusters.values()]
            for cat, clusters in grouped.items()}


def _resampled_means(clusters: list[np.ndarray], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot, 2) means of (a, b) over clusters drawn with replacement, and items within each."""
    out = np.empty((n_boot, 2))
    sizes = np.array([len(c) for c in clusters])
    for i in range(n_boot):
        picked = rng.integers(0, len(clusters), size=len(clusters))
        total = np.zeros(2)
        for j in picked:
            total += clusters[j][rng.integers(0, sizes[j], size=sizes[j])].sum(axis=0)
        out[i] = total / sizes[picked].sum()
    return out


def _summary(a: float, b: float, boot_diff: np.ndarray, n: int) -> dict[str, Any]:
    low, high = (float(x) for x in np.percentile(boot_diff, [2.5, 97.5]))
    return {"n": n, "a": a, "b": b, "diff": b - a, "ci95": [low, high], "verdict": verdict(low, high)}


def paired_bootstrap(items: Sequence[PairedItem], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{category: summary, ..., "overall": summary}; each summary holds a, b, diff = b - a, ci95, verdict."""
    if not items:
        raise ValueError("paired_bootstrap: no items to compare")
    if n_boot < 100:
        raise ValueError(f"paired_bootstrap: n_boot: expected >= 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {}
    boots = []
    for category, clusters in _category_arrays(items).items():
        stacked = np.concatenate(clusters)
        a, b = (float(x) for x in stacked.mean(axis=0))
        boot = _resampled_means(clusters, rng, n_boot)
        boots.append(boot)
        result[category] = _summary(a, b, boot[:, 1] - boot[:, 0], len(stacked))
    means = np.mean([[result[c]["a"], result[c]["b"]] for c in result], axis=0)
    overall = np.mean(boots, axis=0)
    result[OVERALL] = _summary(float(means[0]), float(means[1]), overall[:, 1] - overall[:, 0], len(items))
    return result


def pair_records(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], value: str,
                 category: str | None, cluster: str | None) -> list[PairedItem]:
    """Items from two per-item result lists written in the same order by the same evaluation.

    Records are matched by position and must agree on `cluster` (and `category`): otherwise the two
    evaluations did not use the same items, and a paired comparison would be meaningless. With no
    `cluster` field every item is its own cluster.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison: the two result files have {len(a)} and {len(b)} items: "
                         "they must come from the same prompts and samples")
    items = []
    for i, (ra, rb) in enumerate(zip(a, b)):
        for field in (cluster, category, value):
            if field is not None and (field not in ra or field not in rb):
                raise ValueError(f"paired comparison: item {i} has no field {field!r}")
        for field in (cluster, category):
            if field is not None and ra[field] != rb[field]:
                raise ValueError(f"paired comparison: item {i} differs in {field!r}: {ra[field]!r} vs "
                                 f"{rb[field]!r}: the two evaluations did not use the same items")
        items.append(PairedItem(str(ra[category]) if category else "all", str(ra[cluster]) if cluster else f"item{i}",
                                float(ra[value]), float(rb[value])))
    return items
