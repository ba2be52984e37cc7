"""When a VLM sees images: the nano MLLM's text-only phase and switch point, scene descriptions, and
`iomm study vlm-timing` end to end on tiny MLLMs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from iomm.nano.mllm import NanoMLLMConfig, build_nano_mllm, tiny_config
from iomm.nano.mllm_training import TaskSampler, lr_factor, phase_progress, train_loop
from iomm.nano.questions import ask_relation, scene_description
from iomm.nano.tokenizer import build_tokenizer
from iomm.nano.world import World, WorldConfig
from iomm.typed_config import ConfigError

INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def test_a_scene_description_answers_every_relation_question() -> None:
    world, rng, tokenizer = World(WorldConfig()), np.random.default_rng(3), build_tokenizer()
    asked = {"yes": 0, "no": 0}
    for _ in range(400):
        scene = world.sample_scene(rng)
        text = scene_description(world, scene)
        assert text.startswith(world.caption(scene) + " .")
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
        qa = ask_relation(scene, rng)
        if qa is None:
            continue
        words = qa[0].split()  # "is the <colour> <shape> <relation> the <colour> <shape> ?"
        a, b, relation = " ".join(words[2:4]), " ".join(words[-3:-1]), " ".join(words[4:-4])
        stated = f"the {a} is {relation} the {b} ." in text or f"the {b} is {INVERSE[relation]} the {a} ." in text
        assert stated == (qa[1] == "yes"), (text, qa)
        asked[qa[1]] += 1
    assert min(asked.values()) > 20  # both answers were tested


@pytest.mark.parametrize("image_start, image_phase, image_steps", [(0.0, 0.0, 10), (0.5, 0.2, 6), (1.0, 0.2, 2)])
def test_images_enter_at_image_start_of_pre_training(image_start, image_phase, image_steps) -> None:
    cfg = dataclasses.replace(tiny_config(), image_start=image_start, image_phase=image_phase, dense_weight=0.0,
                              selection_weight=0.0, batch_size=3, text_batch_size=2)
    model, tokenizer = build_nano_mllm(cfg, seed=0)
    sampler, calls = TaskSampler(cfg, tokenizer, seed=0), []
    image_batch, text_batch = sampler.image_batch, sampler.text_batch
    sampler.image_batch = lambda: calls.append("image") or image_batch()
    sampler.text_batch = lambda size: calls.append(size) or text_batch(size)
    stats = train_loop(model, sampler, cfg, steps=10, minutes=None, progress=False)
    assert stats["steps"] == 10 and stats["image_steps"] == image_steps
    text_only = 10 - image_steps  # the first steps: every sequence is text, as many as an image step's
    assert calls == [5] * text_only + ["image", 2] * image_steps


def test_the_image_phase_has_its_own_learning_rate_schedule() -> None:
    cfg = dataclasses.replace(tiny_config(), image_start=1.0, image_phase=0.25)
    assert phase_progress(0.0, cfg) == (False, 0.0) and phase_progress(0.375, cfg) == (False, 0.5)
    assert phase_progress(0.75, cfg) == (True, 0.0) and phase_progress(0.875, cfg) == (True, 0.5)
    model, tokenizer = build_nano_mllm(cfg, seed=0)
    rates = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", record)
        train_loop(model, TaskSampler(cfg, tokenizer, seed=0), cfg, steps=8, minutes=None, progress=False)
    assert len(rates) == 8 and rates[6] == rates[0]  # step 6 starts the image phase's warm-up again
    assert rates[1] > rates[5] < rates[7]  # after pre-training's decay, the image phase's own cosine
    assert rates[7] == pytest.approx(cfg.lr * lr_factor(0.5, cfg, 1))


def test_descriptions_bring_relation_questions_to_the_text_path() -> None:
    cfg = dataclasses.replace(tiny_config(), description_prob=1.0)
    tokenizer = build_tokenizer()
    batch = TaskSampler(cfg, tokenizer, seed=0).text_batch(32)
    texts = tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)
    assert all(" . " in t for t in texts)  # every context is a description
    question = re.compile(r"is the \w+ \w+ (left of|right of|above|below) the \w+ \w+ \?")
    assert any(question.search(t) for t in texts)


@pytest.mark.parametrize("fields, name", [
    ({"image_start": 1.0, "image_phase": 0.0}, "image_phase"),
    ({"image_start": 1.5, "image_phase": 0.2}, "image_start"),
    ({"description_prob": -0.1}, "description_prob"),
    ({"image_start": 0.5, "text_batch_size": 0}, "text_batch_size"),
])
def test_a_timing_that_cannot_train_fails_at_once(fields, name) -> None:
    with pytest.raises(ConfigError, match=name):
        NanoMLLMConfig(**fields)


def test_vlm_timing_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from iomm.cli import main

    default, tiny = dataclasses.asdict(NanoMLLMConfig()), dataclasses.asdict(tiny_config())
    mllm_sets = [f"--set={k}={v}" for k, v in tiny.items() if v != default[k]]
    link_sets = [f"--link-set={o}" for o in (*TINY_OVERRIDES, "data.pairs=world:16")]
    out = tmp_path / "timing"
    argv = ["study", "vlm-timing", *mllm_sets, "--seeds=1", "--parallel=2", "--mllm-steps=3", "--link-steps=2",
            "--link-n=3", *link_sets, "--out", str(out)]
    assert main([*argv[:2], "--set=image_phase=1.5", *argv[2:]]) == 2  # a bad MLLM setting, before any compute
    assert "image_phase" in capsys.readouterr().err and not out.exists()
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text(encoding="utf-8"))
    arms = [f"image_start={s}" for s in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert [r["arm"] for r in record["results"]] == arms
    for row in record["results"]:
        saved = json.loads((out / row["arm"] / "seed0" / "nano_mllm.json").read_text(encoding="utf-8"))
        assert saved["config"]["image_start"] == float(row["arm"].split("=")[1]) and saved["steps"] == 3
        understanding = json.loads((out / row["arm"] / "seed0" / "understanding.json").read_text(encoding="utf-8"))
        assert row["vision_color"] == understanding["accuracy"]["color"]
        assert row["text_relation"] == understanding["text_accuracy"]["relation"]
    image_steps = {r: json.loads((out / r / "seed0" / "nano_mllm.json").read_text())["image_steps"] for r in arms}
    assert image_steps["image_start=0.0"] == 3 and image_steps["image_start=1.0"] < 3
    assert set(record["paired"]) == set(record["paired_text"]) == set(arms) - {"image_start=0.8"}
    n = tiny_config().eval_n
    assert record["paired"]["image_start=1.0"]["overall"]["n"] == 5 * n  # 5 vision kinds x eval_n questions
    assert record["paired_text"]["image_start=1.0"]["overall"]["n"] == 4 * n
    assert record["paired"]["image_start=1.0"]["overall"]["n_seeds"] == 1
    assert record["finding"] == "one training run: not decided"  # one seed decides nothing
    link = record["link"]
    assert {link["best"]["arm"], link["worst"]["arm"]} <= set(arms) and link["n"] == 3
    assert 0.0 <= link["best"]["exact"] <= 1.0 and "ci95" in link["exact_best_minus_worst"]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert f"**{record['finding']}**" in table and "| image_start=1.0 |" in table and "Link to IOMM" in table
    assert (out / "results.csv").is_file() and (out / "results.png").is_file()
    assert main(argv) == 0  # a rerun resumes from the finished arms
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["resumed"] is True
