"""Studies: arms share their pre-training where its settings are equal, and a tiny study runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from iomm.config import ConfigError
from iomm.config_checks import packaged_config
from iomm.evaluation.paired import NOT_DECIDED
from iomm.lab.studies import (
    Arm,
    Study,
    arm_commands,
    arm_configs,
    check_arms,
    pretrain_dir,
    run_study,
    studies,
)
from iomm.lab.study_report import mean_curve, reconstruction_curve
from iomm.nano.world import COMPOSITIONS, GENEVAL_TAGS


def test_recipes_pretrain_once_per_stage1_setting(tmp_path: Path) -> None:
    arms = studies()["recipes"].arms
    assert len(arms) == 6
    dirs = {pretrain_dir(tmp_path, arm, 0) for arm in arms}
    assert len(dirs) == 2  # image-only and pair pre-training
    image_mix = next(a for a in arms if a.name == "image+mix")
    finetune = arm_commands(image_mix, "c.yaml", [], 0, tmp_path / "arm", pretrain_dir(tmp_path, image_mix, 0), 8)[0]
    assert finetune[finetune.index("--init") + 1] == str(pretrain_dir(tmp_path, image_mix, 0))
    assert "--set=finetune.mix_ratio=0.5" in finetune and "--set=train.mix_ratio=1.0" in finetune
    assert pretrain_dir(tmp_path, image_mix, 0) != pretrain_dir(tmp_path, image_mix, 1)


def test_lora_mix_scores_the_existing_model_it_starts_from(tmp_path: Path) -> None:
    arms = {a.name: a for a in studies()["lora-mix"].arms}
    existing, mix = arms["existing"], arms["lora-mix"]
    assert pretrain_dir(tmp_path, existing, 1) == pretrain_dir(tmp_path, mix, 1)  # the model the LoRA arms adapt
    commands = arm_commands(existing, "c.yaml", [], 1, tmp_path / "arm", pretrain_dir(tmp_path, existing, 1), 8)
    assert len(commands) == 1 and commands[0][3:5] == ["eval", "shapes"]
    assert commands[0][commands[0].index("--model") + 1] == str(pretrain_dir(tmp_path, existing, 1))
    finetune, evaluate = arm_commands(mix, "c.yaml", [], 1, tmp_path / "mix", pretrain_dir(tmp_path, mix, 1), 8)
    assert finetune[3] == "finetune" and evaluate[evaluate.index("--model") + 1] == str(tmp_path / "mix/finetune")


def test_tiny_study_end_to_end(tiny_mllm_dir: Path, tmp_path: Path) -> None:
    study = Study("tiny", [Arm("pair", (), ("finetune.mix_ratio=0.0",)), Arm("mix", (), ("finetune.mix_ratio=0.5",))],
                  "two fine-tuning arms on one shared pre-training", "mix", common=["train.sample_every=1"],
                  curves=True)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("train.sample_every")]  # the study's own setting counts
    common = [f"mllm.path={tiny_mllm_dir}", *tiny, "data.pairs=world:16",
              "train.steps=2", "finetune.steps=2"]
    out = run_study(study, str(packaged_config("nano")), 1, tmp_path / "study", parallel=2, per_category=1,
                    common=common, samples=2)
    record = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["arm"] for r in record["results"]] == ["pair", "mix"]
    for row in record["results"]:  # one prompt per tag, one sample: each tag passes or fails, overall is their mean
        metrics = json.loads((out / row["arm"] / "seed0/metrics.json").read_text(encoding="utf-8"))
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        assert row == {"arm": row["arm"], "seed": 0, **numbers,
                       **{k: metrics[k]["accuracy"] for k in ("colors_held_out", "colors_seen")
                          if metrics[k]["accuracy"] is not None}}  # the scorer's split, as numbers
        assert row[COMPOSITIONS] == metrics[COMPOSITIONS]  # the held-out compositions, beside overall
        assert all(row[tag] in (0.0, 1.0) for tag in GENEVAL_TAGS)
        assert row["overall"] == pytest.approx(sum(row[tag] for tag in GENEVAL_TAGS) / 6)
    assert len(list((out / "pretrain").glob("*/seed0/done"))) == 1
    assert (out / "results.csv").is_file() and (out / "results.png").is_file() and (out / "curves.png").is_file()
    assert record["curves"]["mix"]["step"] == [1, 2] and len(record["curves"]["mix"]["recon_mse_own"]) == 2
    table = (out / "results.md").read_text(encoding="utf-8").splitlines()
    mix = next(line for line in table if line.startswith("| mix |"))
    assert f"{record['summary']['mix']['overall'][0]:.3f} ± 0.000 |" in mix and not record["resumed"]
    assert any(line.startswith("| mix | 2 |") for line in table)  # the regeneration table, at the last step
    paired = record["paired"]["pair"]["overall"]  # pair (b) against the reference mix (a), 6 prompts x 2 images
    assert paired["n"] == 12 and paired["a"] == pytest.approx(record["summary"]["mix"]["overall"][0])
    assert paired["diff"] == pytest.approx(record["summary"]["pair"]["overall"][0] - paired["a"])
    assert paired["n_seeds"] == 1 and paired["t_ci95"] is None and paired["verdict"] == NOT_DECIDED
    assert record["finding"] == NOT_DECIDED and record["samples"] == 2  # one training run per arm decides nothing
    assert any(line.startswith("| pair |") and "[" in line and NOT_DECIDED in line for line in table)
    rerun = run_study(study, str(packaged_config("nano")), 1, out, parallel=2, per_category=1, common=common,
                      samples=2)
    assert json.loads((rerun / "results.json").read_text(encoding="utf-8"))["resumed"]


def test_arms_start_as_soon_as_their_own_stage1_is_done_and_scored_arms_skip_it(tmp_path: Path, monkeypatch) -> None:
    """Two workers, a slow stage 1 shared by two arms and a fast one: the fast one's arm runs while the slow stage 1
    still trains, no arm starts before its stage 1 is done, never more than two jobs at once; a stage 1 whose arms
    are all scored is not run again."""
    import threading
    import time

    from iomm.lab import studies as module

    events: list[tuple[str, str, float]] = []
    lock, active, peak = threading.Lock(), [0], [0]

    def job(name: str, work) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            events.append(("start", name, time.monotonic()))
        work()
        with lock:
            active[0] -= 1
            events.append(("end", name, time.monotonic()))

    fast_arm_done = threading.Event()  # the slow stage 1 runs until the fast arm is done (or 30 s pass)

    def fake_pretrain(arm, config, common, seed, out):
        job(f"stage1:{'+'.join(arm.pretrain)}:{seed}", lambda: fast_arm_done.wait(30) if arm.pretrain == ("slow",)
            else None)
        return out

    def fake_arm(arm, config, common, seed, out, pretrained, per_category, samples):
        job(f"arm:{arm.name}:{seed}", lambda: arm.name == "c" and fast_arm_done.set())
        return {"overall": 0.5}

    monkeypatch.setattr(module, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(module, "run_arm", fake_arm)
    arms = [Arm("a", ("slow",)), Arm("b", ("slow",)), Arm("c", ("fast",))]
    rows = module.run_arms("t", arms, "cfg", 1, tmp_path, 2, 4, [], 1)
    assert [(r["arm"], r["overall"]) for r in rows] == [("a", 0.5), ("b", 0.5), ("c", 0.5)]
    when = {(kind, name): t for kind, name, t in events}
    assert peak[0] == 2
    assert when[("end", "arm:c:0")] < when[("end", "stage1:slow:0")]  # pipelined, not stage 1 first for all
    for arm, stage in (("a", "slow"), ("b", "slow"), ("c", "fast")):
        assert when[("start", f"arm:{arm}:0")] >= when[("end", f"stage1:{stage}:0")]

    events.clear()
    fast_arm_done.set()
    for name in ("a", "b"):
        (module.arm_dir(tmp_path, Arm(name)) / "seed0").mkdir(parents=True)
        (module.arm_dir(tmp_path, Arm(name)) / "seed0" / "metrics.json").write_text("{}")
    module.run_arms("t", arms, "cfg", 1, tmp_path, 2, 4, [], 1)
    assert {name for kind, name, _ in events if name.startswith("stage1")} == {"stage1:fast:0"}


def test_reconstruction_curve_keeps_the_last_of_a_repeated_step_and_averages_seeds(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 1.0}, {"step": 100, "recon_mse_own": 0.5, "recon_mse_other": 0.6},
            {"step": 200, "recon_mse_own": 0.4, "recon_mse_other": 0.6},
            {"step": 200, "recon_mse_own": 0.3, "recon_mse_other": 0.5}]  # resumed after step 200's log line
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    curve = reconstruction_curve(tmp_path)
    assert curve == {100: (0.5, 0.6), 200: (0.3, 0.5)}
    mean = mean_curve([curve, {100: (0.7, 0.8), 200: (0.5, 0.5), 300: (0.1, 0.1)}])
    assert mean["step"] == [100, 200] and mean["recon_mse_own"] == [0.6, 0.4] and mean["recon_mse_other"] == [0.7, 0.5]
    assert abs(mean["recon_mse_own_std"][0] - 0.1414) < 1e-3 and mean["recon_mse_other_std"][1] == 0.0


def test_adapter_and_mask_ratio_studies_record_regeneration_curves() -> None:
    for name in ("adapter", "mask-ratio"):
        study = studies()[name]
        assert study.curves and any(c.startswith("train.sample_every=") for c in study.common)
    adapter = studies()["adapter"]
    assert [a.name for a in adapter.arms] == ["raw", "free_queries", "rqa"]


def test_a_finding_is_decided_by_the_intervals_against_the_reference() -> None:
    from iomm.lab.study_comparisons import finding

    def arm(verdict: str) -> dict:
        return {"overall": {"verdict": verdict}}

    assert finding({"x": arm("a_better"), "y": arm("a_better")}) == "reproduced"
    assert finding({"x": arm("a_better"), "y": arm(NOT_DECIDED)}) == NOT_DECIDED
    assert finding({"x": arm("a_better"), "y": arm("inconclusive")}) == "inconclusive"
    assert finding({"x": arm("a_better"), "y": arm("b_better")}) == "contradicted"
    assert {s.reference for s in studies().values()} <= {a.name for s in studies().values() for a in s.arms}
    for study in studies().values():
        assert study.reference in [a.name for a in study.arms]


@pytest.mark.parametrize("name", sorted(studies()))
def test_every_arm_of_every_study_is_a_valid_config_of_the_nano_recipe(name: str) -> None:
    """An arm whose overrides clash with configs/nano.yaml would fail only when its turn comes, mid-study."""
    check_arms(studies()[name], str(packaged_config("nano")), [])
    with pytest.raises(ConfigError, match="adapter.token_loss"):  # what `iomm study` now refuses up front
        check_arms(Study("x", [Arm("raw", ("adapter.kind=raw",))], "", "raw"), str(packaged_config("nano")), [])


def test_condition_path_study_runs_the_paper_path_through_both_stages() -> None:
    study = studies()["condition-path"]
    arms = {a.name: a for a in study.arms}

    def layout(cfg) -> tuple:
        return (cfg.adapter.key_positions, cfg.adapter.query_scale, cfg.adapter.token_loss,
                cfg.connector.token_positions, cfg.flow.logit_mean)

    for name, expected in (("nano", (True, 47.0, 1.0, True, 1.0)), ("paper-path", (False, 1.0, 0.0, False, 0.0))):
        stage1, stage2 = arm_configs(study, arms[name], str(packaged_config("nano")), [])
        assert layout(stage1) == layout(stage2) == expected, name
        assert stage2.train.mix_ratio == 0.5
