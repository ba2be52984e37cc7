"""The nano testbed world: coloured shapes on a plain background, with captions and structured metadata.

Everything is deterministic from a seed and uses numpy only, so training is never data bound
(rendering pastes precomputed boolean stamps; thousands of images per second on one core).

Conventions
- Image coordinates: x to the right, y downwards; a bbox is (x0, y0, x1, y1) with x1 = x0 + width.
- A scene's `relation`, when set, is the relation of `objects[0]` relative to `objects[1]`,
  and the caption states it ("a photo of a red circle left of a blue square").
- Relations follow GenEval's rule (`relative_position`); captions and prompt renders only use
  relations that hold with a stricter threshold (`CLEAR_POSITION_THRESHOLD`), so that they
  survive the blur of a generated image.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 190, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Object width (= height) as a fraction of the image side: 9 and 13 px at 32 px, 18 and 26 px at 64 px.
SIZES: dict[str, float] = {"small": 9 / 32, "large": 13 / 32}
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Compositions that no training pair shows or states, though the unlabeled stream shows them, in three kinds.
# (colour, shape): no pair image holds such an object.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("purple", "circle"),
)
# (count, shape): no pair image holds exactly that many of the shape ("three triangles"), in all or of one colour.
HELD_OUT_COUNTS: tuple[tuple[int, str], ...] = ((3, "triangle"), (2, "circle"))
# (shape, relation, shape): no caption states it, nor its inverse ("a square below a circle").
HELD_OUT_RELATIONS: tuple[tuple[str, str, str], ...] = (("circle", "above", "square"),
                                                       ("triangle", "left of", "circle"))
INVERSE_RELATIONS: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# The held-out compositions' own category, scored beside GenEval's six (not part of their overall).
COMPOSITIONS = "compositions"
COMPOSITION_KINDS: tuple[str, ...] = ("color_shape", "count_shape", "relation")
POSITION_THRESHOLD = 0.1  # GenEval's default
CLEAR_POSITION_THRESHOLD = 0.25
EDGE_MARGIN = 1  # px between an object and the image border (at 32 px; scaled with resolution)
GAP = 2  # px between the bboxes of two objects (at 32 px; scaled with resolution)
COLORLESS_CAPTION_PROB = 0.25  # pairs() drops colour words this often, like the colourless eval prompts
STATED_RELATION_PROB = 0.5  # a clear relation in a 2-object scene is stated this often

VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "photo", "of", "and"}
    | set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(NUMBER_WORDS.values())
    | {word for relation in RELATIONS for word in relation.split()}
))


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    extent: float  # width = height, in px

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        half = self.extent / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str
    relation: str | None = None  # relation of objects[0] to objects[1], stated by the caption


@dataclass
class WorldConfig:
    resolution: int = 32
    min_objects: int = 1
    max_objects: int = 4
    background: str = "white"  # "white", "black" or "mixed" (each scene picks one)

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ValueError(f"WorldConfig.resolution: expected >= 16, got {self.resolution}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("WorldConfig: expected 1 <= min_objects <= max_objects <= 4, "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.background not in (*BACKGROUNDS, "mixed"):
            raise ValueError(f"WorldConfig.background: expected one of {[*BACKGROUNDS, 'mixed']}, "
                             f"got {self.background!r}")


def relative_position(box_a: tuple[float, ...], box_b: tuple[float, ...],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A relative to box B: GenEval's rule (evaluate_images.relative_position)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def is_held_out(color: str | None, shape: str) -> bool:
    return (color, shape) in HELD_OUT


def is_held_out_relation(subject: str, relation: str, target: str) -> bool:
    """Whether "<subject> <relation> <target>" states a held-out relation, directly or inverted."""
    return ((subject, relation, target) in HELD_OUT_RELATIONS
            or (target, INVERSE_RELATIONS[relation], subject) in HELD_OUT_RELATIONS)


def held_out_kinds(scene: Scene) -> set[str]:
    """The kinds of held-out composition a scene shows (`relation`: only where its caption states it)."""
    kinds = set()
    if any(is_held_out(o.color, o.shape) for o in scene.objects):
        kinds.add("color_shape")
    shapes, groups = [o.shape for o in scene.objects], [(o.color, o.shape) for o in scene.objects]
    # a caption counts a shape as a whole (colourless) or per colour ("two yellow circles" beside a red one)
    if any(shapes.count(shape) == count or any(groups.count((o.color, shape)) == count for o in scene.objects)
           for count, shape in HELD_OUT_COUNTS):
        kinds.add("count_shape")
    if scene.relation is not None and is_held_out_relation(scene.objects[0].shape, scene.relation,
                                                           scene.objects[1].shape):
        kinds.add("relation")
    return kinds


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """JSON-ready metadata of a scene (objects with their bboxes)."""
    return {
        "background": scene.background,
        "relation": scene.relation,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "cx": o.cx, "cy": o.cy,
             "extent": o.extent, "bbox": list(o.bbox)}
            for o in scene.objects
        ],
    }


def scene_from_dict(data: Mapping[str, Any]) -> Scene:
    objects = tuple(
        WorldObject(o["shape"], o["color"], o["size"], float(o["cx"]), float(o["cy"]), float(o["extent"]))
        for o in data["objects"]
    )
    return Scene(objects, data["background"], data.get("relation"))


# ---------------------------------------------------------------- prompt metadata (GenEval layout)

def validate_prompt(meta: Any, source: str = "prompt") -> None:
    """Check a GenEval-style prompt dict against this world; raise ValueError naming the field."""
    def fail(field: str, expected: str, got: Any) -> None:
        raise ValueError(f"{source}: field '{field}': expected {expected}, got {got!r}")

    if not isinstance(meta, Mapping):
        fail("<line>", "a JSON object", meta)
    if meta.get("tag") not in (*GENEVAL_TAGS, COMPOSITIONS):
        fail("tag", f"one of {[*GENEVAL_TAGS, COMPOSITIONS]}", meta.get("tag"))
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        fail("include", "a non-empty list", include)
    for key in ("include", "exclude"):
        for i, item in enumerate(meta.get(key, [])):
            where = f"{key}[{i}]"
            if not isinstance(item, Mapping):
                fail(where, "an object", item)
            if item.get("class") not in SHAPES:
                fail(f"{where}.class", f"one of {list(SHAPES)}", item.get("class"))
            count = item.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                fail(f"{where}.count", "a positive integer", count)
            if "color" in item and item["color"] not in COLORS:
                fail(f"{where}.color", f"one of {list(COLORS)}", item["color"])
            if "position" in item:
                pos = item["position"]
                if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                    fail(f"{where}.position", f"[relation in {list(RELATIONS)}, index of an earlier include]", pos)


def phrase(count: int, color: str | None, shape: str) -> str:
    words = [NUMBER_WORDS[count]] + ([color] if color else []) + [shape if count == 1 else PLURALS[shape]]
    return " ".join(words)


# ---------------------------------------------------------------- rendering

def _stamp(shape: str, extent: int) -> np.ndarray:
    """Boolean extent x extent mask: an upright triangle, a square or a disc, tested at pixel centres."""
    centers = np.arange(extent) + 0.5
    x, y = np.meshgrid(centers, centers)
    half = extent / 2
    if shape == "square":
        return np.ones((extent, extent), dtype=bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half ** 2
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return np.abs(x - half) <= (y + 0.5) / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


class World:
    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        res = self.config.resolution
        self.extents = {size: int(round(frac * res)) for size, frac in SIZES.items()}
        scale = res / 32
        self.edge = int(round(EDGE_MARGIN * scale))
        self.gap = int(round(GAP * scale))
        self._stamps = {(shape, e): _stamp(shape, e) for shape in SHAPES for e in self.extents.values()}
        self._colors = list(COLORS)

    # ---- sampling
    def _background(self, rng: np.random.Generator) -> str:
        if self.config.background == "mixed":
            return list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        return self.config.background

    def _layout(self, rng: np.random.Generator, extents: list[int], tries: int = 32) -> list[tuple[int, int]] | None:
        """Top-left corners for non-overlapping boxes (rejection sampling, vectorised over tries)."""
        res, placed = self.config.resolution, []
        for e in extents:
            candidates = rng.integers(self.edge, res - e - self.edge + 1, size=(tries, 2))
            ok = np.ones(tries, dtype=bool)
            for (px, py), pe in placed:
                apart_x = (candidates[:, 0] >= px + pe + self.gap) | (candidates[:, 0] + e + self.gap <= px)
                apart_y = (candidates[:, 1] >= py + pe + self.gap) | (candidates[:, 1] + e + self.gap <= py)
                ok &= apart_x | apart_y
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                return None
            placed.append((tuple(candidates[hits[0]].tolist()), e))
        return [corner for corner, _ in placed]

    def _objects(self, rng: np.random.Generator, specs: list[tuple[str, str]],
                 max_restarts: int = 500) -> tuple[WorldObject, ...]:
        """Place (shape, colour) specs; sizes are drawn, and redrawn when a layout fails."""
        size_names = list(self.extents)
        for _ in range(max_restarts):
            chosen = [size_names[i] for i in rng.integers(len(size_names), size=len(specs))]
            extents = [self.extents[s] for s in chosen]
            corners = self._layout(rng, extents)
            if corners is not None:
                return tuple(
                    WorldObject(shape, color, size, x + e / 2, y + e / 2, float(e))
                    for (shape, color), size, e, (x, y) in zip(specs, chosen, extents, corners)
                )
        raise RuntimeError(f"could not place {len(specs)} objects at {self.config.resolution} px")

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        cfg = self.config
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        shapes = rng.integers(len(SHAPES), size=n)
        colors = rng.integers(len(self._colors), size=n)
        specs = [(SHAPES[s], self._colors[c]) for s, c in zip(shapes, colors)]
        objects = self._objects(rng, specs)
        relation = None
        if n == 2 and specs[0] != specs[1] and rng.random() < STATED_RELATION_PROB:
            clear = sorted(relative_position(objects[0].bbox, objects[1].bbox, CLEAR_POSITION_THRESHOLD))
            relation = clear[int(rng.integers(len(clear)))] if clear else None
        return Scene(objects, self._background(rng), relation)

    def scene_from_prompt(self, meta: Mapping[str, Any], rng: np.random.Generator) -> Scene:
        """A scene with exactly the objects a prompt includes; relations hold clearly (GenEval's rule)."""
        validate_prompt(meta)
        include = meta["include"]
        specs, groups = [], []
        for item in include:
            start = len(specs)
            for _ in range(item["count"]):
                color = item.get("color") or self._colors[int(rng.integers(len(self._colors)))]
                specs.append((item["class"], color))
            groups.append(range(start, len(specs)))
        constraints = [(groups[i], item["position"][0], groups[item["position"][1]])
                       for i, item in enumerate(include) if "position" in item]
        for _ in range(1000):
            objects = self._objects(rng, specs)
            if all(rel in relative_position(objects[a].bbox, objects[b].bbox, CLEAR_POSITION_THRESHOLD)
                   for subjects, rel, targets in constraints for a in subjects for b in targets):
                break
        else:
            raise RuntimeError(f"could not lay out a scene for prompt {meta.get('prompt')!r}")
        relation = None
        if len(objects) == 2 and len(constraints) == 1:
            (subject,), relation, (target,) = constraints[0]
            objects = (objects[subject], objects[target])
        return Scene(objects, self._background(rng), relation)

    # ---- rendering and captions
    def _footprints(self, scene: Scene) -> Iterator[tuple[int, WorldObject, tuple[slice, slice], np.ndarray]]:
        """(index, object, its box as array slices, its boolean stamp) of each object, in drawing order."""
        for i, obj in enumerate(scene.objects):
            e = int(obj.extent)
            x0, y0 = int(round(obj.cx - e / 2)), int(round(obj.cy - e / 2))
            yield i, obj, (slice(y0, y0 + e), slice(x0, x0 + e)), self._stamps[(obj.shape, e)]

    def render(self, scene: Scene) -> np.ndarray:
        res = self.config.resolution
        image = np.empty((res, res, 3), dtype=np.uint8)
        image[:] = BACKGROUNDS[scene.background]
        for _, obj, box, stamp in self._footprints(scene):
            image[box][stamp] = COLORS[obj.color]
        return image

    def object_map(self, scene: Scene) -> np.ndarray:
        """(R, R) index of the object drawn at each pixel, -1 for the background (what render() paints)."""
        res = self.config.resolution
        index = np.full((res, res), -1, dtype=np.int64)
        for i, _, box, stamp in self._footprints(scene):
            index[box][stamp] = i
        return index

    def caption(self, scene: Scene, with_color: bool = True) -> str:
        """"a photo of" + groups of equal (colour, shape) with number words, joined by "and";
        a 2-object scene with a stated relation reads "a photo of <A> <relation> <B>"."""
        counts: dict[tuple[str | None, str], int] = {}
        for obj in scene.objects:  # dicts keep first-appearance order
            key = (obj.color if with_color else None, obj.shape)
            counts[key] = counts.get(key, 0) + 1
        phrases = [phrase(count, color, shape) for (color, shape), count in counts.items()]
        if scene.relation is not None and len(scene.objects) == 2 and len(phrases) == 2:
            return f"a photo of {phrases[0]} {scene.relation} {phrases[1]}"
        return "a photo of " + " and ".join(phrases)

    # ---- data sets
    def images(self, seed: int) -> Iterator[tuple[np.ndarray, Scene]]:
        """Unlimited unlabeled stream (held-out compositions included)."""
        rng = np.random.default_rng([seed, 0])
        while True:
            scene = self.sample_scene(rng)
            yield self.render(scene), scene

    def pairs(self, n: int, seed: int) -> list[tuple[np.ndarray, str, Scene]]:
        """`n` captioned images; scenes showing a held-out composition of any kind are rejected."""
        rng = np.random.default_rng([seed, 1])
        out = []
        while len(out) < n:
            scene = self.sample_scene(rng)
            if held_out_kinds(scene):
                continue
            with_color = bool(rng.random() >= COLORLESS_CAPTION_PROB)
            out.append((self.render(scene), self.caption(scene, with_color), scene))
        return out

