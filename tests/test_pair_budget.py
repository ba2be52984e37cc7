"""`iomm study pair-budget`: arms of a seed share its pair subset, the image-only stage 1 is trained once per seed,
and the learning curve, its seed-level comparisons and its finding are written from the arms' results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iomm.config_checks import finetune_config, load_config, packaged_config
from iomm.lab import studies
from iomm.lab.pair_budget import FRESH, IMAGE_PAIRS, IOMM, PAIRS_ONLY, budget_arms, pair_efficiency, pairs_to_match
from iomm.lab.studies import arm_commands, pretrain_command, pretrain_dir
from iomm.nano.world import COMPOSITIONS, GENEVAL_TAGS
from iomm.registry import split_pairs_spec

NANO = str(packaged_config("nano"))


def _sets(argv: list[str]) -> list[str]:
    return [a.removeprefix("--set=") for a in argv if a.startswith("--set=")]


def _stage2_pairs(arm: studies.Arm, seed: int, tmp_path: Path) -> list[str]:
    """The captions of the pairs the arm's stage 2 draws from, built as its `iomm finetune` command would."""
    finetune = arm_commands(arm, NANO, [], seed, tmp_path / arm.name, pretrain_dir(tmp_path, arm, seed), 1)[0]
    cfg = finetune_config(load_config(NANO, _sets(finetune), check_paths=False))
    source, n = split_pairs_spec(cfg.data.pairs)
    return [caption for _, caption in source.pairs(cfg, int(n)).pairs]


def test_the_arms_of_a_seed_share_its_pair_subset_and_seeds_draw_their_own(tmp_path: Path) -> None:
    arms = budget_arms((8,))["N=8"]
    seed0 = [_stage2_pairs(arm, 0, tmp_path) for arm in arms.values()]
    assert len(seed0[0]) == 8 and seed0[0] == seed0[1] == seed0[2]
    assert _stage2_pairs(arms[IOMM], 1, tmp_path) != seed0[0]
    stage1 = load_config(NANO, _sets(pretrain_command(arms[PAIRS_ONLY], NANO, [], 0, tmp_path)), check_paths=False)
    source, n = split_pairs_spec(stage1.data.pairs)  # pairs-only's stage 1 draws from the same N pairs
    assert stage1.train.mix_ratio == 0.0 and [c for _, c in source.pairs(stage1, int(n)).pairs] == seed0[0]


def test_the_image_only_stage1_is_shared_by_the_image_arms_of_a_seed_at_every_budget(tmp_path: Path) -> None:
    arms = budget_arms((8, 32))
    assert list(arms) == ["N=8", "N=32", FRESH]
    image_arms = [methods[m] for methods in arms.values() for m in (IOMM, IMAGE_PAIRS)]
    assert len({pretrain_dir(tmp_path, arm, 0) for arm in image_arms}) == 1
    assert pretrain_dir(tmp_path, image_arms[0], 0) != pretrain_dir(tmp_path, image_arms[0], 1)
    assert len({pretrain_dir(tmp_path, methods[PAIRS_ONLY], 0) for methods in arms.values()}) == 3
    for methods in arms.values():  # equal compute, and each arm's stage-2 mix
        configs = {m: studies.arm_configs(studies.Study("x", [], "", ""), arm, NANO, []) for m, arm in methods.items()}
        assert len({(s1.train.steps, s2.train.steps) for s1, s2 in configs.values()}) == 1
        assert [configs[m][1].train.mix_ratio for m in (PAIRS_ONLY, IOMM, IMAGE_PAIRS)] == [0.0, 0.5, 0.0]
        assert configs[IOMM][0].train.mix_ratio == 1.0 and configs[PAIRS_ONLY][0].train.mix_ratio == 0.0
    assert studies.arm_configs(studies.Study("x", [], "", ""), arms[FRESH][IOMM], NANO, [])[1].data.pairs == \
        "world-fresh:1"


def test_fresh_pairs_are_new_at_every_draw() -> None:
    import numpy as np

    cfg = load_config(NANO, ["data.pairs=world-fresh:1", "train.mix_ratio=0.0"], check_paths=False)
    source, n = split_pairs_spec(cfg.data.pairs)
    pairs = source.pairs(cfg, int(n))
    rng = np.random.default_rng(0)
    captions = [pairs.take(i, rng, [])[1] for i in range(20)]
    assert len(set(captions)) > 10


