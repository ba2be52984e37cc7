"""The oracle-arms and denoise probes (`python -m iomm.lab.bench.probes.oracle_arms`, `...denoise`) on a tiny run:
they train, load back and report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from conftest import TINY_OVERRIDES

from iomm.config_checks import packaged_config
from iomm.lab.bench.probes import denoise, oracle_arms


def test_oracle_arm_trains_reports_and_bypasses_the_llm(tiny_mllm_dir: Path, tmp_path: Path) -> None:
    sets = [f"--set={o}" for o in [f"mllm.path={tiny_mllm_dir}", *TINY_OVERRIDES, "train.steps=2",
                                    "adapter.token_loss=0"]]
    result = tmp_path / "vision.json"
    assert oracle_arms.main(["--arm", "vision", "--config", str(packaged_config("nano")), *sets,
                             "--out", str(tmp_path / "run"), "--n", "2", "--result", str(result)]) == 0
    report = json.loads(result.read_text())
    assert report["command"].startswith("python -m iomm.lab.bench.probes.oracle_arms --arm vision")
    assert set(report["ratios"]) == {"0.0", "0.45"} and report["ratios"]["0.0"]["n"] == 2
    assert "connector.token_positions=true" in report["overrides"]

    from iomm.inference.pipeline import load_model

    model = load_model(tmp_path / "run", model_fn=oracle_arms.oracle_model_fn("vision"))
    images = torch.rand(2, 3, 32, 32)
    a = model.condition_masked_images(images, torch.Generator().manual_seed(0)).tokens
    model.cfg = dataclasses.replace(model.cfg, masking=dataclasses.replace(model.cfg.masking, prompt="other words"))
    b = model.condition_masked_images(images, torch.Generator().manual_seed(0)).tokens
    assert torch.equal(a, b)  # the vision arm never reads the prompt: no LLM on its path

    out = tmp_path / "denoise.json"
    assert denoise.main(["--model", str(tmp_path / "run"), "--oracle-arm", "vision", "--n", "4",
                               "--out", str(out)]) == 0
    times = json.loads(out.read_text())["times"]
    assert list(times) == [str(t) for t in denoise.TIMES]
    assert all(v > 0 for row in times.values() for v in row.values())
