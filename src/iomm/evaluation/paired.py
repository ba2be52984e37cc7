"""Paired comparison of two arms evaluated on the same items (same prompts, same noise, same seeds).

Each item belongs to a category (a GenEval tag) and a cluster (its prompt, or its scene): the several
images of one prompt share the prompt's difficulty, so the bootstrap resamples clusters, and within each
resampled cluster its images. The score of a category is the mean over its items; `overall` is the mean
over categories, as the GenEval score is.

Two levels of comparison:

- `paired_bootstrap`: one run per arm. Its 95% interval covers prompts and images, so it is about these two
  trained models, not their recipes: two training draws of one config differ by more than it allows.
- `seed_bootstrap`: the unit of replication is the training run (seed). Arm A's run of seed s is paired with
  arm B's run of seed s; a hierarchical bootstrap resamples seeds, then within each drawn seed its prompt
  clusters, then their images; a t-interval over the per-seed differences goes with it. One seed decides
  nothing ("one training run: not decided"); with >= 2 seeds (3 recommended) the difference is decided only
  when both intervals exclude 0 on the same side: with 2-3 seeds the percentile bootstrap over seeds cannot
  be wider than the range of the seed means, so the t-interval is what accounts for having few runs.

Verdicts: above 0, B is better ("b_better"); below 0, A is ("a_better"); otherwise "inconclusive".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

OVERALL = "overall"
NOT_DECIDED = "one training run: not decided"
# Two-sided 95% quantiles of Student's t for 1-9 degrees of freedom; above, a Cornish-Fisher expansion (< 0.01%).
T975_SMALL_DF = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)
Z975 = 1.959964
BOOTSTRAP_CELLS = 2_000_000  # resampled items held in memory at once


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


def seed_verdict(n_seeds: int, bootstrap_ci: Sequence[float], t_ci: Sequence[float] | None) -> str:
    """The seed-level rule: not decided with one run; otherwise both intervals must exclude 0 on one side."""
    if n_seeds < 2 or t_ci is None:
        return NOT_DECIDED
    verdicts = {verdict(*bootstrap_ci), verdict(*t_ci)}
    return verdicts.pop() if len(verdicts) == 1 else "inconclusive"


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"t quantile: degrees of freedom: expected >= 1, got {df}")
    if df <= len(T975_SMALL_DF):
        return T975_SMALL_DF[df - 1]
    z = Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t_interval(values: Sequence[float]) -> list[float] | None:
    """95% t-interval of the mean of `values` (one per seed); None for fewer than two."""
    if len(values) < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t_quantile_975(len(values) - 1) * sd / np.sqrt(len(values))
    return [float(mean - half), float(mean + half)]


def _category_arrays(items: Sequence[PairedItem]) -> dict[str, list[np.ndarray]]:
    """{category: [per-cluster array (n_items, 2) of (a, b)]}, in first-seen order."""
    grouped: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for item in items:
        grouped.setdefault(item.category, {}).setdefault(item.cluster, []).append((item.a, item.b))
    return {cat: [np.asarray(rows, dtype=np.float64) for rows in clusters.values()]
            for cat, clusters in grouped.items()}


def _resampled_means(clusters: list[np.ndarray], rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """(n_boot, 2) means of (a, b) over clusters drawn with replacement, and items within each."""
    sizes = np.array([len(c) for c in clusters])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(clusters)
    slots = np.arange(sizes.max())
    chunk = max(1, BOOTSTRAP_CELLS // (len(clusters) * len(slots)))
    out = []
    for done in range(0, n_boot, chunk):
        picked = rng.integers(0, len(clusters), size=(min(chunk, n_boot - done), len(clusters)))
        size = sizes[picked][..., None]
        within = np.floor(rng.random((*picked.shape, len(slots))) * size).astype(np.int64)
        used = slots < size  # a smaller cluster fills only its first `size` slots
        rows = flat[np.where(used, starts[picked][..., None] + within, 0)] * used[..., None]
        out.append(rows.sum(axis=(1, 2)) / sizes[picked].sum(axis=1)[:, None])
    return np.concatenate(out)


def _summary(a: float, b: float, boot_diff: np.ndarray, n: int) -> dict[str, Any]:
    low, high = (float(x) for x in np.percentile(boot_diff, [2.5, 97.5]))
    return {"n": n, "a": a, "b": b, "diff": b - a, "ci95": [low, high], "verdict": verdict(low, high)}


def _check(n_boot: int, where: str) -> None:
    if n_boot < 100:
        raise ValueError(f"{where}: n_boot: expected >= 100, got {n_boot}")


def paired_bootstrap(items: Sequence[PairedItem], n_boot: int = 2000, seed: int = 0,
                     outside_overall: Collection[str] = ()) -> dict[str, Any]:
    """{category: summary, ..., "overall": summary}; each summary holds a, b, diff = b - a, ci95, verdict.
    `overall` is the mean over the categories, less those in `outside_overall` (scored on their own)."""
    if not items:
        raise ValueError("paired_bootstrap: no items to compare")
    _check(n_boot, "paired_bootstrap")
    categories, point, boot = _run_replicates(items, np.random.default_rng(seed), n_boot)
    sizes = _category_sizes(items)
    result = {cat: _summary(float(point[c, 0]), float(point[c, 1]), boot[:, c, 1] - boot[:, c, 0], sizes[cat])
              for c, cat in enumerate(categories)}
    inside = _inside(categories, outside_overall)
    overall = boot[:, inside].mean(axis=1)
    means = point[inside].mean(axis=0)
    n = sum(sizes[categories[c]] for c in inside)
    result[OVERALL] = _summary(float(means[0]), float(means[1]), overall[:, 1] - overall[:, 0], n)
    return result


def _inside(categories: list[str], outside_overall: Collection[str]) -> list[int]:
    """The indices of the categories that `overall` averages."""
    inside = [c for c, cat in enumerate(categories) if cat not in outside_overall]
    if not inside:
        raise ValueError(f"no category left for {OVERALL!r}: every one of {categories} is outside it")
    return inside


def _category_sizes(items: Sequence[PairedItem]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for item in items:
        sizes[item.category] = sizes.get(item.category, 0) + 1
    return sizes


def _run_replicates(items: Sequence[PairedItem], rng: np.random.Generator,
                    n_boot: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One run's categories, its (category, 2) means of (a, b), and (n_boot, category, 2) resampled means."""
    arrays = _category_arrays(items)
    point = np.array([np.concatenate(clusters).mean(axis=0) for clusters in arrays.values()])
    boot = np.stack([_resampled_means(clusters, rng, n_boot) for clusters in arrays.values()], axis=1)
    return list(arrays), point, boot