def test_pairs_to_match_interpolates_on_log_n() -> None:
    curve = [(128, 0.2), (512, 0.3), (2048, 0.4)]
    matched, phrase = pairs_to_match(curve, 0.5, 0.35)
    assert matched == pytest.approx(1024) and phrase == "about 1024 pairs"
    assert pairs_to_match(curve, 0.5, 0.1) == (None, "at most 128 pairs")
    assert pairs_to_match(curve, 0.5, 0.45) == (None, "more than 2048 pairs")
    assert pairs_to_match(curve, 0.42, 0.45) == (None, "more pairs than exist (unlimited fresh pairs give it 0.420)")
    assert pairs_to_match([(4, 0.1), (16, 0.5), (64, 0.3)], 0.6, 0.3)[0] == pytest.approx(8)  # the first crossing


def test_pair_efficiency_is_a_geometric_mean_over_seeds_with_a_t_interval() -> None:
    def arm(n128: float, n512: float, fresh: float) -> dict:
        return {label: {COMPOSITIONS: {"per_seed": [value, value]}} for label, value in
                (("N=128", n128), ("N=512", n512), (FRESH, fresh))}

    scores = {PAIRS_ONLY: arm(0.2, 0.4, 0.5), IOMM: arm(0.3, 0.45, 0.5)}
    scores[IOMM]["N=128"][COMPOSITIONS]["per_seed"] = [0.3, 0.4]  # seed 0 matched at 256 pairs, seed 1 at 512
    result = pair_efficiency(scores, (128, 512), 128)
    assert result["per_seed"] == pytest.approx([2, 4]) and result["ratio"] == pytest.approx(8 ** 0.5)
    low, high = result["ci95"]
    assert low < 2 < 4 < high and low * high == pytest.approx(8)  # symmetric on the log scale
    assert pair_efficiency(scores, (128, 512), 512)["bounds"] == ["more than 512 pairs"] * 2


# success rate of each method at each budget; seed s adds 0.1 s to every arm of the seed (its training draw)
RATES = {PAIRS_ONLY: {"N=4": 0.2, "N=16": 0.4, FRESH: 0.5}, IOMM: {"N=4": 0.3, "N=16": 0.5, FRESH: 0.5},
         IMAGE_PAIRS: {"N=4": 0.2, "N=16": 0.4, FRESH: 0.5}}


def _fake_run_logged(calls: list[list[str]]):
    """Stands in for the iomm subprocesses: an evaluation writes 6 tags x 5 prompts x 2 images, and 30 held-out
    compositions x 2 images whose success rate follows RATES; IOMM gets the tags right 0.3 more often than
    pairs-only."""

    def run(argv: list[str], log: Path) -> None:
        calls.append(argv)
        if argv[3:5] != ["eval", "shapes"]:
            return
        model = Path(argv[argv.index("--model") + 1])
        method, budget = model.parent.parent.name.split("@")
        seed = int(model.parent.name.removeprefix("seed"))
        held = round(10 * (RATES[method].get(budget, RATES[method][FRESH]) + 0.1 * seed))
        hits = 1 + 3 * (method == IOMM) + seed
        rows = [{"tag": tag, "prompt": f"{tag}-{p}", "correct": 2 * p + s < hits}
                for tag in GENEVAL_TAGS for p in range(5) for s in range(2)]
        rows += [{"tag": COMPOSITIONS, "prompt": f"held-{p}", "correct": (2 * p + s) % 10 < held}
                 for p in range(30) for s in range(2)]
        Path(argv[argv.index("--results") + 1]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {tag: hits / 10 for tag in GENEVAL_TAGS}
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps({**metrics, "overall": hits / 10,
                                                                   COMPOSITIONS: held / 10}))

    return run


