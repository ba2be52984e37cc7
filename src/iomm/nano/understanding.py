"""Held-out understanding of a saved nano MLLM: per-question-type accuracy, with and without the image."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iomm.conditioning.mllm import FrozenMLLM
from iomm.image_tensors import to_tensor
from iomm.nano.mllm import NanoMLLMConfig
from iomm.nano.questions import DESCRIPTION_WEIGHTS, QUESTION_TYPES, TEXT_WEIGHTS, ask, scene_description
from iomm.nano.world import (
    Scene,
    World,
    WorldConfig,
)

# ------------------------------------------------------------------------------ evaluation

UNDERSTANDING_RECORDS = "understanding.jsonl"  # beside understanding.json: one record per held-out answer


@dataclass
class EvalSet:
    images: Tensor
    questions: list[str]
    answers: list[str]
    contexts: list[str] = field(default_factory=list)  # captions, for the text path
    objects: list[int] = field(default_factory=list)  # objects in each question's scene


def text_context(world: World, scene: Scene, kind: str) -> str:
    """What the text path reads instead of the image: the caption, or for relation questions (which a caption
    need not answer) the scene description."""
    return world.caption(scene) if kind in TEXT_WEIGHTS else scene_description(world, scene)


def eval_set(world: World, kind: str, n: int, rng: np.random.Generator, text: bool) -> EvalSet:
    images, questions, answers, contexts, objects = [], [], [], [], []
    while len(questions) < n:
        scene = world.sample_scene(rng)
        qa = ask(world, scene, kind, rng)
        if qa is None:
            continue
        images.append(world.render(scene))
        questions.append(qa[0])
        answers.append(qa[1])
        contexts.append(text_context(world, scene, kind) if text else "")
        objects.append(len(scene.objects))
    return EvalSet(to_tensor(images), questions, answers, contexts, objects)


def _accuracy(predictions: list[str], answers: list[str]) -> float:
    return round(sum(p == a for p, a in zip(predictions, answers)) / len(answers), 4)


def _accuracy_by_objects(predictions: list[str], data: EvalSet) -> dict[str, float]:
    """Accuracy per number of objects in the scene: binding errors show up as chance on crowded scenes."""
    groups: dict[int, list[int]] = {}
    for i, count in enumerate(data.objects):
        groups.setdefault(count, []).append(i)
    return {str(count): _accuracy([predictions[i] for i in idx], [data.answers[i] for i in idx])
            for count, idx in sorted(groups.items())}


def answer_all(mllm: FrozenMLLM, images: Tensor | None, questions: list[str], batch_size: int) -> list[str]:
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        chunk = None if images is None else images[i : i + batch_size]
        out += mllm.answer_batch(chunk, questions[i : i + batch_size], max_new_tokens=24)
    return out


def retrieval_top1(mllm: FrozenMLLM, world: World, n: int, rng: np.random.Generator) -> float:
    """Image -> caption retrieval by cosine of mean-pooled last hidden states (modality alignment)."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    image_embeds = mllm.embed_images(to_tensor([world.render(s) for s in scenes]))
    prefix, prefix_mask = mllm.embed_text([""] * n)  # "<s>", as the image sequences start
    image_states = mllm.forward_embeds(
        torch.cat([prefix, image_embeds], 1),
        torch.cat([prefix_mask, torch.ones(image_embeds.shape[:2], dtype=torch.bool)], 1),
    )[:, 1:].mean(1)
    text, mask = mllm.embed_text([world.caption(s) for s in scenes])
    states = mllm.forward_embeds(text, mask)
    text_states = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    sim = torch.nn.functional.normalize(image_states, dim=-1) @ torch.nn.functional.normalize(text_states, dim=-1).T
    return round(float((sim.argmax(1) == torch.arange(n)).float().mean()), 4)


def _records(predictions: list[str], data: EvalSet, kind: str, path: str) -> list[dict[str, Any]]:
    return [{"path": path, "tag": kind, "prompt": i, "objects": data.objects[i], "correct": p == data.answers[i]}
            for i, p in enumerate(predictions)]


@torch.no_grad()
def evaluate_understanding(path: str | Path, n: int = 200, seed: int = 1234, batch_size: int = 100,
                           records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Held-out accuracy of a saved nano MLLM on fresh scenes (exact match of the greedy answer).

    `accuracy[kind]` asks with the image; `text_accuracy[kind]` asks the same questions about the scene in
    text instead of the image (`text_context`); `retrieval_top1` is image -> caption retrieval among 64
    scenes. The questions depend on `seed` only, so two models evaluated with one seed answer the same
    ones; `records`, when given, receives one record per answer (`path` "image" or "text", `tag`, `prompt`,
    `correct`) for paired comparisons.
    """
    mllm = FrozenMLLM.from_pretrained(path)
    meta_path = Path(path) / "nano_mllm.json"
    cfg = json.loads(meta_path.read_text())["config"] if meta_path.is_file() else asdict(NanoMLLMConfig())
    world = World(WorldConfig(resolution=cfg["resolution"], background=cfg["background"]))
    rng = np.random.default_rng([seed, 7919])
    accuracy, text_accuracy, by_objects, text_by_objects = {}, {}, {}, {}
    sink: list[dict[str, Any]] = [] if records is None else records
    for kind in QUESTION_TYPES:
        data = eval_set(world, kind, n, rng, text=kind in DESCRIPTION_WEIGHTS)
        predictions = answer_all(mllm, data.images, data.questions, batch_size)
        accuracy[kind], by_objects[kind] = _accuracy(predictions, data.answers), _accuracy_by_objects(predictions, data)
        sink += _records(predictions, data, kind, "image")
        if kind in DESCRIPTION_WEIGHTS:
            prompts = [f"{c} {q}" for c, q in zip(data.contexts, data.questions)]
            predictions = answer_all(mllm, None, prompts, batch_size)
            text_accuracy[kind] = _accuracy(predictions, data.answers)
            text_by_objects[kind] = _accuracy_by_objects(predictions, data)
            sink += _records(predictions, data, kind, "text")
    return {
        "n_per_type": n,
        "seed": seed,
        "accuracy": accuracy,
        "text_accuracy": text_accuracy,
        "accuracy_by_objects": by_objects,
        "text_accuracy_by_objects": text_by_objects,
        "retrieval_top1": retrieval_top1(mllm, world, 64, rng),
        "embed_scale": round(mllm.embed_scale, 5),
        "image_token_rms": round(float(mllm.embed_images(eval_set(world, "count", 16, rng, False).images)
                                       .pow(2).mean().sqrt()), 5),
        "image_tokens": mllm.num_image_tokens(cfg["resolution"]),
    }