def seed_bootstrap(runs: Mapping[str, Sequence[PairedItem]], n_boot: int = 2000, seed: int = 0,
                   outside_overall: Collection[str] = ()) -> dict[str, Any]:
    """{category: summary, ..., "overall": summary} from {training seed: the items of arm A's (a) and arm B's (b)
    runs of that seed}; `overall` averages the categories less `outside_overall`. Scores are means over seeds;
    each summary holds a, b, diff = b - a, per_seed (the differences), ci95 (hierarchical bootstrap: seeds,
    prompts, images), t_ci95 (over seeds; None for one), n_seeds, n and verdict (`seed_verdict`)."""
    if not runs or not all(runs.values()):
        raise ValueError("seed_bootstrap: no items to compare (every seed needs its items)")
    _check(n_boot, "seed_bootstrap")
    rng = np.random.default_rng(seed)
    replicates = {name: _run_replicates(items, rng, n_boot) for name, items in runs.items()}
    categories = next(iter(replicates.values()))[0]
    for name, (cats, _, _) in replicates.items():
        if sorted(cats) != sorted(categories):
            raise ValueError(f"seed_bootstrap: seed {name} has categories {cats}, another has {categories}: "
                             "every run must be evaluated on the same items")
    order = {name: [cats.index(c) for c in categories] for name, (cats, _, _) in replicates.items()}
    point = np.stack([replicates[name][1][order[name]] for name in runs])  # (seed, category, 2)
    inner = np.stack([replicates[name][2][:, order[name]] for name in runs])  # (seed, n_boot, category, 2)
    n_seeds = len(runs)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    # Each drawn seed takes an independent inner replicate: the same seed drawn twice is resampled twice.
    boot = inner[drawn, rng.integers(0, n_boot, size=(n_boot, n_seeds))].mean(axis=1)  # (n_boot, category, 2)
    sizes = [_category_sizes(items) for items in runs.values()]
    columns = [(cat, point[:, c], boot[:, c], sum(s[cat] for s in sizes)) for c, cat in enumerate(categories)]
    inside = _inside(categories, outside_overall)
    columns.append((OVERALL, point[:, inside].mean(axis=1), boot[:, inside].mean(axis=1),
                    sum(s[categories[c]] for s in sizes for c in inside)))
    result = {}
    for name, per_seed, resampled, n in columns:
        per_seed_diff = per_seed[:, 1] - per_seed[:, 0]
        summary = _summary(float(per_seed[:, 0].mean()), float(per_seed[:, 1].mean()),
                           resampled[:, 1] - resampled[:, 0], n)
        t_ci = t_interval(per_seed_diff.tolist())
        result[name] = {**summary, "n_seeds": n_seeds, "per_seed": dict(zip(runs, per_seed_diff.tolist())),
                        "t_ci95": t_ci, "verdict": seed_verdict(n_seeds, summary["ci95"], t_ci)}
    return result