def test_pair_budget_study_writes_the_learning_curve_and_its_finding(tmp_path: Path, monkeypatch) -> None:
    from iomm.cli import main

    calls: list[list[str]] = []
    monkeypatch.setattr(studies, "run_logged", _fake_run_logged(calls))
    out = tmp_path / "study"
    assert main(["study", "pair-budget", "--pair-budgets", "4", "16", "--seeds", "3", "--stage1-steps", "7",
                 "--stage2-steps", "5", "--per-category", "5", "--samples", "2", "--out", str(out)]) == 0
    pretrains = [argv for argv in calls if argv[3] == "pretrain"]
    image_stage1 = [argv for argv in pretrains if "--set=train.mix_ratio=1.0" in argv]
    assert sorted(next(s for s in a if s.startswith("--set=train.seed=")) for a in image_stage1) == \
        [f"--set=train.seed={s}" for s in range(3)]  # once per seed, for 2 image arms x 3 budgets
    assert len(pretrains) == 3 * (1 + 3)  # and pairs-only's own stage 1 at each budget
    assert all("--set=train.steps=7" in a and "--set=finetune.steps=5" in a for a in calls if a[3] != "eval")

    record = json.loads((out / "results.json").read_text())
    assert record["command"].startswith("iomm study pair-budget") and "--stage1-steps=7" in record["command"]
    assert record["machine"] and record["steps"]["stage1"] == 7 and record["steps"]["stage2"] == 5
    assert record["precision"] == "fp32 (set in the config)"  # configs/nano.yaml's train.mixed_precision
    assert record["budgets"] == [4, 16, FRESH] and len(record["results"]) == 3 * 3 * 3
    assert set(record["scores"]) == {PAIRS_ONLY, IOMM, IMAGE_PAIRS}
    held = record["scores"][IOMM]["N=4"][COMPOSITIONS]
    assert held["mean"] == pytest.approx(0.4) and held["per_seed"] == pytest.approx([0.3, 0.4, 0.5])
    assert set(record["scores"][IOMM]["N=4"]) == {*GENEVAL_TAGS, "overall", COMPOSITIONS}
    assert record["scores"][IOMM]["N=4"]["overall"]["mean"] == pytest.approx(0.5)
    iomm_vs = record["paired"]["N=4"][IOMM][COMPOSITIONS]  # 0.1 better in every seed: decided over seeds
    assert iomm_vs["diff"] == pytest.approx(0.1) and iomm_vs["verdict"] == "b_better" and iomm_vs["n_seeds"] == 3
    assert record["paired"][FRESH][IMAGE_PAIRS][COMPOSITIONS]["verdict"] == "inconclusive"
    overall = record["paired"]["N=4"][IOMM]["overall"]  # beside the deciding score
    assert overall["diff"] == pytest.approx(0.3) and overall["verdict"] == "b_better"
    first = record["findings"][0]
    assert first["label"] == "reproduced" and first["pairs_to_match"] == pytest.approx(8)
    assert first["overall"] == {"iomm": pytest.approx(0.5), "pairs_only": pytest.approx(0.2), "label": "reproduced"}
    assert first["sentence"] == ("At 4 pairs, IOMM scores 0.400 on held-out compositions against pairs-only's 0.300; "
                                 "pairs-only needs about 8 pairs to match IOMM at 4.")
    overlap = record["caption_overlap"]  # the share of GenEval-tag prompts a seed's captions state word for word
    assert set(overlap) == {"N=4", "N=16"} and all(len(v) == 3 and 0 <= min(v) <= max(v) <= 1 for v in overlap.values())
    assert max(overlap["N=4"]) <= min(overlap["N=16"]) + 0.2
    assert record["findings"][1]["sentence"].endswith("needs more than 16 pairs to match IOMM at 16.")
    # every seed's pairs-only reaches its IOMM-at-4 score halfway (in log N) between 4 and 16 pairs: 8 pairs, 2x
    assert first["pair_efficiency"] == {"ratio": pytest.approx(2), "ci95": pytest.approx([2, 2]),
                                        "per_seed": pytest.approx([2, 2, 2]), "bounds": None}
    assert record["findings"][1]["pair_efficiency"]["ratio"] is None
    assert record["findings"][1]["pair_efficiency"]["bounds"] == ["more than 16 pairs"] * 3
    assert (out / "learning_curve.png").stat().st_size > 1000
    report = (out / "results.md").read_text()
    assert "Machine: " in report and ", fp32 (set in the config)." in report
    assert first["sentence"] in report and "| iomm | 0.400 ± 0.100 | 0.600 ± 0.100 | 0.600 ± 0.100 |" in report
    assert "| iomm | 0.500 ± 0.100 | 0.500 ± 0.100 | 0.500 ± 0.100 |" in report  # the overall table
    row = next(line for line in report.splitlines() if line.startswith("| N=4 | iomm | compositions |"))
    assert row.startswith("| N=4 | iomm | compositions | +0.100 | +0.100 +0.100 +0.100 |")  # each seed's difference
    assert row.endswith("| iomm better |") and "b_better" not in report  # verdicts in words


