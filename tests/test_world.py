import argparse
import itertools
import json
import re

import numpy as np
import pytest

from iomm.image_tensors import captioned_grid
from iomm.nano.commands import world as world_command
from iomm.nano.prompts import eval_prompts
from iomm.nano.world import (
    CLEAR_POSITION_THRESHOLD,
    COLORS,
    COMPOSITION_KINDS,
    COMPOSITIONS,
    GENEVAL_TAGS,
    HELD_OUT,
    HELD_OUT_COUNTS,
    HELD_OUT_RELATIONS,
    INVERSE_RELATIONS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    VOCABULARY,
    Scene,
    World,
    WorldConfig,
    WorldObject,
    held_out_kinds,
    is_held_out,
    relative_position,
    scene_from_dict,
    scene_to_dict,
    validate_prompt,
)


def obj(shape, color, cx, cy, extent=9.0, size="small"):
    return WorldObject(shape, color, size, cx, cy, extent)


def test_world_constants_match_the_spec():
    assert SHAPES == ("circle", "square", "triangle")
    assert len(COLORS) >= 6 and RELATIONS == ("left of", "right of", "above", "below")
    assert len(HELD_OUT) == 4 and all(c in COLORS and s in SHAPES for c, s in HELD_OUT)
    palette = np.array(list(COLORS.values()), dtype=float)
    pairwise = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert pairwise[~np.eye(len(palette), dtype=bool)].min() > 90  # well separated
    for bg in ((255, 255, 255), (0, 0, 0)):
        assert np.linalg.norm(palette - bg, axis=1).min() > 150
    assert (palette.max(axis=1) - palette.min(axis=1)).min() > 100  # nothing near grey