def _check_lengths(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired comparison: the two result files have {len(a)} and {len(b)} items: "
                         "they must come from the same prompts and samples")


def shared_categories(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                      category: str) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], dict[str, str]]:
    """The records of the categories that both lists hold, and each category left out with where it is: an
    evaluation that scores an extra category (the nano world's held-out compositions) still pairs with one
    that does not, on what they share."""
    categories_a, categories_b = [{record.get(category) for record in rows} for rows in (a, b)]
    shared = categories_a & categories_b
    left_out = {str(name): f"only in {side} ({sum(record.get(category) == name for record in rows)} items)"
                for side, rows, own in (("A", a, categories_a), ("B", b, categories_b))
                for name in sorted(own - shared, key=str)}
    return [r for r in a if r.get(category) in shared], [r for r in b if r.get(category) in shared], left_out


def pair_records(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], value: str,
                 category: str | None, cluster: str | None) -> list[PairedItem]:
    """Items from two per-item result lists written in the same order by the same evaluation.

    Records are matched by position and must agree on `cluster` (and `category`): otherwise the two
    evaluations did not use the same items, and a paired comparison would be meaningless. With no
    `cluster` field every item is its own cluster.
    """
    _check_lengths(a, b)
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


def pair_runs(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], value: str, category: str | None,
              cluster: str | None, seed: str) -> dict[str, list[PairedItem]]:
    """{training seed: items} from two result lists whose records carry their run's seed in the field `seed`;
    records are matched by position, and a pair must come from the same seed."""
    _check_lengths(a, b)
    grouped: dict[str, tuple[list, list]] = {}
    for i, (ra, rb) in enumerate(zip(a, b)):
        if seed not in ra or seed not in rb:
            raise ValueError(f"paired comparison: item {i} has no field {seed!r}")
        if ra[seed] != rb[seed]:
            raise ValueError(f"paired comparison: item {i} differs in {seed!r}: {ra[seed]!r} vs {rb[seed]!r}: "
                             "arm A's run of a seed is paired with arm B's run of the same seed")
        rows = grouped.setdefault(str(ra[seed]), ([], []))
        rows[0].append(ra), rows[1].append(rb)
    return {name: pair_records(ra, rb, value, category, cluster) for name, (ra, rb) in grouped.items()}
