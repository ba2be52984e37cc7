import argparse
import json
from collections import deque

import numpy as np
import pytest
from PIL import Image

from iomm.commands import eval as eval_commands
from iomm.evaluation.prompt_images import save_prompt_images
from iomm.nano.prompts import eval_prompts
from iomm.nano.scorer import (
    detect_objects,
    judge,
    judge_detections,
    judge_directory,
    label_components,
    read_prompts,
    score,
    score_directory,
)
from iomm.nano.world import COLORS, SHAPES, World, WorldConfig

PROMPTS = eval_prompts(per_category=24, seed=0)
FLIPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def blur(image: np.ndarray, sigma: float, rng: np.random.Generator, noise: float = 0.0) -> np.ndarray:
    """Separable gaussian blur plus gaussian pixel noise, like a soft generated image."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    rows = sum(t * padded[i:i + h] for i, t in enumerate(taps))
    out = sum(t * rows[:, i:i + w] for i, t in enumerate(taps))
    return np.clip(out + rng.normal(0, noise, out.shape), 0, 255).astype(np.uint8)


def perturb(meta: dict, kind: str, rng: np.random.Generator) -> dict | None:
    """The prompt with exactly one attribute changed (None when `kind` does not apply)."""
    include = [dict(item) for item in meta["include"]]
    k = int(rng.integers(len(include)))
    if kind == "color":
        colored = [i for i, item in enumerate(include) if "color" in item]
        if not colored:
            return None
        k = colored[int(rng.integers(len(colored)))]
        include[k]["color"] = rng.choice([c for c in COLORS if c != include[k]["color"]])
    elif kind == "shape":
        include[k]["class"] = rng.choice([s for s in SHAPES if s != include[k]["class"]])
    elif kind == "count":  # GenEval checks exact counts only in "counting"; elsewhere drop an object
        if meta["tag"] == "counting":
            count = include[k]["count"]
            include[k]["count"] = count - 1 if count == 4 or rng.random() < 0.5 else count + 1
        elif len(include) > 1:
            include.pop()  # the last item: never a position target
        else:
            return None
    elif kind == "position":
        moved = [i for i, item in enumerate(include) if "position" in item]
        if not moved:
            return None
        relation, target = include[moved[0]]["position"]
        include[moved[0]]["position"] = [FLIPPED[relation], target]
    return {**meta, "include": include}


def pass_rate(world: World, prompts, rng, transform=lambda image: image) -> float:
    results = [(meta, judge(transform(world.render(world.scene_from_prompt(meta, rng))), meta)[0]) for meta in prompts]
    return score(results)["overall"]


@pytest.mark.parametrize("resolution,background", [(32, "white"), (32, "black"), (64, "white")])
def test_renders_of_the_prompts_score_near_one(resolution, background):
    world = World(WorldConfig(resolution=resolution, background=background))
    prompts = PROMPTS if resolution == 32 else PROMPTS[::3]
    assert pass_rate(world, prompts, np.random.default_rng(1)) >= 0.98


@pytest.mark.parametrize("kind", ["color", "shape", "count", "position"])
def test_one_changed_attribute_fails_the_prompt(kind):
    world, rng = World(WorldConfig(background="mixed")), np.random.default_rng(2)
    outcomes = []
    for meta in PROMPTS:
        changed = perturb(meta, kind, rng)
        if changed is not None:
            outcomes.append(judge(world.render(world.scene_from_prompt(changed, rng)), meta)[0])
    assert len(outcomes) >= 24
    assert 1 - np.mean(outcomes) >= 0.95, f"{kind}: {np.mean(outcomes):.3f} of perturbed renders still pass"


def test_blank_and_noise_images_score_zero():
    rng = np.random.default_rng(3)
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)]
    images += [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    images += [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    images += [np.array(list(COLORS.values()) + [(255, 255, 255)], np.uint8)[rng.integers(0, 7, (32, 32))]]
    for image in images:
        detections = detect_objects(image)
        assert score([(meta, judge_detections(detections, meta)[0]) for meta in PROMPTS])["overall"] <= 0.05


@pytest.mark.parametrize("background", ["white", "black"])
def test_blurred_noisy_renders_still_score(background):
    world, rng = World(WorldConfig(background=background)), np.random.default_rng(4)
    assert pass_rate(world, PROMPTS, rng, lambda image: blur(image, 0.7, rng, noise=6.0)) >= 0.9


@pytest.mark.parametrize("background", ["white", "black"])
def test_off_palette_colours_still_score(background):
    """A generator's colours drift: shift each world colour by up to +-30 per channel."""
    world, rng = World(WorldConfig(background=background)), np.random.default_rng(8)

    def drift(image: np.ndarray) -> np.ndarray:
        out = image.astype(int)
        for color in COLORS.values():
            out[(image == color).all(axis=-1)] = np.clip(np.array(color) + rng.integers(-30, 31, 3), 0, 255)
        return out.astype(np.uint8)

    assert pass_rate(world, PROMPTS, rng, drift) >= 0.95


