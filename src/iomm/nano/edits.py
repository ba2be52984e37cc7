"""Zero-shot editing on the nano world: change a colour, add or remove an object.

No editing data is ever trained on. Each edit is judged from the scorer's detections of the edited image on two
attributes, beside the exact match (`success`: exactly the objects (shape, colour) of the target scene):
`target`, the instructed change happened (a recoloured object has its new colour and not its old one, an added
object is there, a removed one is gone), and `kept`, everything else is kept (the source's other objects are still
there, and nothing is there that is in neither the source nor the target scene). An edit has both exactly when it
is an exact match; copying the source keeps everything and changes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from iomm.evaluation.prompt_images import write_jsonl
from iomm.nano.scorer import detect_objects
from iomm.nano.world import COLORS, SHAPES, Scene, World, WorldConfig, WorldObject

if TYPE_CHECKING:
    from iomm.inference.pipeline import IOMMPipeline

EDIT_KINDS = ("color", "add", "remove")
CASES_PER_KIND = 32  # 96 cases per training seed: 288 over the 3 seeds a comparison needs
CASE_FIELDS = ("target", "kept", "score", "success", "unchanged")  # per case, in edits.jsonl


@dataclass(frozen=True)
class EditCase:
    kind: str
    source: Scene
    target: Scene
    instruction: str


def _name(obj) -> str:
    return f"{obj.color} {obj.shape}"


def new_object(world: World, scene: Scene, rng: np.random.Generator, tries: int = 100) -> WorldObject | None:
    """An object of a (shape, colour) the scene does not have, clear of its objects; None when none fits."""
    colors = list(COLORS)
    for _ in range(tries):
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], colors[int(rng.integers(len(colors)))]
        try:
            placed = world.scene_from_prompt(
                {"tag": "single_object", "include": [{"class": shape, "count": 1, "color": color}],
                 "prompt": f"a photo of a {color} {shape}"}, rng).objects[0]
        except RuntimeError:
            continue
        if all(_apart(placed, o) for o in scene.objects) and _name(placed) not in map(_name, scene.objects):
            return placed
    return None


def make_case(world: World, kind: str, rng: np.random.Generator) -> EditCase:
    """A source scene of 1-2 distinct objects, an instruction, and the scene the edit should give."""
    while True:
        source = world.sample_scene(rng)
        names = [_name(o) for o in source.objects]
        if len(source.objects) <= 2 and len(set(names)) == len(names):
            break
    source = replace(source, relation=None)
    if kind == "color":
        colors = list(COLORS)
        obj = source.objects[int(rng.integers(len(source.objects)))]
        new = [c for c in colors if c != obj.color][int(rng.integers(len(colors) - 1))]
        objects = tuple(replace(o, color=new) if o is obj else o for o in source.objects)
        return EditCase(kind, source, replace(source, objects=objects), f"make the {_name(obj)} {new}")
    if kind == "remove" and len(source.objects) == 2:
        obj = source.objects[int(rng.integers(2))]
        target = replace(source, objects=tuple(o for o in source.objects if o is not obj))
        return EditCase(kind, source, target, f"remove the {_name(obj)}")
    if kind == "remove":
        return make_case(world, kind, rng)
    placed = new_object(world, source, rng)
    if placed is None:
        return make_case(world, kind, rng)
    return EditCase(kind, source, replace(source, objects=(*source.objects, placed)), f"add a {_name(placed)}")


def _apart(a, b, gap: float = 2.0) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def edit_cases(n_per_kind: int = CASES_PER_KIND, seed: int = 0, resolution: int = 32) -> list[EditCase]:
    world = World(WorldConfig(resolution=resolution, max_objects=2))
    rng = np.random.default_rng([seed, 7])
    return [make_case(world, kind, rng) for kind in EDIT_KINDS for _ in range(n_per_kind)]


def _objects(scene: Scene) -> Counter[tuple[str, str]]:
    return Counter((o.shape, o.color) for o in scene.objects)


def score_edit(image: Any, case: EditCase) -> dict[str, Any]:
    """The case's fields (`CASE_FIELDS`) for an edited image, from the scorer's detections."""
    found = Counter((d.shape, d.color) for d in detect_objects(image))
    source, target = _objects(case.source), _objects(case.target)
    appears, disappears = target - source, source - target
    changed = (all(found[k] >= target[k] for k in appears)
               and all(found[k] <= target[k] for k in disappears))
    kept = all(found[k] >= n for k, n in (source & target).items()) and not found - (source | target)
    # the compared headline: an exact match is too rare to separate arms (1 in 96), and `target` alone would
    # reward drawing only the instruction; the mean credits both halves of an edit, and copying gets 0.5
    return {"target": changed, "kept": kept, "score": (changed + kept) / 2, "success": found == target,
            "unchanged": found == source}


def edit_rates(results: list[dict[str, Any]]) -> dict[str, float]:
    """Rates over the per-case records: exact success per kind (`edit_{kind}`) and their mean, target, kept and
    score overall and per kind, and the share of outputs showing exactly the source."""
    def rate(field: str, kind: str | None = None) -> float:
        return float(np.mean([r[field] for r in results if kind in (None, r["kind"])]))

    metrics = {f"edit_{k}": rate("success", k) for k in EDIT_KINDS}
    metrics["edit_overall"] = float(np.mean([metrics[f"edit_{k}"] for k in EDIT_KINDS]))
    for field in ("target", "kept", "score"):
        metrics[f"edit_{field}"] = rate(field)
        metrics.update({f"edit_{field}_{k}": rate(field, k) for k in EDIT_KINDS})
    metrics["copied_source"] = rate("unchanged")
    metrics["edit_cases"] = len(results)
    return metrics


def evaluate_edits(pipeline: IOMMPipeline, out_dir: Path, n_per_kind: int = CASES_PER_KIND, seed: int = 0) -> dict:
    """Edit every case with `pipeline`, save before/after and the per-case records, and return the rates."""
    from iomm.inference.pipeline import generate_images  # torch and diffusers only to edit: the CLI reads the defaults

    world = World(WorldConfig(resolution=pipeline.cfg.data.resolution, max_objects=2))
    cases = edit_cases(n_per_kind, seed, pipeline.cfg.data.resolution)
    sources = [Image.fromarray(world.render(c.source)) for c in cases]
    edited = generate_images(pipeline, [c.instruction for c in cases], sources, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (case, before, after) in enumerate(zip(cases, sources, edited)):
        before.save(out_dir / f"{i:04d}_source.png")
        after.save(out_dir / f"{i:04d}_edited.png")
        results.append({"kind": case.kind, "instruction": case.instruction, **score_edit(np.asarray(after), case)})
    write_jsonl(out_dir / "edits.jsonl", results)
    return edit_rates(results)