def test_pair_budget_refuses_bad_budgets(tmp_path: Path) -> None:
    from iomm.cli import main

    with pytest.raises(SystemExit, match="increasing"):
        main(["study", "pair-budget", "--pair-budgets", "16", "4", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--stage1-steps"):
        main(["study", "pair-budget", "--stage1-steps", "0", "--out", str(tmp_path)])


def test_a_study_resumes_from_the_seeds_restored_from_its_committed_records(tmp_path: Path, monkeypatch) -> None:
    """scripts/restore_study_records.py rebuilds the committed seeds of the full-budget run; the study then trains
    only the next seed (no pre-training for the restored ones), and the restored seeds' scores and paired
    differences are the committed ones."""
    import runpy

    from iomm.cli import main

    committed = Path(__file__).parents[1] / "docs" / "results" / "pair-budget-replay"
    before = json.loads((committed / "results.json").read_text())
    seeds = before["seeds"]
    restore = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "restore_study_records.py"))["restore"]
    out = tmp_path / "study"
    assert len(restore(committed, out)) == 6 * seeds
    with pytest.raises(FileExistsError, match="new run directory"):
        restore(committed, out)
    calls: list[list[str]] = []
    monkeypatch.setattr(studies, "run_logged", _fake_run_logged(calls))
    assert main(["study", "pair-budget", "--pair-budgets", "128", "--seeds", str(seeds + 1), "--out", str(out)]) == 0
    assert calls and all(f"--set=train.seed={seeds}" in argv for argv in calls if argv[3] != "eval")
    assert len([argv for argv in calls if argv[3] == "pretrain"]) == 3
    record = json.loads((out / "results.json").read_text())
    for seed in range(seeds):
        assert record["scores"][IOMM]["N=128"][COMPOSITIONS]["per_seed"][seed] == \
            pytest.approx(before["scores"][IOMM]["N=128"][COMPOSITIONS]["per_seed"][seed])
        assert record["paired"]["N=128"][IOMM]["overall"]["per_seed"][f"seed{seed}"] == \
            pytest.approx(before["paired"]["N=128"][IOMM]["overall"]["per_seed"][f"seed{seed}"])
    assert record["caption_overlap"]["N=128"][0] == pytest.approx(140 / 384)  # seed 0's 128 captions


