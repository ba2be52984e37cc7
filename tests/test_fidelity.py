"""Reconstruction fidelity (iomm.nano.fidelity) where the answer is known, and `iomm eval reconstruct` end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex

import numpy as np
import pytest
import torch

from iomm.nano.fidelity import ATTRIBUTES, TOLERANCE, compare, summarize, tolerance_px
from iomm.nano.world import COLORS, SHAPES, Scene, World, WorldConfig, WorldObject


def scenes(resolution: int, n: int, seed: int = 0, **kwargs) -> tuple[World, list[Scene]]:
    world = World(WorldConfig(resolution=resolution, **kwargs))
    stream = world.images(seed)
    return world, [next(stream)[1] for _ in range(n)]


def failed(result: dict[str, bool]) -> set[str]:
    return {key for key, ok in result.items() if not ok}


def replaced(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return dataclasses.replace(scene, objects=tuple(objects))


def fits(world: World, obj: WorldObject) -> bool:
    half, res = obj.extent / 2, world.config.resolution
    return half <= obj.cx <= res - half and half <= obj.cy <= res - half


# A hand-made asymmetric 32 px scene: a small red circle top left, a large blue square bottom right of centre.
ASYMMETRIC = Scene((WorldObject("circle", "red", "small", 6.5, 6.5, 9.0),
                    WorldObject("square", "blue", "large", 24.5, 22.5, 13.0)), "white")


@pytest.mark.parametrize("resolution,n", [(32, 120), (64, 40)])
def test_a_render_of_the_original_scene_is_exact(resolution, n):
    world, originals = scenes(resolution, n, seed=resolution)
    records = [compare(scene, world.render(scene), resolution) for scene in originals]
    assert summarize(records) == {**{key: 1.0 for key in ATTRIBUTES}, "n": n}


def test_the_tolerance_is_half_an_object():
    assert TOLERANCE == 0.5
    assert tolerance_px(32) == {"small": 4.5, "large": 6.5}
    assert tolerance_px(64) == {"small": 9.0, "large": 13.0}


@pytest.mark.parametrize("resolution", [32, 64])
def test_shifting_one_object_past_the_tolerance_fails_position(resolution):
    world, single = scenes(resolution, 20, seed=1, min_objects=1, max_objects=1)
    for scene in single:
        obj = scene.objects[0]
        step = math.floor(TOLERANCE * obj.extent) + 1  # just past the tolerance
        shifted = replaced(scene, 0, cx=obj.cx + (step if obj.cx < resolution / 2 else -step))
        assert fits(world, shifted.objects[0])
        result = compare(scene, world.render(shifted), resolution)
        assert {"exact", "position"} <= failed(result) <= {"exact", "position", "placement"}, (scene, result)
        inside = replaced(scene, 0, cx=obj.cx + (1 if obj.cx < resolution / 2 else -1))  # 1 px: within tolerance
        assert failed(compare(scene, world.render(inside), resolution)) <= {"placement"}  # may cross a cell edge


def test_an_object_at_its_neighbours_place_fails_exact():
    """Two objects swapped: each is at its neighbour's place. `position` ignores shape and colour, so it holds."""
    swapped = replaced(replaced(ASYMMETRIC, 0, cx=24.5, cy=22.5), 1, cx=8.5, cy=8.5)
    world = World(WorldConfig(resolution=32))
    assert failed(compare(ASYMMETRIC, world.render(swapped), 32)) == {"exact", "placement"}


@pytest.mark.parametrize("field, values, failing, seed", [
    ("color", tuple(COLORS), {"exact", "color"}, 2),
    ("shape", SHAPES, {"exact", "shape"}, 3),
], ids=["recolouring", "changing-the-shape"])
def test_changing_one_attribute_of_one_object_fails_it_and_exact(field, values, failing, seed):
    world, originals = scenes(32, 40, seed=seed)
    for scene in originals:
        value = next(v for v in values if v != getattr(scene.objects[0], field))
        result = compare(scene, world.render(replaced(scene, 0, **{field: value})), 32)
        assert failed(result) == failing, (scene, result)


def test_removing_one_object_fails_count_and_exact():
    world, originals = scenes(32, 40, seed=4)
    for scene in originals:
        result = compare(scene, world.render(dataclasses.replace(scene, objects=scene.objects[1:])), 32)
        assert {"exact", "count", "position", "shape", "color"} <= failed(result), (scene, result)


