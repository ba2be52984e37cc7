"""Paired bootstrap comparisons (iomm.evaluation.paired, `iomm eval compare`) where the answer is known."""

import gzip
import json

import numpy as np
import pytest

from iomm.evaluation.paired import (
    NOT_DECIDED,
    PairedItem,
    pair_records,
    pair_runs,
    paired_bootstrap,
    seed_bootstrap,
    t_interval,
    t_quantile_975,
)


def _items(a_rate: float, b_rate: float, prompts: int = 64, samples: int = 4, seed: int = 0) -> list[PairedItem]:
    rng = np.random.default_rng(seed)
    items = []
    for tag in ("single_object", "counting"):
        for p in range(prompts):
            for _ in range(samples):
                items.append(PairedItem(tag, f"{tag}-{p}", float(rng.random() < a_rate), float(rng.random() < b_rate)))
    return items


def test_a_clearly_better_arm_is_decided_and_equal_arms_are_not():
    better = paired_bootstrap(_items(0.3, 0.7), n_boot=500)
    assert better["overall"]["verdict"] == "b_better" and better["overall"]["ci95"][0] > 0.2
    worse = paired_bootstrap(_items(0.7, 0.3), n_boot=500)
    assert worse["overall"]["verdict"] == "a_better"
    equal = paired_bootstrap(_items(0.5, 0.5), n_boot=500)
    low, high = equal["overall"]["ci95"]
    assert equal["overall"]["verdict"] == "inconclusive" and low < 0 < high


def test_scores_and_overall_follow_the_geneval_means():
    items = [PairedItem("x", "p", 1.0, 0.0), PairedItem("x", "q", 1.0, 1.0), PairedItem("y", "r", 0.0, 1.0)]
    result = paired_bootstrap(items, n_boot=200)
    assert result["x"]["a"] == 1.0 and result["x"]["b"] == 0.5 and result["y"]["diff"] == 1.0
    assert result["overall"]["a"] == pytest.approx(0.5) and result["overall"]["b"] == pytest.approx(0.75)
    assert result["overall"]["n"] == 3


def test_the_interval_narrows_with_more_prompts():
    few = paired_bootstrap(_items(0.4, 0.6, prompts=8), n_boot=500)["overall"]["ci95"]
    many = paired_bootstrap(_items(0.4, 0.6, prompts=128), n_boot=500)["overall"]["ci95"]
    assert many[1] - many[0] < 0.5 * (few[1] - few[0])


def test_records_of_different_items_are_refused():
    a = [{"tag": "t", "prompt": "a red circle", "correct": True}]
    with pytest.raises(ValueError, match="1 and 2 items"):
        pair_records(a, a * 2, "correct", "tag", "prompt")
    with pytest.raises(ValueError, match="differs in 'prompt'"):
        pair_records(a, [{"tag": "t", "prompt": "a blue square", "correct": True}], "correct", "tag", "prompt")
    with pytest.raises(ValueError, match="no field 'exact'"):
        pair_records(a, a, "exact", "tag", "prompt")


def test_eval_compare_reads_shapes_results_and_names_a_bad_line(tmp_path, capsys):
    from iomm.cli import main

    rows = [{"tag": "single_object", "prompt": f"p{i // 4}", "correct": i % 2 == 0} for i in range(32)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({**r, "correct": False}) + "\n" for r in rows))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", str(a), str(b), "--n-boot", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["value"] == "correct" and report["cluster"] == "prompt" and "one training run" in report["unit"]
    assert report["results"]["overall"]["diff"] == 0.5 and report["results"]["overall"]["verdict"] == "b_better"
    assert "b_better" in capsys.readouterr().out
    b.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"b.jsonl:1: invalid JSON"):
        main(["eval", "compare", str(a), str(b), "--out", str(out)])