def test_a_group_of_arms_at_a_time_writes_partial_comparisons_then_the_whole_study(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from iomm.cli import main

    calls: list[list[str]] = []
    monkeypatch.setattr(studies, "run_logged", _fake_run_logged(calls))
    out = tmp_path / "study"
    base = ["study", "pair-budget", "--pair-budgets", "4", "--seeds", "3", "--stage1-steps", "7", "--stage2-steps",
            "5", "--per-category", "5", "--samples", "2", "--out", str(out)]
    with pytest.raises(SystemExit, match="iomm@N=5: not an arm of this study"):
        main([*base, "--arms", "iomm@N=5"])
    assert main([*base, "--arms", "pairs-only@N=4", "iomm@N=4"]) == 0
    assert not (out / "results.json").exists()
    partial = json.loads((out / "partial.json").read_text())
    assert partial["arms"] == ["iomm@N=4", "pairs-only@N=4"] and len(partial["results"]) == 2 * 3
    assert set(partial["paired"]) == {"N=4"} and set(partial["paired"]["N=4"]) == {IOMM}
    assert partial["paired"]["N=4"][IOMM][COMPOSITIONS]["verdict"] == "b_better" and "--arms" in partial["command"]
    assert len([a for a in calls if a[3] == "eval"]) == 2 * 3
    report = (out / "partial.md").read_text()
    assert "No finding yet" in report and "| N=4 | iomm | compositions | +0.100 | +0.100 +0.100 +0.100 |" in report
    calls.clear()
    assert main(base) == 0  # the rest: image+pairs at 4 and the three fresh arms, and pairs-only's fresh stage 1
    assert len([a for a in calls if a[3] == "eval"]) == 4 * 3 and len([a for a in calls if a[3] == "pretrain"]) == 3
    record = json.loads((out / "results.json").read_text())
    assert record["paired"]["N=4"][IOMM][COMPOSITIONS] == partial["paired"]["N=4"][IOMM][COMPOSITIONS]


def test_the_results_need_pairs_only_and_iomm_at_every_budget_and_image_pairs_only_where_it_ran(
        tmp_path: Path, monkeypatch) -> None:
    from iomm.cli import main

    calls: list[list[str]] = []
    monkeypatch.setattr(studies, "run_logged", _fake_run_logged(calls))
    out = tmp_path / "study"
    base = ["study", "pair-budget", "--pair-budgets", "4", "--seeds", "3", "--stage1-steps", "7", "--stage2-steps",
            "5", "--per-category", "5", "--samples", "2", "--out", str(out), "--arms"]
    assert main([*base, "pairs-only@N=4", "iomm@N=4", "image+pairs@N=4", "pairs-only@fresh"]) == 0
    assert not (out / "results.json").exists() and (out / "partial.json").exists()  # IOMM at fresh is missing
    assert main([*base, "pairs-only@N=4", "iomm@N=4", "image+pairs@N=4", "pairs-only@fresh", "iomm@fresh"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert len({row["arm"] for row in record["results"]}) == 5
    assert set(record["scores"][IMAGE_PAIRS]) == {"N=4"} and set(record["scores"][IOMM]) == {"N=4", FRESH}
    assert set(record["paired"][FRESH]) == {IOMM} and set(record["paired"]["N=4"]) == {IOMM, IMAGE_PAIRS}
    assert record["findings"][0]["sentence"].startswith("At 4 pairs, IOMM scores 0.400")
    assert "| image+pairs | 0.300 ± 0.100 | — |" in (out / "results.md").read_text()
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert not any("image+pairs@fresh" in " ".join(argv) for argv in calls)


def test_the_committed_study_restores_and_only_a_new_budget_trains_next(tmp_path: Path, monkeypatch) -> None:
    """docs/results/pair-budget/ holds N = 128, 512 and fresh pairs, every arm, three seeds; restored, the study with
    N = 2,048 added trains only that budget's arms and their stage 1s (the image-only one too: a study's runs do not
    outlive its machine), and keeps the committed comparisons."""
    import runpy

    from iomm.cli import main

    committed = Path(__file__).parents[1] / "docs" / "results" / "pair-budget"
    before = json.loads((committed / "results.json").read_text())
    restore = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "restore_study_records.py"))["restore"]
    out = tmp_path / "study"
    assert len(restore(committed, out)) == len(before["results"]) == 9 * before["seeds"]
    calls: list[list[str]] = []
    monkeypatch.setattr(studies, "run_logged", _fake_run_logged(calls))
    assert main(["study", "pair-budget", "--pair-budgets", "128", "512", "2048", "--seeds", "3",
                 "--out", str(out)]) == 0
    evals = [argv[argv.index("--model") + 1] for argv in calls if argv[3] == "eval"]
    assert len(evals) == 3 * 3 and all("@N=2048" in model for model in evals)
    assert len([argv for argv in calls if argv[3] == "pretrain"]) == 2 * 3  # image-only and pairs-only on 2,048
    record = json.loads((out / "results.json").read_text())
    for label in ("N=128", "N=512", "fresh"):
        assert record["paired"][label][IOMM][COMPOSITIONS]["per_seed"] == \
            pytest.approx(before["paired"][label][IOMM][COMPOSITIONS]["per_seed"])