def test_an_extra_object_fails_exact_and_count_but_not_position():
    world = World(WorldConfig(resolution=32))
    extra = dataclasses.replace(ASYMMETRIC, objects=(*ASYMMETRIC.objects,
                                                     WorldObject("triangle", "green", "small", 25.5, 6.5, 9.0)))
    assert failed(compare(ASYMMETRIC, world.render(extra), 32)) == {"exact", "count", "shape", "color"}


def _mirror_is_far(scene: Scene, resolution: int) -> bool:
    """Some object has no object of the mirrored scene within its tolerance: the scene is asymmetric."""
    return any(all(math.hypot(resolution - m.cx - o.cx, m.cy - o.cy) > TOLERANCE * o.extent for m in scene.objects)
               for o in scene.objects)


def test_a_mirrored_render_of_an_asymmetric_scene_fails_position():
    world = World(WorldConfig(resolution=32))
    result = compare(ASYMMETRIC, world.render(ASYMMETRIC)[:, ::-1], 32)
    assert {"exact", "position", "placement"} <= failed(result) and result["shape"] and result["color"]
    world, originals = scenes(32, 60, seed=5)
    asymmetric = [scene for scene in originals if _mirror_is_far(scene, 32)]
    assert len(asymmetric) >= 40
    for scene in asymmetric:
        assert {"exact", "position"} <= failed(compare(scene, world.render(scene)[:, ::-1].copy(), 32)), scene


def test_blur_keeps_the_objects_in_place():
    world, originals = scenes(32, 30, seed=6)
    for scene in originals:
        image = world.render(scene).astype(np.float32)
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        kernel = np.array([0.25, 0.5, 0.25])  # 3x3 binomial blur
        weights = np.outer(kernel, kernel)
        blurred = sum(weights[dy + 1, dx + 1] * padded[1 + dy:33 + dy, 1 + dx:33 + dx]
                      for dy, dx in itertools.product((-1, 0, 1), repeat=2))
        result = compare(scene, np.round(blurred).astype(np.uint8), 32)
        assert result["position"] and result["placement"], (scene, result)


def test_placement_follows_the_largest_object():
    world = World(WorldConfig(resolution=32))
    moved = replaced(ASYMMETRIC, 1, cx=20.5, cy=8.5)  # the large square from the bottom-right cell to the top row
    moved = replaced(moved, 0, cx=6.5, cy=24.5)
    result = compare(ASYMMETRIC, world.render(moved), 32)
    assert not result["placement"] and not result["position"] and result["count"]
    tie = Scene((WorldObject("circle", "red", "large", 7.5, 7.5, 13.0),
                 WorldObject("square", "blue", "large", 23.5, 23.5, 13.0)), "white")
    only_one = dataclasses.replace(tie, objects=tie.objects[1:])  # either large object's cell counts
    assert compare(tie, world.render(only_one), 32)["placement"]
    assert not compare(tie, np.full((32, 32, 3), 255, np.uint8), 32)["placement"]  # nothing detected


def test_compare_checks_the_resolution():
    with pytest.raises(ValueError, match="expected a 64x64 image"):
        compare(ASYMMETRIC, np.zeros((32, 32, 3), np.uint8), 64)


def test_summarize_averages_each_key():
    records = [{"exact": True, "count": True, "mse_own": 0.1}, {"exact": False, "count": True, "mse_own": 0.3},
               {"exact": False, "count": False, "mse_own": 0.2}, {"exact": True, "count": True, "mse_own": 0.0}]
    summary = summarize(records)
    assert summary == {"exact": 0.5, "count": 0.75, "mse_own": pytest.approx(0.15), "n": 4}
    with pytest.raises(ValueError, match="at least one record"):
        summarize([])
    with pytest.raises(ValueError, match="the keys"):
        summarize([{"exact": True}, {"count": True}])