def test_same_seed_same_world_different_seed_different_world():
    a, b = World(), World()
    first = [img for img, _ in itertools.islice(a.images(7), 20)]
    again = [img for img, _ in itertools.islice(b.images(7), 20)]
    other = [img for img, _ in itertools.islice(a.images(8), 20)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    assert [c for _, c, _ in a.pairs(30, seed=1)] == [c for _, c, _ in b.pairs(30, seed=1)]
    assert eval_prompts(8, seed=3) == eval_prompts(8, seed=3) != eval_prompts(8, seed=4)


@pytest.mark.parametrize("resolution,background", [(32, "white"), (64, "black"), (32, "mixed")])
def test_objects_inside_image_without_overlap(resolution, background):
    world = World(WorldConfig(resolution=resolution, background=background))
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        scene = world.sample_scene(rng)
        counts.add(len(scene.objects))
        boxes = [o.bbox for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert (x0 >= world.edge and y0 >= world.edge
                    and x1 <= resolution - world.edge and y1 <= resolution - world.edge)
        for (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) in itertools.combinations(boxes, 2):
            apart_x = ax1 + world.gap <= bx0 or bx1 + world.gap <= ax0
            apart_y = ay1 + world.gap <= by0 or by1 + world.gap <= ay0
            assert apart_x or apart_y
        image = world.render(scene)
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        for o in scene.objects:  # the object's centre pixel has its colour
            assert tuple(image[int(o.cy), int(o.cx)]) == COLORS[o.color]
    assert counts == {1, 2, 3, 4}


def test_sizes_are_classifiable_at_32_px():
    world = World()
    assert world.extents == {"small": 9, "large": 13}
    assert World(WorldConfig(resolution=64)).extents == {"small": 18, "large": 26}


def test_caption_grammar():
    world = World()
    one = Scene((obj("circle", "red", 8, 8),), "white")
    assert world.caption(one) == "a photo of a red circle"
    assert world.caption(one, with_color=False) == "a photo of a circle"
    two_same = Scene((obj("square", "blue", 8, 8), obj("square", "blue", 24, 24)), "white")
    assert world.caption(two_same) == "a photo of two blue squares"
    mixed = Scene((obj("triangle", "yellow", 6, 6), obj("circle", "cyan", 24, 6),
                   obj("triangle", "yellow", 6, 24), obj("triangle", "yellow", 24, 24)), "white")
    assert world.caption(mixed) == "a photo of three yellow triangles and a cyan circle"
    related = Scene((obj("circle", "red", 6, 16), obj("square", "blue", 26, 16)), "white", relation="left of")
    assert world.caption(related) == "a photo of a red circle left of a blue square"
    assert world.caption(related, with_color=False) == "a photo of a circle left of a square"
    unrelated = Scene(related.objects, "white")
    assert world.caption(unrelated) == "a photo of a red circle and a blue square"
    same_shape = Scene((obj("circle", "red", 6, 16), obj("circle", "blue", 26, 16)), "white", relation="left of")
    assert world.caption(same_shape, with_color=False) == "a photo of two circles"


def test_stated_relations_hold_under_genevals_rule():
    world, rng = World(), np.random.default_rng(0)
    stated = 0
    for _ in range(2000):
        scene = world.sample_scene(rng)
        if scene.relation is not None:
            stated += 1
            assert len(scene.objects) == 2
            a, b = scene.objects
            assert scene.relation in relative_position(a.bbox, b.bbox, CLEAR_POSITION_THRESHOLD)
            assert scene.relation in relative_position(a.bbox, b.bbox)
            assert f" {scene.relation} " in world.caption(scene)
    assert stated > 50
    assert {s.relation for s in (world.sample_scene(rng) for _ in range(3000))} >= set(RELATIONS)


def test_relative_position_matches_geneval():
    assert relative_position((0, 10, 10, 20), (20, 10, 30, 20)) == {"left of"}
    assert relative_position((20, 10, 30, 20), (0, 10, 10, 20)) == {"right of"}
    assert relative_position((10, 0, 20, 10), (10, 20, 20, 30)) == {"above"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # offset within 0.1 * (dims)


def held_out_caption_patterns() -> dict[str, list[re.Pattern]]:
    """What a caption would say to state each kind of held-out composition (colour words optional where they
    may stand, either phrasing of a relation)."""
    relations = [statement for a, r, b in HELD_OUT_RELATIONS for statement in ((a, r, b), (b, INVERSE_RELATIONS[r], a))]
    return {"color_shape": [re.compile(rf"\b{c} {s}s?\b") for c, s in HELD_OUT],
            "count_shape": [re.compile(rf"\b{NUMBER_WORDS[k]} (\w+ )?{PLURALS[s]}\b") for k, s in HELD_OUT_COUNTS],
            "relation": [re.compile(rf"\b{a} {r} a (\w+ )?{b}\b") for a, r, b in relations]}


def scene_shows(scene: Scene, kind: str) -> bool:
    """Whether a scene's image shows a held-out composition of `kind` (a relation by GenEval's rule, stated or not)."""
    if kind == "color_shape":
        return any(is_held_out(o.color, o.shape) for o in scene.objects)
    if kind == "count_shape":
        groups = [(o.color, o.shape) for o in scene.objects]
        return any([o.shape for o in scene.objects].count(s) == k or any(groups.count((c, s)) == k for c, _ in groups)
                   for k, s in HELD_OUT_COUNTS)
    return any(r in relative_position(x.bbox, y.bbox, CLEAR_POSITION_THRESHOLD)
               for x, y in itertools.permutations(scene.objects, 2) for a, r, b in HELD_OUT_RELATIONS
               if (x.shape, y.shape) == (a, b))


@pytest.mark.parametrize("n", [128, 512, 2048])
def test_no_pair_set_states_or_shows_a_held_out_composition(n):
    """Every pair source of the world draws from `World.pairs`: the N-pair sets (two seeds) and fresh pairs."""
    world = World(WorldConfig(background="mixed"))
    pairs = world.pairs(n, seed=0) + world.pairs(n, seed=1)
    if n == 128:  # unlimited fresh pairs draw one pair per seed
        pairs += [world.pairs(1, seed)[0] for seed in range(2000)]
    patterns = held_out_caption_patterns()
    colorless = 0
    for image, caption, scene in pairs:
        assert not held_out_kinds(scene), (caption, scene)
        for kind, kind_patterns in patterns.items():
            assert not any(p.search(caption) for p in kind_patterns), (kind, caption)
        assert not any(scene_shows(scene, kind) for kind in ("color_shape", "count_shape"))
        colorless += not any(c in caption.split() for c in COLORS)
        assert image.shape == (32, 32, 3)
    assert 0.15 < colorless / len(pairs) < 0.35


def test_the_image_stream_shows_every_held_out_composition():
    world = World()
    stream = [scene for _, scene in itertools.islice(world.images(0), 1000)]
    assert {(o.color, o.shape) for s in stream for o in s.objects} >= set(HELD_OUT)
    for k, s in HELD_OUT_COUNTS:
        assert any([o.shape for o in scene.objects].count(s) == k for scene in stream)
    for a, r, b in HELD_OUT_RELATIONS:
        assert any(r in relative_position(x.bbox, y.bbox, CLEAR_POSITION_THRESHOLD) for scene in stream
                   for x, y in itertools.permutations(scene.objects, 2) if (x.shape, y.shape) == (a, b))
    # the unlabeled stream's own captions (never used for training) would state them: the kinds really occur there
    assert {kind for scene in stream for kind in held_out_kinds(scene)} == set(COMPOSITION_KINDS)


def test_vocabulary_covers_every_caption_and_prompt_word():
    world = World(WorldConfig(background="mixed"))
    words = {w for _, caption, _ in world.pairs(2000, seed=0) for w in caption.split()}
    words |= {w for _, scene in itertools.islice(world.images(0), 2000) for w in world.caption(scene).split()}
    words |= {w for meta in eval_prompts(64, seed=0) for w in meta["prompt"].split()}
    assert words == set(VOCABULARY)
    assert all(w.islower() and w.isalpha() for w in VOCABULARY)


def test_eval_prompts_follow_genevals_layout():
    prompts = eval_prompts(per_category=12, seed=0)
    assert [m["tag"] for m in prompts] == [t for t in (*GENEVAL_TAGS, COMPOSITIONS) for _ in range(12)]
    prompts = [m for m in prompts if m["tag"] != COMPOSITIONS]
    for meta in prompts:
        validate_prompt(meta)
        assert list(meta)[:2] == ["tag", "include"] and "prompt" in meta and isinstance(meta["held_out"], bool)
        words = meta["prompt"].split()
        assert words[:3] == ["a", "photo", "of"]
        tag, include = meta["tag"], meta["include"]
        if tag == "counting":
            (item,) = include
            assert (item["count"] in (2, 3, 4)
                    and meta["exclude"] == [{"class": item["class"], "count": item["count"] + 1}])
            assert meta["prompt"] == f"a photo of {NUMBER_WORDS[item['count']]} {item['class']}s"
        else:
            assert "exclude" not in meta and all(item["count"] == 1 for item in include)
        if tag == "position":
            target, subject = include
            relation, index = subject["position"]
            assert index == 0 and meta["prompt"] == f"a photo of a {subject['class']} {relation} a {target['class']}"
        if tag in ("colors", "color_attr"):
            assert all("color" in item for item in include)
            assert meta["prompt"] == "a photo of " + " and ".join(f"a {i['color']} {i['class']}" for i in include)
        else:
            assert not any("color" in item for item in include) and not meta["held_out"]
        if tag in ("two_object", "position", "color_attr"):
            assert len({item["class"] for item in include}) == 2
    colored = [m for m in prompts if m["tag"] in ("colors", "color_attr")]
    assert sum(m["held_out"] for m in colored) == len(colored) // 2
    held = {(i["color"], i["class"]) for m in colored for i in m["include"] if is_held_out(i.get("color"), i["class"])}
    assert held == set(HELD_OUT)


def test_composition_prompts_ask_only_for_held_out_compositions_each_kind_in_turn():
    prompts = [m for m in eval_prompts(per_category=12, seed=0) if m["tag"] == COMPOSITIONS]
    assert [m["kind"] for m in prompts] == list(COMPOSITION_KINDS) * 4
    patterns = held_out_caption_patterns()
    for meta in prompts:
        validate_prompt(meta)
        assert any(p.search(meta["prompt"]) for p in patterns[meta["kind"]]), meta
    texts = {m["prompt"] for m in prompts}
    assert {"a photo of three triangles", "a photo of a circle above a square", "a photo of a square below a circle",
            "a photo of a red triangle"} <= texts


def test_scene_from_prompt_has_exactly_the_prompted_objects():
    world, rng = World(), np.random.default_rng(0)
    for meta in eval_prompts(16, seed=2):
        scene = world.scene_from_prompt(meta, rng)
        want = sorted((i["class"], i.get("color")) for i in meta["include"] for _ in range(i["count"]))
        got = sorted((o.shape, o.color if any("color" in i for i in meta["include"]) else None) for o in scene.objects)
        assert got == want
        if "position" in meta["include"][-1]:
            relation = meta["include"][1]["position"][0]
            assert scene.relation == relation and scene.objects[0].shape == meta["include"][1]["class"]
            assert relation in relative_position(scene.objects[0].bbox, scene.objects[1].bbox)


def test_scene_dict_round_trip():
    world, rng = World(), np.random.default_rng(0)
    scene = world.sample_scene(rng)
    data = json.loads(json.dumps(scene_to_dict(scene)))
    assert scene_from_dict(data) == scene
    assert data["objects"][0]["bbox"] == list(scene.objects[0].bbox)


@pytest.mark.parametrize("kwargs,field", [({"resolution": 8}, "resolution"), ({"max_objects": 5}, "max_objects"),
                                          ({"background": "grey"}, "background")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**kwargs)


@pytest.mark.parametrize("meta,field", [
    ({"include": [{"class": "circle", "count": 1}], "prompt": "x"}, "tag"),
    ({"tag": "colors", "include": [{"class": "dog", "count": 1}]}, r"include\[0\].class"),
    ({"tag": "colors", "include": [{"class": "circle", "count": 0}]}, r"include\[0\].count"),
    ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "grey"}]}, r"include\[0\].color"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["near", 0]}]}, "position"),
])
def test_bad_prompt_names_the_field(meta, field):
    with pytest.raises(ValueError, match=field):
        validate_prompt(meta, "prompts.jsonl:3")


