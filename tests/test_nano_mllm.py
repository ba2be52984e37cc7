"""The nano MLLM: tokenizer, understanding data, a few training steps, save/load, evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iomm.conditioning.mllm import FrozenMLLM
from iomm.conditioning.mllm_families import family_for
from iomm.nano import mllm_training
from iomm.nano.mllm import build_nano_mllm, nano_config, preprocessing_config, save_nano_mllm, tiny_config
from iomm.nano.mllm_training import DenseHead, SelectionLoss, TaskSampler, ensure_nano_mllm, train_nano_mllm
from iomm.nano.questions import (
    DESCRIPTION_WEIGHTS,
    QUESTION_TYPES,
    SequenceBuilder,
    ask,
    patch_labels,
    selected_patches,
)
from iomm.nano.tokenizer import AUX_PROMPT, build_tokenizer
from iomm.nano.understanding import evaluate_understanding
from iomm.nano.world import COLORS, SHAPES, Scene, World, WorldConfig, WorldObject

# the tiny model with both training-only auxiliaries on (the dense probe and the selection loss), set here
# rather than taken from the defaults so that the test of what is saved cannot turn vacuous
TRAINED_CONFIG = dataclasses.replace(tiny_config(), dense_weight=1.0, selection_weight=0.3)


@pytest.fixture(scope="module")
def dense_probes() -> list[DenseHead]:
    return []  # the DenseHead probes built while training `trained`


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dense_probes) -> Path:
    class RecordedDenseHead(DenseHead):
        def __init__(self, model) -> None:
            super().__init__(model)
            dense_probes.append(self)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mllm_training, "DenseHead", RecordedDenseHead)
        return train_nano_mllm(tmp_path_factory.mktemp("nano") / "mllm", steps=3, config=TRAINED_CONFIG,
                               progress=False)


def test_tokenizer_knows_the_world_and_the_prompt() -> None:
    tokenizer = build_tokenizer()
    world = World(WorldConfig())
    rng = np.random.default_rng(0)
    texts = [AUX_PROMPT, "Generate an image that is identical to the reference image:"]
    for _ in range(50):
        scene = world.sample_scene(rng)
        texts.append(world.caption(scene))
        texts += [qa[0] + " " + qa[1] for kind in QUESTION_TYPES if (qa := ask(world, scene, kind, rng))]
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert all(row[0] == tokenizer.bos_token_id for row in ids)
    assert tokenizer.decode(tokenizer("a photo of a red circle")["input_ids"], skip_special_tokens=True) == \
        "a photo of a red circle"


def test_answers_are_right() -> None:
    world = World(WorldConfig())
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = world.sample_scene(rng)
        question, answer = ask(world, scene, "count_objects", rng)
        assert answer == ("zero", "one", "two", "three", "four")[len(scene.objects)]
        qa = ask(world, scene, "color", rng)
        if qa is not None:
            shape = qa[0].split()[-2]
            assert [o.color for o in scene.objects if o.shape == shape] == [qa[1]]
        qa = ask(world, scene, "exists", rng)
        color, shape = qa[0].split()[3:5]
        assert color in COLORS and shape in SHAPES
        assert (qa[1] == "yes") == any((o.color, o.shape) == (color, shape) for o in scene.objects)


def test_labels_cover_answers_only() -> None:
    cfg = tiny_config()
    tokenizer = build_tokenizer()
    batch = TaskSampler(cfg, tokenizer, seed=0).image_batch()
    assert batch.images.shape == (cfg.batch_size, 3, 32, 32)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ((batch.input_ids == context).sum(1) == cfg.image_tokens).all()
    supervised = batch.input_ids[batch.labels != -100]
    assert context not in supervised.tolist() and tokenizer.sep_token_id not in supervised.tolist()
    builder = SequenceBuilder(tokenizer, cfg.image_tokens)
    ids, labels = builder.build(builder.words("a photo of a red circle"), [("what color is the circle ?", "red")])
    assert [t for t, label in zip(ids, labels) if label != -100] == tokenizer.convert_tokens_to_ids(["red", "</s>"])


def test_saved_dir_loads_like_a_checkpoint(trained: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "understanding.json", "nano_mllm.json"):
        assert (trained / name).is_file(), name
    loaded = FrozenMLLM.from_pretrained(trained)
    model, tokenizer = build_nano_mllm(tiny_config())
    model.load_state_dict(loaded.model.state_dict())
    memory = FrozenMLLM(model, tokenizer, json.loads((trained / "preprocessor_config.json").read_text()))
    images = torch.rand(2, 3, 32, 32)
    for mllm in (loaded, memory):
        text, mask = mllm.embed_text(["a photo of", "two red circles"])
        img = mllm.embed_images(images)
        embeds = torch.cat([img, text], 1)
        mllm.out = mllm.forward_embeds(embeds, torch.cat([torch.ones(img.shape[:2], dtype=torch.bool), mask], 1))
    assert img.shape[1] == tiny_config().image_tokens == loaded.num_image_tokens(32)
    assert torch.equal(loaded.out, memory.out)
    for image, question in ((images[0], "what color is the circle ?"), (None, "a photo of two red circles")):
        assert loaded.answer(image, question) == memory.answer(image, question)


def test_understanding_json(trained: Path) -> None:
    results = json.loads((trained / "understanding.json").read_text())
    n = TRAINED_CONFIG.eval_n
    assert (results["n_per_type"], results["seed"]) == (n, 1000)  # train_nano_mllm evaluates with seed + 1000
    assert set(results["accuracy"]) == set(QUESTION_TYPES)
    assert set(results["text_accuracy"]) == set(DESCRIPTION_WEIGHTS)  # relations asked about a scene description
    for value in [*results["accuracy"].values(), *results["text_accuracy"].values()]:
        assert 0 <= value * n <= n and value * n == pytest.approx(round(value * n))  # exact matches out of n
    by_objects = results["accuracy_by_objects"]["color"]
    assert set(by_objects) <= {"1", "2", "3", "4"} and all(0.0 <= v <= 1.0 for v in by_objects.values())
    assert results["image_tokens"] == TRAINED_CONFIG.image_tokens
    records = []
    assert evaluate_understanding(trained, n=n, seed=1000, records=records) == results  # reproducible
    saved = [json.loads(line) for line in (trained / "understanding.jsonl").read_text().splitlines()]
    assert saved == records and len(records) == n * (len(QUESTION_TYPES) + len(DESCRIPTION_WEIGHTS))
    for path, accuracies in (("image", results["accuracy"]), ("text", results["text_accuracy"])):
        for kind, accuracy in accuracies.items():
            answers = [r["correct"] for r in records if r["path"] == path and r["tag"] == kind]
            assert [r["prompt"] for r in records if r["path"] == path and r["tag"] == kind] == list(range(n))
            assert sum(answers) / n == pytest.approx(accuracy)


def test_ensure_reuses_and_checks_kind(trained: Path) -> None:
    assert ensure_nano_mllm(trained, progress=False) == trained
    with pytest.raises(ValueError, match="trained nano MLLM but a random-init"):
        ensure_nano_mllm(trained, progress=False, random_init=True)


def test_random_init_and_meta_config(tmp_path: Path) -> None:
    path = ensure_nano_mllm(tmp_path / "random", progress=False, random_init=True, tiny=True)
    assert json.loads((path / "nano_mllm.json").read_text())["random_init"] is True
    with torch.device("meta"):
        mllm = FrozenMLLM.from_config(nano_config())
    assert sum(p.numel() for p in mllm.parameters()) > 1e6


def test_patch_labels_mark_the_patches_an_object_covers() -> None:
    world = World(WorldConfig())
    square = WorldObject("square", "blue", "large", cx=10.5, cy=22.5, extent=13.0)  # pixels 4..16 x 16..28
    scene = Scene((square,), "white")
    assert (world.object_map(scene) == 0).sum() == 13 * 13
    labels = patch_labels(world, scene, patch=4).reshape(8, 8, 2)
    covered = np.zeros((8, 8), dtype=bool)
    covered[4:8, 1:5] = True  # patch rows 4..6 and columns 1..3 lie inside; row 7 and column 4 hold a
    covered[7, 4] = False     # 1-px strip (a quarter: labelled); their corner patch holds 1 px (not)
    assert (labels[..., 0][covered] == SHAPES.index("square") + 1).all()
    assert (labels[..., 1][covered] == list(COLORS).index("blue") + 1).all()
    assert (labels[~covered] == 0).all()


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_dense_head_is_not_part_of_the_saved_model(trained: Path, dense_probes: list[DenseHead],
                                                   tmp_path: Path) -> None:
    assert json.loads((trained / "nano_mllm.json").read_text())["config"] == dataclasses.asdict(TRAINED_CONFIG)
    assert len(dense_probes) == 1  # the probe was attached and trained with the model
    fresh, tokenizer = build_nano_mllm(TRAINED_CONFIG, seed=1)
    save_nano_mllm(tmp_path, fresh, tokenizer, TRAINED_CONFIG, {})
    saved, expected = _saved_tensors(trained), _saved_tensors(tmp_path)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}  # no extra keys
    probe = dense_probes[0].proj.weight.detach()
    assert not any(v.shape == probe.shape and torch.equal(v, probe) for v in saved.values())


def test_cli_train_overrides_the_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from iomm.cli import main

    out = tmp_path / "mllm"
    assert main(["mllm", "train", "--tiny", "--steps", "2", "--out", str(out), "--set", "text_heads=1",
                 "--set", "text_kv_heads=1", "--set", "patch_size=4", "--set", "selection_weight=1.0"]) == 0
    assert json.loads((out / "nano_mllm.json").read_text())["config"]["text_heads"] == 1
    assert json.loads((out / "config.json").read_text())["text_config"]["num_attention_heads"] == 1
    capsys.readouterr()
    assert main(["mllm", "train", "--tiny", "--steps", "1", "--out", str(tmp_path / "bad"),
                 "--set", "text_head=2"]) == 2
    assert "did you mean 'text_heads'" in capsys.readouterr().err
    assert main(["mllm", "train", "--tiny", "--steps", "1", "--out", str(tmp_path / "bad"),
                 "--set", "selection_layer=1"]) == 2
    assert "field 'selection_layer': expected a layer index in 0..0, got 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_selected_patches_are_the_asked_objects() -> None:
    world, rng, checked = World(WorldConfig()), np.random.default_rng(3), 0
    for _ in range(60):
        scene = world.sample_scene(rng)
        labels = patch_labels(world, scene, patch=4)
        for kind, answer_column in (("color", 1), ("shape", 0)):
            qa = ask(world, scene, kind, rng)
            if qa is None:
                continue
            mask = selected_patches(qa[0], labels)
            answers = COLORS if kind == "color" else SHAPES
            assert mask.any() and (labels[mask, answer_column] == list(answers).index(qa[1]) + 1).all()
            checked += 1
    assert checked > 60
    assert selected_patches("how many circles are there ?", labels) is None
    assert selected_patches("what color is the background ?", labels) is None


def test_selection_loss_is_the_models_own_attention() -> None:
    cfg = dataclasses.replace(tiny_config(), patch_size=4, batch_size=8, selection_layer=0, selection_weight=1.0)
    model, tokenizer = build_nano_mllm(cfg, seed=0)
    model.set_attn_implementation("eager")
    sampler, selection = TaskSampler(cfg, tokenizer, seed=0), SelectionLoss(model, 0)
    batch = next(b for b in iter(sampler.image_batch, None) if b.selections is not None)
    inputs = family_for(model.config, preprocessing_config(cfg)).model_inputs(batch.images, batch.input_ids)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_attentions=True, **inputs)
        loss = selection.loss(batch)
    rows, positions = batch.selections.unbind(1)
    attention = out.attentions[0][rows, 0, positions]  # head 0 at each answer position
    on_object = torch.zeros_like(attention, dtype=torch.bool)
    on_object[batch.input_ids[rows] == model.config.image_token_id] = \
        selection.token_targets(batch.selected_patches).flatten()
    expected = -(attention * on_object).sum(-1).clamp(min=1e-6).log().mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert on_object.sum(-1).min() > 0 and (on_object.sum(-1) < cfg.image_tokens).all()
