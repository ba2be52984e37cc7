"""GenEval-style evaluation prompts for the nano world: the same number of prompts in each of GenEval's
six categories, in GenEval's metadata format (`tag`, `include`, `exclude`); half of the colour prompts
use a (colour, shape) combination that no training pair shows. A seventh category, `compositions`, asks
only for the compositions that no training caption states (colour x shape, count x shape, relation x pair),
each prompt naming its `kind`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from iomm.nano.world import (
    COLORS,
    COMPOSITION_KINDS,
    COMPOSITIONS,
    GENEVAL_TAGS,
    HELD_OUT,
    HELD_OUT_COUNTS,
    HELD_OUT_RELATIONS,
    INVERSE_RELATIONS,
    RELATIONS,
    SHAPES,
    is_held_out,
    phrase,
)


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
        return [_relation_prompt(tag, a, r, b) for a, b, r in itertools.islice(combos, n)]
    if tag == "color_attr":
        return [_color_attr_prompt(rng, held_out=i % 2 == 0) for i in range(n)]
    if tag == COMPOSITIONS:
        return _composition_prompts(n, rng)
    raise ValueError(f"unknown tag {tag!r}; expected one of {[*GENEVAL_TAGS, COMPOSITIONS]}")


def _relation_prompt(tag: str, subject: str, relation: str, target: str) -> dict[str, Any]:
    """"a photo of <subject> <relation> <target>" in GenEval's form: the subject's position is relative to the
    target, the first include."""
    return _prompt(tag, [{"class": target, "count": 1}, {"class": subject, "count": 1, "position": [relation, 0]}],
                   f"a photo of {phrase(1, None, subject)} {relation} {phrase(1, None, target)}")


def _composition_prompts(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`n` prompts, the kinds in turn, each asking for a held-out composition (a relation in either phrasing)."""
    options = {
        "color_shape": [_prompt(COMPOSITIONS, [{"class": s, "count": 1, "color": c}], f"a photo of {phrase(1, c, s)}")
                        for c, s in HELD_OUT],
        "count_shape": [_prompt(COMPOSITIONS, [{"class": s, "count": k}], f"a photo of {phrase(k, None, s)}",
                                exclude=[{"class": s, "count": k + 1}]) for k, s in HELD_OUT_COUNTS],
        "relation": [_relation_prompt(COMPOSITIONS, *statement) for a, r, b in HELD_OUT_RELATIONS
                     for statement in ((a, r, b), (b, INVERSE_RELATIONS[r], a))],
    }
    cycles = {kind: _cycle(rng, options[kind]) for kind in COMPOSITION_KINDS}
    return [{**next(cycles[kind]), "held_out": True, "kind": kind}
            for kind in itertools.islice(itertools.cycle(COMPOSITION_KINDS), n)]


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
    """GenEval-style prompt metadata, `per_category` prompts for each of GenEval's six tags, then as many for the
    held-out compositions (tag `compositions`).

    Half of the colour-bearing prompts (colors, color_attr) use a held-out combination; every dict
    records "held_out". `resolution` is accepted for API symmetry: prompts do not depend on it
    (every prompt, counting four included, is placeable at 32 px and above).
    """
    if per_category < 1:
        raise ValueError(f"eval_prompts: per_category: expected >= 1, got {per_category}")
    if resolution < 16:
        raise ValueError(f"eval_prompts: resolution: expected >= 16, got {resolution}")
    rng = np.random.default_rng([seed, 2])
    return [meta for tag in (*GENEVAL_TAGS, COMPOSITIONS) for meta in _prompts_for(tag, per_category, rng)]