def test_detections_match_the_scene():
    world, rng = World(), np.random.default_rng(5)
    for _ in range(200):
        scene = world.sample_scene(rng)
        found = sorted((d.shape, d.color) for d in detect_objects(world.render(scene)))
        assert found == sorted((o.shape, o.color) for o in scene.objects)
    (det,) = detect_objects(world.render(world.scene_from_prompt(PROMPTS[0], rng)))
    assert det.bbox[2] - det.bbox[0] in (9, 13) and 0 < det.score <= 1 and det.area > 40


def test_label_components_matches_a_flood_fill():
    rng = np.random.default_rng(6)
    for density in (0.3, 0.55, 0.7):
        mask = rng.random((24, 31)) < density
        labels, count = label_components(mask)
        expected = np.zeros(mask.shape, int)
        n = 0
        for start in zip(*np.nonzero(mask)):
            if expected[start]:
                continue
            n += 1
            queue = deque([start])
            expected[start] = n
            while queue:
                y, x = queue.popleft()
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not expected[ny, nx]:
                        expected[ny, nx] = n
                        queue.append((ny, nx))
        assert count == n
        pairs = set(zip(labels[mask].tolist(), expected[mask].tolist()))
        assert len(pairs) == n and not labels[~mask].any()


def _two_object_image(a, b, background="white"):
    world = World(WorldConfig(background=background))
    from iomm.nano.world import Scene, WorldObject
    objects = tuple(WorldObject(shape, color, "small", cx, cy, 9.0) for shape, color, cx, cy in (a, b))
    return world.render(Scene(objects, background))


def test_judge_mirrors_geneval_semantics():
    image = _two_object_image(("circle", "red", 6.5, 16.5), ("square", "blue", 25.5, 16.5))
    position = {"tag": "position", "include": [{"class": "square", "count": 1},
                                               {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert judge(image, position) == (True, "")
    position["include"][1]["position"] = ["right of", 0]
    ok, reason = judge(image, position)
    assert not ok and reason == "expected circle right of target, found left of target"
    # two_object only needs presence; extra objects are fine
    assert judge(image, {"tag": "two_object", "include": [{"class": "circle", "count": 1}]})[0]
    counting = {"tag": "counting", "include": [{"class": "circle", "count": 1}],
                "exclude": [{"class": "circle", "count": 2}]}
    assert judge(image, counting)[0]
    two_circles = _two_object_image(("circle", "red", 6.5, 16.5), ("circle", "red", 25.5, 16.5))
    ok, reason = judge(two_circles, counting)
    assert not ok and reason == "expected circle<2, found 2"
    ok, reason = judge(image, {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "green"}]})
    assert not ok and reason.startswith("expected green square>=1, found 0 green; and 1 blue")
    ok, reason = judge(image, {"tag": "single_object", "include": [{"class": "triangle", "count": 1}]})
    assert not ok and reason == "expected triangle>=1, found 0"


def test_score_is_the_mean_over_the_tags_present():
    metrics = score([({"tag": "colors", "held_out": True}, True), ({"tag": "colors", "held_out": False}, False),
                     ({"tag": "position"}, True)])
    assert metrics["colors"] == 0.5 and metrics["position"] == 1.0 and metrics["overall"] == 0.75
    assert metrics["counts"] == {"colors": {"n": 2, "passed": 1}, "position": {"n": 1, "passed": 1}}
    assert metrics["colors_held_out"] == {"n": 1, "passed": 1, "accuracy": 1.0}
    assert metrics["colors_seen"]["accuracy"] == 0.0


def test_the_held_out_compositions_are_their_own_category_outside_overall():
    relation = {"tag": "compositions", "kind": "relation"}
    records = [({"tag": "position"}, True), ({"tag": "compositions", "kind": "count_shape"}, True),
               (relation, False), (relation, True), (relation, True), (relation, True)]
    metrics = score(records)
    assert metrics["overall"] == 1.0  # GenEval's tags only
    assert metrics["compositions_count_shape"] == 1.0 and metrics["compositions_relation"] == 0.75
    assert metrics["compositions"] == 0.875  # the mean over kinds, not over images (0.8)
    assert metrics["counts"]["compositions"] == {"n": 5, "passed": 4}


def test_score_directory_and_the_eval_command(tmp_path):
    world, rng = World(), np.random.default_rng(7)
    prompts = PROMPTS[::4]
    renders = [[world.render(world.scene_from_prompt(m, rng)) for _ in range(2)] for m in prompts]
    save_prompt_images(tmp_path / "imgs", prompts, renders)
    metrics = score_directory(tmp_path / "imgs")
    assert metrics["overall"] >= 0.98 and sum(c["n"] for c in metrics["counts"].values()) == 2 * len(prompts)
    assert len(judge_directory(tmp_path / "imgs")) == 2 * len(prompts)

    parser = argparse.ArgumentParser()
    eval_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "shapes", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.json"),
                              "--results", str(tmp_path / "r.jsonl")])
    assert args.func(args) == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert written.pop("command") == f"iomm eval shapes --images={tmp_path / 'imgs'} --out={tmp_path / 'm.json'} " \
                                     f"--results={tmp_path / 'r.jsonl'}"
    machine = written.pop("machine")  # the machine that scored it, as every result file names it
    assert machine["cores"] >= 1 and isinstance(machine["flags"], list) and "bf16_native" in machine
    assert written == metrics
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2 * len(prompts)


