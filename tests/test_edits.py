"""Zero-shot editing scores: each case's target (the instructed change) and kept (nothing else changed), judged by
the scorer on rendered scenes whose answer is known, their rates, and the per-case records the study compares."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from iomm.cli import build_parser
from iomm.lab.studies import arm_commands, studies
from iomm.lab.study_comparisons import EDITS_RESULTS, compare_runs
from iomm.nano.edits import (
    CASE_FIELDS,
    CASES_PER_KIND,
    EDIT_KINDS,
    EditCase,
    edit_cases,
    edit_rates,
    evaluate_edits,
    new_object,
    score_edit,
)
from iomm.nano.world import COLORS, World, WorldConfig

WORLD = World(WorldConfig(resolution=32, max_objects=2))
CASES = edit_cases(n_per_kind=8, seed=0)


def scores(scene, case: EditCase) -> tuple[bool, bool, float, bool]:
    result = score_edit(WORLD.render(scene), case)
    return result["target"], result["kept"], result["score"], result["success"]


def with_extra_object(case: EditCase, rng: np.random.Generator):
    """The correctly edited scene plus an object in neither the source nor the target; None when none fits."""
    taken = {(o.shape, o.color) for o in (*case.source.objects, *case.target.objects)}
    for _ in range(10):
        extra = new_object(WORLD, case.target, rng)
        if extra is not None and (extra.shape, extra.color) not in taken:
            return replace(case.target, objects=(*case.target.objects, extra))
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.instruction for c in CASES])
def test_the_correct_edit_changes_the_target_and_keeps_the_rest(case):
    assert scores(case.target, case) == (True, True, 1.0, True)


@pytest.mark.parametrize("case", CASES, ids=[c.instruction for c in CASES])
def test_the_unchanged_source_keeps_everything_but_misses_the_change(case):
    assert scores(case.source, case) == (False, True, 0.5, False)
    assert score_edit(WORLD.render(case.source), case)["unchanged"]


def test_an_extra_object_spoils_kept_but_not_the_change():
    rng = np.random.default_rng(0)
    judged = {kind: 0 for kind in EDIT_KINDS}
    for case in CASES:
        scene = with_extra_object(case, rng)
        if scene is None:  # an add case whose three objects leave no room at 32 px
            continue
        assert scores(scene, case) == (True, False, 0.5, False), case.instruction
        judged[case.kind] += 1
    assert all(n >= 4 for n in judged.values()), judged


def test_removing_the_wrong_object_misses_the_change_and_loses_the_other():
    for case in (c for c in CASES if c.kind == "remove"):
        removed = [o for o in case.source.objects if o not in case.target.objects]
        assert scores(replace(case.source, objects=tuple(removed)), case) == (False, False, 0.0, False)


def test_a_recolour_to_another_colour_misses_the_change_and_adds_an_object():
    for case in (c for c in CASES if c.kind == "color"):
        (old,) = [o for o in case.source.objects if o not in case.target.objects]
        (new,) = [o for o in case.target.objects if o not in case.source.objects]
        wrong = next(c for c in COLORS if c not in (old.color, new.color))
        objects = tuple(replace(o, color=wrong) if o is old else o for o in case.source.objects)
        assert scores(replace(case.source, objects=objects), case) == (False, False, 0.0, False)


def test_rates_overall_and_per_kind():
    records = [
        {"kind": "color", "target": True, "kept": True, "score": 1.0, "success": True, "unchanged": False},
        {"kind": "color", "target": False, "kept": True, "score": 0.5, "success": False, "unchanged": True},
        {"kind": "add", "target": True, "kept": False, "score": 0.5, "success": False, "unchanged": False},
        {"kind": "add", "target": True, "kept": True, "score": 1.0, "success": True, "unchanged": False},
        {"kind": "remove", "target": False, "kept": False, "score": 0.0, "success": False, "unchanged": False},
        {"kind": "remove", "target": False, "kept": True, "score": 0.5, "success": False, "unchanged": True},
    ]
    rates = edit_rates(records)
    assert rates["edit_target"] == pytest.approx(3 / 6) and rates["edit_kept"] == pytest.approx(4 / 6)
    assert rates["edit_score"] == pytest.approx(3.5 / 6)
    assert (rates["edit_target_color"], rates["edit_target_add"], rates["edit_target_remove"]) == (0.5, 1.0, 0.0)
    assert (rates["edit_kept_color"], rates["edit_kept_add"], rates["edit_kept_remove"]) == (1.0, 0.5, 0.5)
    assert (rates["edit_color"], rates["edit_add"], rates["edit_remove"]) == (0.5, 0.5, 0.0)
    assert rates["edit_overall"] == pytest.approx(1 / 3)
    assert rates["copied_source"] == pytest.approx(2 / 6) and rates["edit_cases"] == 6


def fake_editor(monkeypatch, edits_correctly):
    """`generate_images` replaced by renders: the target scene of case i when edits_correctly(i), else the source."""
    def generate(pipeline, prompts, images, seed=0):
        cases = edit_cases(len(prompts) // len(EDIT_KINDS), seed, pipeline.cfg.data.resolution)
        assert [c.instruction for c in cases] == prompts
        return [Image.fromarray(WORLD.render(c.target if edits_correctly(i) else c.source))
                for i, c in enumerate(cases)]

    monkeypatch.setattr("iomm.inference.pipeline.generate_images", generate)
    return SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(resolution=32)))


def test_per_case_records_hold_what_the_seed_level_comparison_reads(tmp_path: Path, monkeypatch):
    seeds, per_kind = 3, 4
    for seed in range(seeds):
        for arm, edits_correctly in (("copier", lambda i: False), ("editor", lambda i, s=seed: i % (s + 2) != 0)):
            pipeline = fake_editor(monkeypatch, edits_correctly)
            metrics = evaluate_edits(pipeline, tmp_path / arm / f"seed{seed}" / EDITS_RESULTS.parent, per_kind)
            assert metrics["edit_cases"] == per_kind * len(EDIT_KINDS)
    records = [json.loads(line) for line in (tmp_path / "editor" / "seed0" / EDITS_RESULTS).read_text().splitlines()]
    assert len(records) == per_kind * len(EDIT_KINDS)
    assert all({"kind", *CASE_FIELDS} <= set(r) for r in records)
    assert [r["score"] for r in records] == [0.5 if i % 2 == 0 else 1.0 for i in range(len(records))]
    result = compare_runs(tmp_path / "copier", tmp_path / "editor", seeds, edit=True, n_boot=200)
    assert result["overall"]["verdict"] == "b_better" and result["overall"]["diff"] > 0


def test_the_cli_and_the_editing_study_run_at_least_192_cases_over_3_seeds(tmp_path: Path):
    args = build_parser().parse_args(["eval", "edits", "--model", "run", "--out", "m.json"])
    assert args.per_kind == CASES_PER_KIND and 3 * len(EDIT_KINDS) * CASES_PER_KIND >= 192
    study = studies()["editing"]
    for arm in study.arms:
        (edit,) = [c for c in arm_commands(arm, "nano.yaml", [], 0, tmp_path, tmp_path / "pre", 64) if "edits" in c]
        assert edit[edit.index("--per-kind") + 1] == str(CASES_PER_KIND)
