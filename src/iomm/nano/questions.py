"""Visual questions about world scenes, with their answers, and the token sequences the nano MLLM trains on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import (
    PreTrainedTokenizerFast,
)

from iomm.nano.tokenizer import COUNT_WORDS
from iomm.nano.world import (
    CLEAR_POSITION_THRESHOLD,
    COLORS,
    PLURALS,
    POSITION_THRESHOLD,
    RELATIONS,
    SHAPES,
    Scene,
    World,
    relative_position,
)

# ------------------------------------------------------------------------------ understanding data

QUESTION_TYPES: tuple[str, ...] = (
    "caption", "color", "shape", "count", "count_objects", "relation", "background", "exists",
)
IMAGE_WEIGHTS: dict[str, float] = {
    "caption": 2.0, "color": 2.0, "shape": 2.0, "count": 2.0, "count_objects": 1.0,
    "relation": 1.5, "background": 0.5, "exists": 1.5,
}
# What a caption lets one answer: colour words may be missing and relations need not be stated.
TEXT_WEIGHTS: dict[str, float] = {"color": 2.0, "shape": 2.0, "count": 2.0, "count_objects": 1.0, "exists": 1.5}
# What a scene description (`scene_description`: the caption and its objects' relations) lets one answer.
DESCRIPTION_WEIGHTS: dict[str, float] = {**TEXT_WEIGHTS, "relation": 1.5}
COLOR_FREE_TYPES = ("count", "count_objects")

QA = tuple[str, str]


def canonical_caption(world: World, scene: Scene) -> str:
    """The caption the model learns to produce: objects read left to right, no relation."""
    ordered = Scene(tuple(sorted(scene.objects, key=lambda o: (o.cx, o.cy))), scene.background, None)
    return world.caption(ordered)


def _unique(scene: Scene, key: Callable[[Any], Any]) -> list[Any]:
    values = [key(o) for o in scene.objects]
    return [v for v in dict.fromkeys(values) if values.count(v) == 1]


def _pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def ask_color(scene: Scene, rng: np.random.Generator) -> QA | None:
    shapes = _unique(scene, lambda o: o.shape)
    if not shapes:
        return None
    shape = _pick(rng, shapes)
    color = next(o.color for o in scene.objects if o.shape == shape)
    return f"what color is the {shape} ?", color


def ask_shape(scene: Scene, rng: np.random.Generator) -> QA | None:
    colors = _unique(scene, lambda o: o.color)
    if not colors:
        return None
    color = _pick(rng, colors)
    shape = next(o.shape for o in scene.objects if o.color == color)
    return f"what shape is the {color} object ?", shape


def ask_count(scene: Scene, rng: np.random.Generator) -> QA:
    present = sorted({o.shape for o in scene.objects})
    absent = [s for s in SHAPES if s not in present]
    shape = _pick(rng, absent) if absent and rng.random() < 0.2 else _pick(rng, present)
    n = sum(o.shape == shape for o in scene.objects)
    return f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[n]


def ask_count_objects(scene: Scene, rng: np.random.Generator) -> QA:
    return "how many objects are there ?", COUNT_WORDS[len(scene.objects)]


def ask_relation(scene: Scene, rng: np.random.Generator) -> QA | None:
    """Yes when the relation holds clearly, no when it does not hold even by GenEval's loose rule."""
    kinds = _unique(scene, lambda o: (o.color, o.shape))
    if len(kinds) < 2:
        return None
    i, j = rng.permutation(len(kinds))[:2]
    a, b = (next(o for o in scene.objects if (o.color, o.shape) == kinds[k]) for k in (i, j))
    holds = relative_position(a.bbox, b.bbox, CLEAR_POSITION_THRESHOLD)
    loose = relative_position(a.bbox, b.bbox, POSITION_THRESHOLD)
    yes, no = sorted(holds), [r for r in RELATIONS if r not in loose]
    answer = "yes" if yes and (not no or rng.random() < 0.5) else "no"
    if answer == "no" and not no:
        return None
    relation = _pick(rng, yes if answer == "yes" else no)
    return f"is the {a.color} {a.shape} {relation} the {b.color} {b.shape} ?", answer


def ask_background(scene: Scene, rng: np.random.Generator) -> QA:
    return "what color is the background ?", scene.background


def ask_exists(scene: Scene, rng: np.random.Generator) -> QA:
    present = sorted({(o.color, o.shape) for o in scene.objects})
    if rng.random() < 0.5:
        color, shape = _pick(rng, present)
        return f"is there a {color} {shape} ?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = _pick(rng, absent)
    return f"is there a {color} {shape} ?", "no"


ASK: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "color": ask_color, "shape": ask_shape, "count": ask_count, "count_objects": ask_count_objects,
    "relation": ask_relation, "background": ask_background, "exists": ask_exists,
}


