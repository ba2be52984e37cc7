"""`iomm describe --estimate`: the FLOPs of a training sample, the GPU-hours of a schedule, and the MFU a
throughput implies (iomm.estimate), on the meta device."""

import dataclasses
import json
from importlib import resources
from pathlib import Path

import pytest

from iomm.cli import main
from iomm.commands.describe import GPU_MEMORY_GIB
from iomm.config_checks import load_config
from iomm.estimate import (
    PEAK_BF16_TFLOPS,
    estimate,
    implied_mfu,
    measured_mfu,
    paper_implied_mfu,
    stage_configs,
    train_flops_per_sample,
)

CONFIGS = Path(str(resources.files("iomm") / "configs"))
BENCH = Path(__file__).resolve().parents[1] / "bench/results"
# Forward FLOPs of one sample, round numbers: the passes each part runs read straight off the training FLOPs.
FORWARD = {"flops": {"mllm_vision": 1e9, "mllm_language": 10e9, "adapter": 1e8, "connector": 2e8, "vae_encode": 3e9,
                     "generator": 20e9},
           "tokens": {"prompt": 12, "image": 52, "queries": 64, "latent": 256}}
PLAIN = ["train.cond_dropout=0", "train.steps=1000", "train.batch_size=32", "finetune.steps=200",
         "finetune.mix_ratio=0.5"]


def plain(*overrides: str):
    return load_config(None, [*PLAIN, *overrides], check_paths=False)


def test_training_flops_are_the_passes_each_part_runs():
    # prefix cache, no checkpointing: the LLM forward, and backward to its inputs over the 64 of 128 query tokens
    flops = train_flops_per_sample(plain(), FORWARD)
    assert flops == pytest.approx({"mllm_vision": 1e9, "mllm_language": 15e9, "adapter": 3e8, "connector": 6e8,
                                   "vae_encode": 3e9, "generator": 60e9, "total": 79.9e9})
    # gradient checkpointing: the whole sequence backward, and a recompute; activation checkpointing: the generator's
    checkpointed = train_flops_per_sample(plain("mllm.gradient_checkpointing=true",
                                                "train.activation_checkpointing=true"), FORWARD)
    assert checkpointed["mllm_language"] == 30e9 and checkpointed["generator"] == 80e9
    # condition dropout: a tenth of the samples skip the MLLM, adapter and connector, not the VAE or the generator
    dropped = train_flops_per_sample(plain("train.cond_dropout=0.1"), FORWARD)
    assert dropped["mllm_vision"] == pytest.approx(0.9e9) and dropped["adapter"] == pytest.approx(2.7e8)
    assert dropped["vae_encode"] == 3e9 and dropped["generator"] == 60e9
    # LoRA: the generator's backward to its inputs only; a raw condition: no gradient through the LLM
    lora = train_flops_per_sample(plain("train.lora.enabled=true", "adapter.kind=raw"), FORWARD)
    assert lora["generator"] == 40e9 and lora["mllm_language"] == 10e9
    # a latent cache holds the VAE's moments and the vision tower's tokens
    cached = dataclasses.replace(plain(), data=dataclasses.replace(plain().data, latents="cache"))
    assert train_flops_per_sample(cached, FORWARD)["vae_encode"] == 0 == train_flops_per_sample(cached, FORWARD)[
        "mllm_vision"]


def test_estimate_arithmetic_on_a_known_schedule():
    cfg = plain()
    stages = stage_configs(cfg, "both")
    assert stages["finetune"].train.steps == 200 and stages["finetune"].train.mix_ratio == 0.5
    result = estimate(stages, FORWARD, gpus=4, gpu="a100", mfu=0.5, mfu_from="test")
    sustained = 312e12 * 0.5
    pretrain, finetune = result["stages"]["pretrain"], result["stages"]["finetune"]
    assert pretrain["samples"] == 32_000 and finetune["samples"] == 6_400
    assert pretrain["gpu_hours"] == pytest.approx(32_000 * 79.9e9 / sustained / 3600)
    assert pretrain["wall_hours"] == pytest.approx(pretrain["gpu_hours"] / 4)
    assert pretrain["images_per_s_per_gpu"] == pytest.approx(sustained / 79.9e9)
    # stage 2: half the samples are captions, which skip the vision tower
    assert finetune["flops_per_sample"]["total"] == pytest.approx(79.9e9 - 0.5e9)
    total = result["total"]
    assert total["flops"] == pytest.approx(32_000 * 79.9e9 + 6_400 * 79.4e9)
    assert total["gpu_hours"] == pytest.approx(total["flops"] / (sustained * 3600))
    assert total["wall_hours"] == pytest.approx(total["gpu_hours"] / 4)
    assert list(estimate(stage_configs(cfg, "finetune"), FORWARD, gpus=1, gpu="h800", mfu=1.0,
                         mfu_from="test")["stages"]) == ["finetune"]


def test_the_count_is_within_ten_percent_of_a_measured_training_step():
    """bench-b-mini's forward counts (bench/README.md) through the model of passes, against the FLOPs
    FlopCounterMode counted over its real training step (`iomm bench train-step`, batch 8)."""
    forward = json.loads((BENCH / "proportions_bench-b-mini.json").read_text())["forward"]
    run = json.loads((BENCH / "train_step_b_mini.json").read_text())["run"]
    counted = train_flops_per_sample(load_config(CONFIGS / "bench-b-mini.yaml", check_paths=False), forward)
    assert counted["total"] == pytest.approx(run["flops_per_step"]["step"] / run["batch_size"], rel=0.1)


