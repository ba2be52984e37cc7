"""Paired bootstrap comparisons (iomm.evaluation.paired, `iomm eval compare`) where the answer is known."""

import json

import numpy as np
import pytest

from iomm.evaluation.paired import PairedItem, pair_records, paired_bootstrap


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
    assert report["value"] == "correct" and report["cluster"] == "prompt"
    assert report["results"]["overall"]["diff"] == 0.5 and report["results"]["overall"]["verdict"] == "b_better"
    assert "b_better" in capsys.readouterr().out
    b.write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"b.jsonl:1: invalid JSON"):
        main(["eval", "compare", str(a), str(b), "--out", str(out)])
