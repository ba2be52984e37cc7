"""The user-facing commands end to end on tiny models: `iomm recipe`, `iomm bench train-step`, `iomm describe`."""

import json
from importlib import resources
from pathlib import Path

import pytest
from transformers import Qwen2_5_VLConfig

from iomm.cli import main
from iomm.config_checks import load_config
from iomm.footprint import describe
from tests.conftest import TINY_OVERRIDES

CONFIGS = Path(str(resources.files("iomm") / "configs"))
PHASES = ("conditioning_forward", "codec_encode", "generator_forward", "generator_backward",
          "conditioning_backward", "optimizer_and_ema")


def sets(*overrides: str) -> list[str]:
    return [f"--set={o}" for o in overrides]


def test_recipe_runs_every_stage_and_writes_its_score(tiny_mllm_dir, tmp_path, capsys):
    out = tmp_path / "recipe"
    code = main(["recipe", "nano", "--out", str(out), "--per-category", "1", "--fidelity-n", "8", "--no-progress",
                 *sets(f"mllm.path={tiny_mllm_dir}", *TINY_OVERRIDES, "train.steps=2", "finetune.steps=2",
                       "data.pairs=world:8", "train.sample_every=2")])
    assert code == 0
    printed = capsys.readouterr().out
    for stage in ("1/5", "2/5", "3/5 stage 1", "4/5 stage 2", "5/5 evaluation"):
        assert f"== {stage}" in printed
    summary = json.loads((out / "recipe.json").read_text())
    metrics = summary["metrics"]
    assert f"overall={metrics['overall']:.3f}" in printed
    assert metrics["counts"]["single_object"]["n"] == 1 and len(metrics["counts"]) == 7  # GenEval's 6 + compositions
    assert f"mean={metrics['compositions']:.3f}" in printed  # the held-out compositions, reported on their own
    assert summary["times"]["total_s"] >= sum(v for k, v in summary["times"].items() if k != "total_s") - 1e-6
    assert (out / "pretrain/checkpoints/step_00000002/manifest.json").is_file()
    assert (out / "finetune/samples/step_00000002.png").is_file()
    assert len((out / "eval/metadata.jsonl").read_text().splitlines()) == 7
    fidelity = summary["fidelity"]  # stage 1's regenerations of held-out scenes, as iomm eval reconstruct scores them
    assert fidelity["n"] == 8 and fidelity["ratio"] == 0.0 and 0.0 <= fidelity["exact"] <= 1.0
    assert f"exact={fidelity['exact']:.3f}" in printed


def test_bench_times_every_phase_of_the_real_step(tiny_mllm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output goes under the working directory's runs/, not the repo
    code = main(["bench", "train-step", "--steps", "2", "--warmup", "1", "--compare-naive",
                 *sets(f"mllm.path={tiny_mllm_dir}", *TINY_OVERRIDES)])
    assert code == 0
    out = tmp_path / "runs/bench/train_step.json"
    assert f"wrote {Path('runs/bench/train_step.json')}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    for run in (result["run"], result["naive"]):
        seconds = run["seconds_per_step"]
        assert all(seconds[phase] > 0 for phase in PHASES), seconds
        assert sum(seconds[phase] for phase in PHASES) <= seconds["step"] * 1.01  # phases are inside the step
        assert run["images_per_s"] == pytest.approx(run["batch_size"] / seconds["step"])
    assert result["speedup"] == pytest.approx(result["run"]["images_per_s"] / result["naive"]["images_per_s"])
    assert result["command"].startswith("iomm bench train-step ") and "--compare-naive" in result["command"]
    flops = result["run"]["flops_per_step"]  # per phase, read at the phases' own boundaries
    assert all(flops[phase] > 0 for phase in ("generator_forward", "generator_backward", "conditioning_forward"))
    assert flops["generator_backward"] == pytest.approx(2 * flops["generator_forward"], rel=0.3)  # dW and dx
    assert flops["step"] >= sum(flops[phase] for phase in PHASES if phase in flops)
    assert 0 < result["run"]["mfu"]["step"] < 1 and 0 < result["run"]["mfu"]["generator"] < 1


def test_describe_counts_the_paper_scale_models():
    counts = describe(load_config(CONFIGS / "iomm-b.yaml", check_paths=False))
    # InternVL3-2B (InternViT-300M + Qwen2.5-1.5B, untied head), the FLUX.1 VAE, the 1.6B MM-DiT of IOMM-B
    assert counts["mllm_vision"] + counts["mllm_language"] == pytest.approx(2.0889e9, rel=1e-4)
    assert counts["vae"] == 83_819_683
    assert counts["generator"] == pytest.approx(1.6e9, rel=0.01)
    assert counts["adapter"] == pytest.approx(29e6, rel=0.02)  # the paper's ~29M RQA
    assert counts["trainable"] == counts["adapter"] + counts["connector"] + counts["generator"]
    large = describe(load_config(CONFIGS / "iomm-l.yaml", check_paths=False))
    assert large["generator"] == pytest.approx(2.7e9, rel=0.03)
    xl = describe(load_config(CONFIGS / "iomm-xl.yaml", check_paths=False))  # Z-Image's own 6.15B layout
    assert xl["generator"] == pytest.approx(6.0e9, rel=0.1)
    # Qwen-Image: its 20B transformer, its Qwen2.5-VL-7B text encoder and VAE; rank-64 LoRA on q, k, v, out of 60 blocks
    qwen = describe(load_config(CONFIGS / "qwen-image-mix-lora.yaml", check_paths=False))
    assert qwen["generator"] == pytest.approx(20.4e9, rel=0.01) == qwen["lora_base"]
    assert qwen["mllm_vision"] + qwen["mllm_language"] == pytest.approx(8.29e9, rel=0.01)
    assert qwen["lora"] == qwen["trainable"] == 60 * 4 * 64 * (3072 + 3072)


def test_describe_on_a_qwen25_vl_checkpoint(tmp_path, capsys):
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 48, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "fullatt_block_indexes": [1]},
        text_config={"vocab_size": 100, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 96, "rope_scaling": {"type": "mrope",
                                                                                          "mrope_section": [2, 4, 6]}},
        image_token_id=99, vision_start_token_id=97, vision_end_token_id=98)
    config.save_pretrained(tmp_path / "qwen")
    counts = describe(load_config(None, [f"mllm.path={tmp_path / 'qwen'}"], check_paths=False))
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(config)
    assert counts["mllm_vision"] == sum(p.numel() for p in model.model.visual.parameters())
    assert counts["mllm_vision"] + counts["mllm_language"] == sum(p.numel() for p in model.parameters())
    assert main(["describe", "--set", f"mllm.path={tmp_path / 'qwen'}"]) == 0
    assert "mllm_vision" in capsys.readouterr().out


