"""GenEval-style evaluation prompts for the nano world: the same number of prompts in each of GenEval's
six categories, in GenEval's metadata format (`tag`, `include`, `exclude`); half of the colour prompts
use a (colour, shape) combination that no training pair shows."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from iomm.nano.world import COLORS, GENEVAL_TAGS, RELATIONS, SHAPES, is_held_out, phrase


def _prompt(tag: str, include: list[dict], text: str, exclude: list[dict] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"tag": tag, "include": include}
    if exclude:
        meta["exclude"] = exclude
    meta["prompt"] = text
    meta["held_out"] = any(is_held_out(item.get("color"), item["class"]) for item in include)
    return meta


def _cycle(rng: np.random.Generator, options: list) -> Iterator:
    """Cycle through `options` in a fresh random order per pass (balanced and deterministic)."""
    while True:
        for index in rng.permutation(len(options)):
            yield options[index]


def _color_shape_combos(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if is_held_out(c, s) == held_out]


def _prompts_for(tag: str, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    distinct_pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        shapes = _cycle(rng, list(SHAPES))
        return [_prompt(tag, [{"class": s, "count": 1}], f"a photo of {phrase(1, None, s)}")
                for s in itertools.islice(shapes, n)]
    if tag == "two_object":
        pairs = _cycle(rng, distinct_pairs)
        return [_prompt(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}],
                        f"a photo of {phrase(1, None, a)} and {phrase(1, None, b)}")
                for a, b in itertools.islice(pairs, n)]
    if tag == "counting":
        combos = _cycle(rng, [(s, k) for s in SHAPES for k in (2, 3, 4)])
        return [_prompt(tag, [{"class": s, "count": k}], f"a photo of {phrase(k, None, s)}",
                        exclude=[{"class": s, "count": k + 1}])
                for s, k in itertools.islice(combos, n)]
    if tag == "colors":
        held, seen = _cycle(rng, _color_shape_combos(True)), _cycle(rng, _color_shape_combos(False))
        combos = [next(held if i % 2 == 0 else seen) for i in range(n)]
        return [_prompt(tag, [{"class": s, "count": 1, "color": c}], f"a photo of {phrase(1, c, s)}")
                for c, s in combos]
    if tag == "position":
        combos = _cycle(rng, [(a, b, r) for a, b in distinct_pairs for r in RELATIONS])
        return [_prompt(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}],
                        f"a photo of {phrase(1, None, a)} {r} {phrase(1, None, b)}")
                for a, b, r in itertools.islice(combos, n)]
    if tag == "color_attr":
        return [_color_attr_prompt(rng, held_out=i % 2 == 0) for i in range(n)]
    raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {list(GENEVAL_TAGS)}")


def _color_attr_prompt(rng: np.random.Generator, held_out: bool) -> dict[str, Any]:
    while True:
        shape_a, shape_b = rng.permutation(SHAPES)[:2].tolist()
        color_a, color_b = rng.permutation(list(COLORS))[:2].tolist()
        if any(is_held_out(c, s) for c, s in ((color_a, shape_a), (color_b, shape_b))) == held_out:
            break
    include = [{"class": shape_a, "count": 1, "color": color_a}, {"class": shape_b, "count": 1, "color": color_b}]
    return _prompt("color_attr", include,
                   f"a photo of {phrase(1, color_a, shape_a)} and {phrase(1, color_b, shape_b)}")


def eval_prompts(per_category: int = 32, seed: int = 0, resolution: int = 32) -> list[dict[str, Any]]:
    """GenEval-style prompt metadata, `per_category` prompts for each of GenEval's six tags.

    Half of the colour-bearing prompts (colors, color_attr) use a held-out combination; every dict
    records "held_out". `resolution` is accepted for API symmetry: prompts do not depend on it
    (every prompt, counting four included, is placeable at 32 px and above).
    """
    if per_category < 1:
        raise ValueError(f"eval_prompts: per_category: expected >= 1, got {per_category}")
    if resolution < 16:
        raise ValueError(f"eval_prompts: resolution: expected >= 16, got {resolution}")
    rng = np.random.default_rng([seed, 2])
    return [meta for tag in GENEVAL_TAGS for meta in _prompts_for(tag, per_category, rng)]