def test_a_perfect_regeneration_of_the_held_out_set_scores_one():
    """The model-free part of the evaluation: the held-out images (the sample grid's) against their own scenes."""
    from types import SimpleNamespace

    from iomm.config_checks import load_config
    from iomm.nano.reconstruction import held_out_scenes, records_for
    from iomm.registry import builtin_data

    cfg = load_config(None, ["data.resolution=32"])
    originals, scene_list = held_out_scenes(SimpleNamespace(cfg=cfg), 12)
    assert originals.shape == (12, 3, 32, 32) and len(scene_list) == 12
    assert (originals[:8] == builtin_data("world").held_out(cfg, 8)).all()
    summary = summarize(records_for(scene_list, originals, originals))
    assert {key: summary[key] for key in ATTRIBUTES} == {key: 1.0 for key in ATTRIBUTES}
    assert summary["mse_own"] == 0.0 and summary["mse_other"] > 0.05
    with pytest.raises(ValueError, match="data.source='world'"):
        folder = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="folder", path="images"))
        held_out_scenes(SimpleNamespace(cfg=folder), 1)


def test_eval_reconstruct_on_a_tiny_run_matches_a_direct_call(tiny_config, tmp_path, capsys):
    from iomm.cli import main
    from iomm.inference.pipeline import load_model
    from iomm.nano.reconstruction import evaluate_reconstruction, reconstruct
    from iomm.registry import builtin_data
    from iomm.training.trainer import Trainer

    cfg = tiny_config("train.steps=1", "masking.ratio=0.45")
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    out = tmp_path / "fidelity.json"
    assert main(["eval", "reconstruct", "--model", str(tmp_path / "run"), "--n", "3", "--seed", "7",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == str(tmp_path / "run") and report["n"] == 3
    assert report["tolerance"] == {"fraction_of_extent": 0.5, "px": {"small": 4.5, "large": 6.5}}
    assert set(report["ratios"]) == {"0.0", "0.45"}
    model = load_model(tmp_path / "run")
    direct = evaluate_reconstruction(model, [0.0, 0.45], n=3, seed=7)
    assert model.cfg.masking.ratio == 0.45  # the run's config is restored after each ratio
    assert direct[0.0]["mse_own"] != direct[0.45]["mse_own"]  # the ratio reaches the condition
    for ratio, metrics in report["ratios"].items():
        assert set(metrics) == {*ATTRIBUTES, "mse_own", "mse_other", "n"} and metrics["n"] == 3
        assert all(0.0 <= metrics[key] <= 1.0 for key in (*ATTRIBUTES, "mse_own", "mse_other"))
        assert metrics == pytest.approx(direct[float(ratio)])
    assert "mse_own" in printed and f"wrote {out}" in printed
    assert report["guidance_scale"] == model.cfg.flow.guidance_scale and report["steps"] == model.cfg.flow.sample_steps

    originals = builtin_data("world").held_out(model.cfg, 2)
    model.cfg.flow.reconstruct_guidance_scale = 2.5  # regenerations follow it, text-to-image keeps guidance_scale
    assert torch.equal(reconstruct(model, originals, 0.0, seed=1), reconstruct(model, originals, 0.0, 1, None, 2.5))
    assert not torch.equal(reconstruct(model, originals, 0.0, seed=1),
                           reconstruct(model, originals, 0.0, 1, None, model.cfg.flow.guidance_scale))

    results = tmp_path / "records.jsonl"
    assert main(["eval", "reconstruct", "--model", str(tmp_path / "run"), "--ratio", "0.2", "--n", "2",
                 "--steps", "3", "--cfg", "2.0", "--out", str(out), "--results", str(results)]) == 0
    second = json.loads(out.read_text())
    assert set(second["ratios"]) == {"0.2"} and second["steps"] == 3 and second["guidance_scale"] == 2.0
    assert second["command"] == shlex.join(["iomm", "eval", "reconstruct", "--model", str(tmp_path / "run"), "--n", "2",
                                            "--seed", "0", "--ratio", "0.2", "--steps", "3", "--cfg", "2.0",
                                            "--out", str(out), "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["ratio"], r["scene"]) for r in records] == [("0.2", 0), ("0.2", 1)]
    assert np.mean([r["exact"] for r in records]) == json.loads(out.read_text())["ratios"]["0.2"]["exact"]
    compared = tmp_path / "compare.json"
    assert main(["eval", "compare", str(results), str(results), "--out", str(compared)]) == 0
    same = json.loads(compared.read_text())["results"]["overall"]
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["verdict"] == "inconclusive"
    with pytest.raises(SystemExit, match="--ratio: expected values in"):
        main(["eval", "reconstruct", "--model", str(tmp_path / "run"), "--ratio", "1.0", "--out", str(out)])