def test_implied_mfu_and_the_papers_figure():
    assert implied_mfu(31.0, 10e12, 989.4e12) == pytest.approx(31 * 10 / 989.4)
    paper = paper_implied_mfu(10e12)
    rate = 11e6 * 10 / (1000 * 3600)  # about 31 images/s a GPU
    assert paper["figures"][0]["images_per_s_per_gpu"] == pytest.approx(rate)
    assert paper["figures"][0]["implied_mfu"] == pytest.approx(rate * 10e12 / 989.4e12)
    assert [row["gpu_hours"] for row in paper["figures"]] == [1000, 1050]


def test_every_gpu_kind_has_a_peak():
    assert set(PEAK_BF16_TFLOPS) == set(GPU_MEMORY_GIB)
    assert PEAK_BF16_TFLOPS["h800"] == PEAK_BF16_TFLOPS["h200"] == PEAK_BF16_TFLOPS["h100"] == 989.4
    assert PEAK_BF16_TFLOPS["a100"] == 312


@pytest.mark.parametrize("name", ["iomm-b", "iomm-l", "iomm-xl", "qwen-image-mix-lora"])
def test_describe_estimate_prints_gpu_hours_next_to_the_memory_plan(name, capsys):
    config = str(CONFIGS / f"{name}.yaml")
    args = ["describe", "--config", config, "--gpus", "8", "--gpu", "h800", "--estimate", "--mfu", "0.35"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "left of 80 GiB" in printed and "GPU-hours" in printed and "images/s/GPU" in printed
    assert printed.index("left of 80 GiB") < printed.index("training estimate on 8 x h800")
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"].endswith("--gpus 8 --parallel ddp --gpu h800 --estimate --mfu 0.35")
    cost = report["estimate"]
    assert cost["total"]["gpu_hours"] == pytest.approx(cost["total"]["flops"] / (989.4e12 * 0.35 * 3600))
    assert f"{cost['total']['gpu_hours']:10,.0f}" in printed
    assert all(stage["flops_per_sample"]["mllm_vision"] > 0 for stage in cost["stages"].values())


def test_qwen25_vl_vision_tower_is_counted_on_the_meta_device():
    from iomm.footprint import forward_flops

    forward = forward_flops(load_config(CONFIGS / "qwen-image-mix-lora.yaml", check_paths=False))
    # 504 px: 36 x 36 patches of 14 px through the 0.67B-parameter tower, about 2 FLOPs a parameter a patch
    assert forward["flops"]["mllm_vision"] == pytest.approx(2 * 0.67e9 * 36 * 36, rel=0.1)
    assert forward["tokens"]["image"] == 324 and forward["flops"]["generator"] > 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--gpus", "8", "--estimate", "--mfu", "1.5"], r"expected --mfu in \(0, 1\], got 1.5"),
    (["--gpus", "8", "--estimate", "--mfu", "0"], r"expected --mfu in \(0, 1\], got 0"),
    (["--gpus", "8", "--estimate"], "expected --mfu M .* or --mfu-file PATH .*, got neither"),
    (["--estimate", "--mfu", "0.3"], "expected --gpus N .*, got none"),
    (["--gpus", "8", "--mfu", "0.3"], "--mfu, --mfu-file and --stage size the estimate; add --estimate"),
    (["--gpus", "8", "--gpu-memory", "90", "--estimate", "--mfu", "0.3"],
     "expected --gpu KIND .*, got --gpu-memory 90"),
])
def test_bad_estimate_flags_name_the_flag_expected_and_got(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["describe", *flags])


def test_an_unknown_gpu_kind_names_the_flag_the_choices_and_the_value(capsys):
    with pytest.raises(SystemExit):
        main(["describe", "--gpus", "8", "--gpu", "h900", "--estimate", "--mfu", "0.3"])
    error = capsys.readouterr().err
    assert "argument --gpu: invalid choice: 'h900'" in error and "'h800'" in error
    with pytest.raises(ValueError, match="--gpu: expected one of .*h800.*, got 'h900'"):
        estimate({}, FORWARD, gpus=1, gpu="h900", mfu=0.3, mfu_from="test")


def test_mfu_file_reads_a_bench_train_step_json(tmp_path):
    run = {"mfu": {"step": 0.6, "generator": 0.7}, "flops_per_step": {"step": 400e12},
           "seconds_per_step": {"step": 1.0}}
    on_gpu = tmp_path / "gpu.json"
    on_gpu.write_text(json.dumps({"machine": "AMD EPYC, 16 cores, torch 2.13.0, NVIDIA H800", "run": run}))
    mfu, origin = measured_mfu(on_gpu)  # achieved FLOP/s over the H800's data-sheet peak, not the GEMM measured
    assert mfu == pytest.approx(400 / 989.4) and "H800" in origin
    on_cpu = tmp_path / "cpu.json"
    on_cpu.write_text(json.dumps({"machine": "AMD EPYC, 2 cores", "run": run}))
    assert measured_mfu(on_cpu)[0] == 0.6  # no GPU: its MFU against the GEMM peak of the same run
    (bad := tmp_path / "bad.json").write_text(json.dumps({"images_per_s": 3}))
    with pytest.raises(ValueError, match="--mfu-file: expected `iomm bench train-step`'s JSON"):
        measured_mfu(bad)
    with pytest.raises(SystemExit, match="--mfu-file: expected a JSON file"):
        main(["describe", "--gpus", "8", "--estimate", "--mfu-file", str(tmp_path / "missing.json")])