def test_eval_compare_pairs_files_on_the_categories_both_hold_and_says_what_it_left_out(tmp_path, capsys):
    from iomm.cli import main

    seen = [{"tag": "single_object", "prompt": f"p{i // 4}", "correct": i % 2 == 0} for i in range(32)]
    extra = [{"tag": "compositions", "prompt": f"c{i // 4}", "correct": True} for i in range(8)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({**r, "correct": False}) + "\n" for r in seen))
    b.write_text("".join(json.dumps(r) + "\n" for r in seen[:16] + extra + seen[16:]))
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", str(a), str(b), "--n-boot", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["left_out"] == {f"{a} vs {b}": {"compositions": "only in B (8 items)"}}
    assert set(report["results"]) == {"single_object", "overall"} and report["results"]["overall"]["diff"] == 0.5
    assert "left out: compositions (only in B (8 items))" in capsys.readouterr().out
    packed = tmp_path / "b.jsonl.gz"  # the studies commit their per-image records gzipped
    packed.write_bytes(gzip.compress(b.read_bytes()))
    assert main(["eval", "compare", str(a), str(packed), "--n-boot", "200", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["overall"]["diff"] == 0.5
    a.write_text("".join(json.dumps({**r, "tag": "counting"}) + "\n" for r in seen))
    with pytest.raises(SystemExit, match="share no 'tag' value: counting, compositions, single_object"):
        main(["eval", "compare", str(a), str(b), "--out", str(out)])


def _runs(effect: float, run_sd: float, seeds: int, prompts: int = 32, samples: int = 4,
          rng_seed: int = 0) -> dict[str, list[PairedItem]]:
    """Per seed, each arm's run has its own success rate: 0.4 (+ effect for B) + an offset of sd `run_sd` drawn
    once per run and shared by all its images (a training-draw effect)."""
    rng = np.random.default_rng(rng_seed)
    runs = {}
    for seed in range(seeds):
        rate_a = float(np.clip(0.4 + rng.normal(0, run_sd), 0, 1))
        rate_b = float(np.clip(0.4 + effect + rng.normal(0, run_sd), 0, 1))
        runs[f"seed{seed}"] = [PairedItem(tag, f"{tag}-{p}", float(rng.random() < rate_a), float(rng.random() < rate_b))
                               for tag in ("single_object", "counting") for p in range(prompts) for _ in range(samples)]
    return runs


def test_a_constant_large_effect_over_seeds_is_decided():
    result = seed_bootstrap(_runs(effect=0.3, run_sd=0.01, seeds=3), n_boot=500)["overall"]
    assert result["verdict"] == "b_better" and result["n_seeds"] == 3
    assert result["ci95"][0] > 0.1 and result["t_ci95"][0] > 0.1
    assert len(result["per_seed"]) == 3 and all(d > 0.15 for d in result["per_seed"].values())
    flipped = seed_bootstrap({s: [PairedItem(i.category, i.cluster, i.b, i.a) for i in items]
                              for s, items in _runs(effect=0.3, run_sd=0.01, seeds=3).items()}, n_boot=500)
    assert flipped["overall"]["verdict"] == "a_better"


def test_a_training_draw_effect_fools_the_image_level_bootstrap_but_not_the_seed_level_rule():
    runs = _runs(effect=0.0, run_sd=0.15, seeds=3, prompts=64, rng_seed=3)  # same distribution, per-run offsets
    pooled = paired_bootstrap([item for items in runs.values() for item in items], n_boot=500)["overall"]
    assert pooled["verdict"] != "inconclusive"  # the old rule: decided, on images of three runs per arm
    by_seed = seed_bootstrap(runs, n_boot=500)["overall"]
    assert by_seed["verdict"] == "inconclusive"
    assert by_seed["t_ci95"][0] < 0 < by_seed["t_ci95"][1]
    assert by_seed["diff"] == pytest.approx(pooled["diff"])  # the same difference, a wider interval


def test_one_training_run_decides_nothing():
    result = seed_bootstrap(_runs(effect=0.4, run_sd=0.0, seeds=1), n_boot=200)
    assert {s["verdict"] for s in result.values()} == {NOT_DECIDED}
    assert result["overall"]["t_ci95"] is None and result["overall"]["ci95"][0] > 0.2  # large, still one run


def test_seed_scores_average_the_runs_and_runs_must_share_their_categories():
    runs = {"s0": [PairedItem("x", "p", 0.0, 1.0), PairedItem("y", "q", 0.0, 0.0)],
            "s1": [PairedItem("y", "q", 1.0, 1.0), PairedItem("x", "p", 0.0, 0.0)]}
    result = seed_bootstrap(runs, n_boot=200)
    assert result["x"]["per_seed"] == {"s0": 1.0, "s1": 0.0} and result["x"]["diff"] == 0.5
    assert result["overall"]["a"] == pytest.approx(0.25) and result["overall"]["b"] == pytest.approx(0.5)
    assert result["overall"]["n"] == 4
    with pytest.raises(ValueError, match="categories"):
        seed_bootstrap({**runs, "s2": [PairedItem("z", "r", 0.0, 1.0)]}, n_boot=200)


def test_a_category_outside_overall_keeps_its_own_score_and_leaves_overall_alone():
    items = [PairedItem("x", "p", 1.0, 0.0), PairedItem("y", "q", 0.0, 1.0), PairedItem("held", "r", 0.0, 1.0)]
    one = paired_bootstrap(items, n_boot=200, outside_overall=["held"])
    assert one["held"]["diff"] == 1.0
    assert one["overall"]["a"] == pytest.approx(0.5) and one["overall"]["b"] == pytest.approx(0.5)
    assert one["overall"]["n"] == 2
    runs = {"s0": items, "s1": list(reversed(items))}
    seeds = seed_bootstrap(runs, n_boot=200, outside_overall=["held"])
    assert seeds["overall"]["diff"] == pytest.approx(0.0) and seeds["overall"]["n"] == 4
    assert seeds["held"]["per_seed"] == {"s0": 1.0, "s1": 1.0}
    with pytest.raises(ValueError, match="no category left"):
        paired_bootstrap(items, n_boot=200, outside_overall=["x", "y", "held"])


def test_t_quantiles_and_interval():
    assert t_quantile_975(2) == 4.303 and t_quantile_975(10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    assert t_interval([1.0]) is None
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.303 / np.sqrt(3)) and high == pytest.approx(2 + 4.303 / np.sqrt(3))


def test_records_carrying_seeds_are_paired_within_their_seed():
    a = [{"tag": "t", "prompt": "p", "correct": False, "seed": s} for s in (0, 0, 1)]
    runs = pair_runs(a, [{**r, "correct": True} for r in a], "correct", "tag", "prompt", "seed")
    assert list(runs) == ["0", "1"] and len(runs["0"]) == 2 and runs["1"][0].b == 1.0
    with pytest.raises(ValueError, match="differs in 'seed'"):
        pair_runs(a, [{**r, "seed": 1} for r in a], "correct", "tag", "prompt", "seed")


def test_eval_compare_decides_several_runs_per_arm_at_the_level_of_seeds(tmp_path, capsys):
    from iomm.cli import main

    files = []
    for seed in range(3):  # B is better by 0.5 in every run
        rows = [{"tag": "single_object", "prompt": f"p{i // 4}", "correct": i % 2 == 0} for i in range(32)]
        a, b = tmp_path / f"a{seed}.jsonl", tmp_path / f"b{seed}.jsonl"
        a.write_text("".join(json.dumps({**r, "correct": False}) + "\n" for r in rows))
        b.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files += [str(a), str(b)]
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", *files, "--n-boot", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    overall = report["results"]["overall"]
    assert overall["n_seeds"] == 3 and overall["verdict"] == "b_better" and overall["t_ci95"] == [0.5, 0.5]
    assert "training runs" in report["unit"] and len(report["a"]) == 3
    assert "t over seeds" in capsys.readouterr().out
    merged = tmp_path / "merged_a.jsonl"
    merged.write_text("".join(json.dumps({"tag": "t", "prompt": "p", "correct": False, "seed": 0}) + "\n"
                              for _ in range(4)))
    assert main(["eval", "compare", str(merged), str(merged), "--seed-field", "seed", "--n-boot", "200",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["overall"]["verdict"] == NOT_DECIDED
    with pytest.raises(SystemExit, match="in pairs A B"):
        main(["eval", "compare", *files[:3], "--out", str(out)])