def test_describe_gives_the_per_gpu_memory_of_the_model_state(capsys):
    from iomm.footprint import memory_per_gpu

    counts = {"mllm_vision": 10**9, "mllm_language": 2 * 10**9, "vae": 0, "trainable": 2**30}
    ddp, fsdp = memory_per_gpu(counts, 8, "ddp"), memory_per_gpu(counts, 8, "fsdp")
    assert ddp["parameters"] == 4 and ddp["optimizer"] == 8 and ddp["ema"] == 4  # GiB for 2^30 fp32 weights
    assert fsdp["optimizer"] == 1 and fsdp["frozen_mllm"] == ddp["frozen_mllm"] == 3 * 10**9 * 2 / 2**30
    assert ddp["total"] == pytest.approx(20 + 6e9 / 2**30)
    config = str(resources.files("iomm") / "configs" / "iomm-l.yaml")
    assert main(["describe", "--config", config, "--gpus", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"] == f"iomm describe --config {config} --json --gpus 8 --parallel ddp"
    assert 50 < report["memory_gib"]["total"] < 80


def test_describe_counts_muon_state_as_muon_keeps_it_against_the_gpu_a_flag_names(capsys):
    from iomm.footprint import memory_per_gpu

    config = str(CONFIGS / "iomm-xl.yaml")  # Muon for the generator blocks' matrices
    counts = describe(load_config(config, check_paths=False))
    muon, rest = counts["muon_matrices"], counts["trainable"] - counts["muon_matrices"]
    assert 0.9 * counts["generator"] < muon < counts["trainable"]
    fsdp = memory_per_gpu(counts, 8, "fsdp")  # Muon: one fp32 momentum; AdamW: two fp32 moments
    assert fsdp["optimizer"] == pytest.approx((4 * muon + 8 * rest) / 8 / 2**30)
    assert main(["describe", "--config", config, "--gpus", "8", "--parallel", "fsdp", "--gpu", "H200"]) == 0
    printed = capsys.readouterr().out
    assert f"left of 141 GiB  {141 - fsdp['total']:9.2f}  for activations (--gpu h200)" in printed
    assert f"Muon's one fp32 momentum for the {muon / 1e9:.2f} B parameters" in printed
    assert main(["describe", "--config", config, "--gpus", "8", "--parallel", "fsdp"]) == 0
    assert "left of 80 GiB" in (printed := capsys.readouterr().out) and "by default an H100; set --gpu" in printed
    assert main(["describe", "--config", config, "--gpus", "8", "--gpu-memory", "96", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu_memory_gib"] == 96 and report["command"].endswith("--gpus 8 --parallel ddp --gpu-memory 96")
    with pytest.raises(SystemExit, match="add --gpus N"):
        main(["describe", "--config", config, "--gpu", "h100"])


def test_gpu_bench_script_checks_its_arguments_and_runs_at_a_tiny_size_on_a_cpu(tmp_path):
    import subprocess

    script = str(Path(__file__).resolve().parents[1] / "scripts/gpu_bench.sh")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=600)

    assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert run("--help").returncode == 0
    for args, message in ((("--batch", "x"), "--batch expects a whole number >= 1"),
                          (("--steps", "0"), "--steps expects a whole number >= 1"),
                          (("--bogus",), "unknown argument '--bogus'"), ((), "no CUDA device")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr
    tiny = ["--set", "mllm.path=bench-b-mini", "--set", f"mllm.nano_dir={tmp_path / 'mllm'}", "--set",
            "codec.path=bench-b-mini", "--set", f"codec.nano_dir={tmp_path / 'vae'}", "--set", "data.resolution=64"]
    result = run("--cpu", "--no-compile", "--config", str(CONFIGS / "bench-b-mini.yaml"), *tiny, "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out/compile_false.json").read_text())
    assert record["run"]["batch_size"] == 2 and "images/s" in result.stdout and "peak memory" in result.stdout
    live = next(line for line in result.stdout.splitlines() if line.startswith("live (iomm pretrain, step 1)"))
    assert "images/s" in live and "data_wait" in live and "MFU" in live  # what a real run logs, for the estimate


def test_describe_flops_gives_the_paper_scale_proportions():
    from iomm.footprint import forward_flops

    paper = forward_flops(load_config(CONFIGS / "iomm-b.yaml", check_paths=False))
    mini = forward_flops(load_config(CONFIGS / "bench-b-mini.yaml", check_paths=False))
    assert paper["tokens"] == {"prompt": 12, "image": 256, "queries": 256, "latent": 1024}
    assert mini["tokens"]["queries"] / mini["tokens"]["latent"] == paper["tokens"]["queries"] / 1024
    for ratio in ("mllm_to_generator", "vae_to_generator", "condition_to_latent_tokens"):  # within 20% of IOMM-B's
        assert mini["ratios"][ratio] == pytest.approx(paper["ratios"][ratio], rel=0.2)
    qwen = forward_flops(load_config(CONFIGS / "qwen-image-mix-lora.yaml", check_paths=False))  # Qwen2.5-VL too
    assert qwen["tokens"]["latent"] > 0 and qwen["tokens"]["queries"] == 0  # Qwen-Image reads the LLM, no queries
    assert qwen["ratios"]["mllm_to_generator"] > 0 and qwen["ratios"]["vae_to_generator"] > 0


def test_bench_sample_times_iomms_sampler_against_diffusers_loop(tiny_config, tmp_path):
    from iomm.training.trainer import Trainer

    Trainer(tiny_config("train.steps=1"), tmp_path / "run", progress=False).fit()
    out = tmp_path / "sample.json"
    assert main(["bench", "sample", "--model", str(tmp_path / "run"), "--prompts", "3", "--steps", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["iomm_s"] > 0 and result["diffusers_loop_s"] > 0
    assert result["max_abs_difference"] < 1e-4  # the same images: one batch of both halves, or two calls
    assert result["command"].startswith("iomm bench sample --model=")


def test_bench_speedups_rows_are_valid_configs_each_against_the_naive_step():
    from iomm.lab.bench.speedups import rows
    from iomm.lab.bench.train_step import NAIVE

    table = rows()
    assert table[0].name == "naive faithful step" and not table[0].overrides and not table[0].cached_latents
    assert len({row.name for row in table}) == len(table)
    for row in table:
        cfg = load_config(CONFIGS / "bench-b-mini.yaml", [*NAIVE, *row.overrides], check_paths=False)
        assert cfg.mllm.prefix_cache == ("mllm.prefix_cache=true" in row.overrides)
    naive = load_config(CONFIGS / "bench-b-mini.yaml", NAIVE, check_paths=False)
    assert (naive.train.mixed_precision, naive.masking.mode, naive.mllm.prefix_cache, naive.data.latents,
            naive.train.compile, naive.train.fused_optimizer) == ("fp32", "zero", False, None, False, False)


def test_reconstruct_writes_the_masked_view_beside_its_regeneration(tiny_config, tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from iomm.image_tensors import image_grid, to_tensor
    from iomm.inference.pipeline import IOMMPipeline
    from iomm.training.trainer import Trainer

    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "mine.png")
    out = tmp_path / "out/rec.png"
    assert main(["reconstruct", "--model", str(tmp_path / "run"), "--image", str(tmp_path / "mine.png"),
                 "--mask-ratio", "0.5", "--seed", "3", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    written = Image.open(out)
    assert written.size == (2 + 32 + 2 + 32 + 2, 2 + 32 + 2)  # two 32 px panels in one row, 2 px apart
    pipe = IOMMPipeline.from_pretrained(tmp_path / "run")  # the demo's reconstruction tab: the same two images
    shown = pipe.reconstruct(Image.open(tmp_path / "mine.png"), 0.5, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image_grid([to_tensor(list(shown))])))
    with pytest.raises(SystemExit, match="--mask-ratio"):
        main(["reconstruct", "--model", str(tmp_path / "run"), "--image", str(tmp_path / "mine.png"),
              "--mask-ratio", "1"])