def test_captioned_grid_and_world_commands(tmp_path):
    images = [img for img, _ in itertools.islice(World().images(0), 5)]
    grid = captioned_grid(images, ["a photo of a red circle and a blue square"] * 5, scale=4, columns=4)
    assert grid.width == 4 * (128 + 4) + 4 and grid.height > 2 * 128

    parser = argparse.ArgumentParser()
    world_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "sample", "--n", "6", "--out", str(tmp_path / "s"), "--pairs", "--grid"])
    assert args.func(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and (tmp_path / "s" / "grid.png").is_file()
    assert {"image", "caption", "held_out", "objects", "background"} <= set(lines[0])
    assert all((tmp_path / "s" / x["image"]).is_file() and not x["held_out"] for x in lines)

    out = tmp_path / "prompts.jsonl"
    args = parser.parse_args(["world", "prompts", "--out", str(out), "--per-category", "2",
                              "--render", str(tmp_path / "r"), "--samples", "2"])
    assert args.func(args) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == eval_prompts(2, 0)
    rendered = [json.loads(x) for x in (tmp_path / "r" / "metadata.jsonl").read_text().splitlines()]
    assert len(rendered) == 14 and all(len(x["images"]) == 2 for x in rendered)


def test_world_sample_command_is_deterministic_per_seed_and_writes_counts(tmp_path):
    parser = argparse.ArgumentParser()
    world_command.register(parser.add_subparsers(dest="command"))

    def sample(name: str, seed: int) -> list[dict]:
        args = parser.parse_args(["world", "sample", "--n", "8", "--out", str(tmp_path / name), "--seed", str(seed)])
        assert args.func(args) == 0
        return [json.loads(x) for x in (tmp_path / name / "metadata.jsonl").read_text().splitlines()]

    first, again, other = sample("a", 3), sample("b", 3), sample("c", 4)
    assert first == again != other
    assert all((tmp_path / "a" / x["image"]).read_bytes() == (tmp_path / "b" / x["image"]).read_bytes() for x in first)
    for line in first:
        scene = scene_from_dict(line)
        assert line["counts"] == {s: n for s in SHAPES if (n := sum(o.shape == s for o in scene.objects))}
        assert line["caption"] == World().caption(scene)