def test_bad_metadata_names_file_line_and_field(tmp_path):
    (tmp_path / "images").mkdir()
    bad = {"include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle", "images": ["x.png"]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: field 'tag': expected one of"):
        score_directory(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({**bad, "tag": "single_object", "images": []}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: field 'images'"):
        score_directory(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: invalid JSON"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected a JSON object"):
        read_prompts(tmp_path / "p.jsonl")


def test_geneval_layout_reads_like_the_official_scorer(tmp_path):
    world, rng = World(), np.random.default_rng(9)
    folder = tmp_path / "g" / "00000"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n")
    Image.fromarray(world.render(world.scene_from_prompt(PROMPTS[0], rng))).save(folder / "samples" / "0000.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "samples" / "preview.png")  # not \d+.png: skipped
    (records,) = judge_directory(tmp_path / "g")
    assert records["filename"].endswith("0000.png") and records["correct"]
    (folder / "metadata.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps(PROMPTS[1]) + "\n")
    with pytest.raises(ValueError, match=r"00000/metadata.jsonl: expected one prompt line"):
        judge_directory(tmp_path / "g")


def test_model_flag_with_a_missing_run_errors_clearly(tmp_path, capsys):
    from iomm.cli import main

    assert main(["eval", "shapes", "--model", str(tmp_path / "no-run"), "--out", str(tmp_path / "m.json")]) == 2
    assert f"{tmp_path / 'no-run'}: no intact checkpoint found" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_eval_shapes_with_a_real_model_writes_all_six_categories_and_the_compositions(tiny_config, tmp_path):
    from iomm.nano.world import COMPOSITION_KINDS, COMPOSITIONS, GENEVAL_TAGS
    from iomm.training.trainer import Trainer

    Trainer(tiny_config("train.steps=1"), tmp_path / "run", progress=False).fit()
    parser = argparse.ArgumentParser()
    eval_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "shapes", "--model", str(tmp_path / "run"), "--per-category", "1",
                              "--samples", "2", "--out", str(tmp_path / "m.json")])
    assert args.func(args) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(GENEVAL_TAGS) | {"overall", "counts"} <= set(metrics)
    tags = (*GENEVAL_TAGS, COMPOSITIONS)
    assert metrics["counts"] == {tag: {"n": 2, "passed": metrics["counts"][tag]["passed"]} for tag in tags}
    assert metrics["overall"] == pytest.approx(sum(metrics[tag] for tag in GENEVAL_TAGS) / len(GENEVAL_TAGS))
    assert f"{COMPOSITIONS}_{COMPOSITION_KINDS[0]}" in metrics  # one prompt per category: the first kind only
    assert metrics["overall"] == pytest.approx(np.mean([metrics[tag] for tag in GENEVAL_TAGS]))
    assert len((tmp_path / "m_images" / "metadata.jsonl").read_text().splitlines()) == 7