def scene_description(world: World, scene: Scene) -> str:
    """The caption, then a sentence per clear relation between two objects of different kinds ("a photo of a red
    circle and a blue square . the red circle is left of the blue square ."): text that answers every relation
    question `ask_relation` can ask about the scene, so a language model can learn layout from text alone."""
    kinds = _unique(scene, lambda o: (o.color, o.shape))
    objects = [next(o for o in scene.objects if (o.color, o.shape) == kind) for kind in kinds]
    sentences = [f"the {a.color} {a.shape} is {relation} the {b.color} {b.shape} ."
                 for a, b in combinations(objects, 2)
                 for relation in sorted(relative_position(a.bbox, b.bbox, CLEAR_POSITION_THRESHOLD))]
    return " ".join([world.caption(scene), ".", *sentences])


def ask(world: World, scene: Scene, kind: str, rng: np.random.Generator) -> QA | None:
    """One question of type `kind` about `scene` with its answer, or None if the scene has none."""
    if kind == "caption":
        return "describe the image .", canonical_caption(world, scene)
    return ASK[kind](scene, rng)


def sample_turns(
    world: World, scene: Scene, weights: dict[str, float], n: int, rng: np.random.Generator
) -> list[QA]:
    kinds, p = list(weights), np.array(list(weights.values()))
    turns: dict[str, str] = {}
    for _ in range(8 * n):  # distinct questions: a repeated one could be copied from the context
        qa = ask(world, scene, kinds[int(rng.choice(len(kinds), p=p / p.sum()))], rng)
        if qa is not None:
            turns.setdefault(*qa)
        if len(turns) == n:
            break
    return list(turns.items())


# ------------------------------------------------------------------------------ batches


class SequenceBuilder:
    """Token ids and answer-only labels of training sequences, in the chat template's format."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_tokens: int) -> None:
        self.tokenizer = tokenizer
        tok = tokenizer.convert_tokens_to_ids
        self.bos, self.eos, self.sep = tokenizer.bos_token_id, tokenizer.eos_token_id, tok("<sep>")
        self.image_block = [tok("<img>")] + [tok("<IMG_CONTEXT>")] * image_tokens + [tok("</img>")]

    def words(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, context: list[int], turns: list[QA]) -> tuple[list[int], list[int]]:
        ids, labels = [self.bos] + context, [-100] * (1 + len(context))
        for question, answer in turns:
            q = self.words(question) + [self.sep]
            a = self.words(answer) + [self.eos]
            ids += q + a
            labels += [-100] * len(q) + a
        return ids, labels


def _right_pad(rows: list[list[int]], value: int) -> Tensor:
    length = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass
class Batch:
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    images: Tensor | None  # (B, 3, H, W) in [0, 1]
    patch_labels: Tensor | None = None  # (B, patches, 2): shape and colour class per patch, 0 = background
    # questions about one object: (row, position of their <sep>) and that object's patches (n, patches)
    selections: Tensor | None = None
    selected_patches: Tensor | None = None


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, images: Tensor | None,
            patch_labels: Tensor | None = None) -> Batch:
    ids = _right_pad([r[0] for r in rows], pad_id)
    mask = _right_pad([[1] * len(r[0]) for r in rows], 0)
    return Batch(ids, _right_pad([r[1] for r in rows], -100), mask, images, patch_labels)


def selected_patches(question: str, labels: np.ndarray) -> np.ndarray | None:
    """(patches,) mask of the one object a colour or shape question asks about; None for other questions.

    `ask_color` names a shape that occurs once and `ask_shape` a colour that occurs once, so the patches
    carrying that label are exactly the object's.
    """
    words = question.split()
    if words[:4] == ["what", "color", "is", "the"] and words[4] in SHAPES:  # not "... the background ?"
        return labels[:, 0] == SHAPES.index(words[4]) + 1
    if words[:4] == ["what", "shape", "is", "the"] and words[4] in COLORS:
        return labels[:, 1] == list(COLORS).index(words[4]) + 1
    return None


def patch_labels(world: World, scene: Scene, patch: int) -> np.ndarray:
    """(patches, 2) row-major shape and colour class (1-based; 0 = background) of each patch.

    A patch takes the object that covers most of it, if that object covers at least a quarter of it.
    """
    index = world.object_map(scene) + 1
    grid = index.shape[0] // patch
    blocks = index.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = np.stack([(blocks == k + 1).sum(1) for k in range(len(scene.objects))], 1)
    winner = np.where(counts.max(1) * 4 >= patch * patch, counts.argmax(1) + 1, 0)
    shape_of = np.array([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects])
    color_of = np.array([0] + [list(COLORS).index(o.color) + 1 for o in scene.objects])
    return np.stack([shape_of[winner], color_of[winner]], 1)
