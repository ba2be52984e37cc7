"""Time and cost of a config's training before the first GPU hour (`iomm describe --estimate`).

FLOPs of one training sample: the forward FLOPs of each part (`iomm.footprint.forward_flops`, counted on the meta
device) times the passes the training step runs over it. Trained parts run forward and backward to their inputs and
weights (3 forwards); the frozen LLM, where the adapter's queries run through it, forward and backward to its inputs
only (2; over the queries alone under the prefix cache), plus a recompute under gradient checkpointing; the vision
tower and the VAE forward only, under no_grad. A LoRA generator is frozen but for the adapters: forward and backward
to its inputs. A caption sample (stage 2) skips the vision tower; its LLM is counted at the image sample's length, an
upper bound. Samples hit by condition dropout skip the MLLM, adapter and connector (the null condition is learned).

Time: total FLOPs / (GPUs x the GPU's bf16 dense peak x MFU), the MFU an assumption (`--mfu`) or measured by
`iomm bench train-step` (`--mfu-file`, e.g. a file `scripts/gpu_bench.sh` writes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from iomm.config import Config

# bf16 dense tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity; scripts/gpu_bench.sh has the same
# figures), by `iomm describe --gpu` kind. H800 and H200 have the H100 SXM's compute.
PEAK_BF16_TFLOPS = {"h100": 989.4, "h100-nvl": 835.5, "h200": 989.4, "h800": 989.4, "a100": 312.0,
                    "a100-40gb": 312.0, "b200": 2250.0, "l40s": 362.1}
# A CUDA device name (torch.cuda.get_device_name) to its peak: the first pattern it contains.
DEVICE_PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                ("A100", 312.0), ("L40S", 362.1), ("B200", 2250.0))
STAGES = {"pretrain": ("pretrain",), "finetune": ("finetune",), "both": ("pretrain", "finetune")}

# The paper's IOMM-B image-only pre-training: about 11M images, about 10 epochs, about 1,000 H800 GPU-hours
# (the issue quotes 1,050 too).
PAPER_IOMM_B = {"images": 11e6, "epochs": 10, "gpu": "h800", "gpu_hours": (1000.0, 1050.0)}


def train_flops_per_sample(cfg: Config, forward: dict[str, dict[str, float]]) -> dict[str, float]:
    """FLOPs of one training sample per part, and their total, from `forward_flops`'s forward counts."""
    flops, tokens = forward["flops"], forward["tokens"]
    lora = cfg.train.lora
    conditioning_trains = not (lora.enabled and lora.base)  # a LoRA base run freezes its adapter and connector
    conditioned = 1.0 - cfg.train.cond_dropout
    cached = cfg.data.latents is not None  # a latent cache holds the VAE's moments and the MLLM's image tokens
    llm_passes = 1.0
    if cfg.adapter.kind != "raw" and conditioning_trains:  # gradients run back through the LLM to the queries
        checkpointing = cfg.mllm.gradient_checkpointing
        whole_sequence = checkpointing or not cfg.mllm.prefix_cache  # `forward_suffix` runs the plain forward then
        sequence = tokens["prompt"] + tokens["image"] + tokens["queries"]
        llm_passes += 1.0 if whole_sequence else tokens["queries"] / sequence
        llm_passes += 1.0 if checkpointing else 0.0
    conditioning_passes = 3.0 if conditioning_trains else 1.0
    generator_passes = (2.0 if lora.enabled else 3.0) + (1.0 if cfg.train.activation_checkpointing else 0.0)
    out = {
        "mllm_vision": 0.0 if cached else flops["mllm_vision"] * conditioned * cfg.train.mix_ratio,
        "mllm_language": flops["mllm_language"] * conditioned * llm_passes,
        "adapter": flops["adapter"] * conditioned * conditioning_passes,
        "connector": flops["connector"] * conditioned * conditioning_passes,
        "vae_encode": 0.0 if cached else flops["vae_encode"],
        "generator": flops["generator"] * generator_passes * cfg.flow.samples_per_condition,
    }
    out["total"] = sum(out.values())
    return out


def stage_configs(cfg: Config, stage: str) -> dict[str, Config]:
    """The config of each stage `stage` names: `train` for pre-training; for fine-tuning, `finetune_config`'s
    schedule (finetune.steps at finetune.mix_ratio) without its checks of the data, since a stage-2 run needs
    data.pairs and sizing one does not (`iomm.config.check_values` has checked the `finetune` fields already)."""
    finetune = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=cfg.finetune.steps, mix_ratio=cfg.finetune.mix_ratio))
    return {name: {"pretrain": cfg, "finetune": finetune}[name] for name in STAGES[stage]}


def implied_mfu(images_per_s_per_gpu: float, flops_per_sample: float, peak_flops: float) -> float:
    """The MFU a throughput implies: FLOP/s achieved on one GPU over its peak FLOP/s."""
    return images_per_s_per_gpu * flops_per_sample / peak_flops


def estimate(stages: dict[str, Config], forward: dict[str, dict[str, float]], *, gpus: int, gpu: str, mfu: float,
             mfu_from: str) -> dict[str, Any]:
    """GPU-hours, wall hours and images/s per GPU of each stage's schedule, and of all of them."""
    if gpu not in PEAK_BF16_TFLOPS:
        raise ValueError(f"--gpu: expected one of {', '.join(sorted(PEAK_BF16_TFLOPS))}, got {gpu!r}")
    check_mfu(mfu, "the MFU")
    sustained = PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu  # FLOP/s one GPU delivers
    out: dict[str, Any] = {"gpu": gpu, "gpus": gpus, "peak_tflops": PEAK_BF16_TFLOPS[gpu], "mfu": mfu,
                           "mfu_from": mfu_from, "stages": {}}
    for name, cfg in stages.items():
        per_sample = train_flops_per_sample(cfg, forward)
        samples_per_step = cfg.train.batch_size * cfg.train.grad_accum
        samples = cfg.train.steps * samples_per_step
        gpu_hours = samples * per_sample["total"] / sustained / 3600
        out["stages"][name] = {
            "steps": cfg.train.steps, "samples_per_step": samples_per_step, "samples": samples,
            "image_only_fraction": cfg.train.mix_ratio, "flops_per_sample": per_sample,
            "images_per_s_per_gpu": sustained / per_sample["total"],
            "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus,
        }
    stage_values = out["stages"].values()
    gpu_hours = sum(s["gpu_hours"] for s in stage_values)
    out["total"] = {"samples": sum(s["samples"] for s in stage_values),
                    "flops": sum(s["samples"] * s["flops_per_sample"]["total"] for s in stage_values),
                    "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus}
    return out


def check_mfu(mfu: float, flag: str) -> None:
    """ValueError naming `flag` unless `mfu` is a fraction of the peak: in (0, 1]."""
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"expected {flag} in (0, 1], got {mfu:g}")


def device_peak(machine: str) -> tuple[str, float] | None:
    """The device-name pattern a benchmark's `machine` line contains and its bf16 dense peak (TFLOP/s)."""
    return next(((name, peak) for name, peak in DEVICE_PEAKS if name in machine), None)


def measured_mfu(path: str | Path) -> tuple[float, str]:
    """The MFU of the training step in an `iomm bench train-step` JSON, and where it came from: the FLOP/s it
    achieved over its GPU's bf16 dense peak, else (no GPU of `DEVICE_PEAKS` in its `machine`) its own MFU against
    the GEMM peak measured in the same run."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--mfu-file: expected a JSON file written by `iomm bench train-step`, got {path} ({err})")
    run = record.get("run") if isinstance(record, dict) else None
    if not isinstance(run, dict) or not {"mfu", "flops_per_step", "seconds_per_step"} <= run.keys():
        raise ValueError(f"--mfu-file: expected `iomm bench train-step`'s JSON (a 'run' with 'mfu', 'flops_per_step' "
                         f"and 'seconds_per_step'), got {path} without them")
    machine = str(record.get("machine", ""))
    found = device_peak(machine)
    if found is None:
        mfu, origin = run["mfu"]["step"], f"--mfu-file {path}: MFU against the GEMM peak measured on {machine!r}"
    else:
        achieved = run["flops_per_step"]["step"] / run["seconds_per_step"]["step"]
        mfu = achieved / (found[1] * 1e12)
        origin = f"--mfu-file {path}: {achieved / 1e12:.0f} TFLOP/s measured on an {found[0]} ({found[1]:g} peak)"
    check_mfu(mfu, f"the MFU of --mfu-file {path}")
    return mfu, origin


def format_estimate(result: dict[str, Any]) -> str:
    lines = [f"training estimate on {result['gpus']} x {result['gpu']} ({result['peak_tflops']:g} TFLOP/s bf16 dense "
             f"each) at MFU {result['mfu']:.1%} ({result['mfu_from']}):",
             f"{'stage':>15s}  {'samples':>10s}  {'TFLOP/sample':>12s}  {'images/s/GPU':>12s}  {'GPU-hours':>10s}  "
             f"{'wall hours':>10s}"]
    for name, s in result["stages"].items():
        lines.append(f"{name:>15s}  {s['samples'] / 1e6:8.2f} M  {s['flops_per_sample']['total'] / 1e12:12.2f}  "
                     f"{s['images_per_s_per_gpu']:12.2f}  {s['gpu_hours']:10,.0f}  {s['wall_hours']:10,.1f}")
    total = result["total"]
    lines.append(f"{'total':>15s}  {total['samples'] / 1e6:8.2f} M  {'':12s}  {'':12s}  {total['gpu_hours']:10,.0f}  "
                 f"{total['wall_hours']:10,.1f}  ({total['wall_hours'] / 24:.1f} days)")
    lines.append("FLOPs per sample: each part's forward (meta device) times the passes training runs over it "
                 "(iomm.estimate); caption samples at the image sample's LLM length, an upper bound")
    return "\n".join(lines)


def paper_implied_mfu(flops_per_sample: float) -> dict[str, Any]:
    """IOMM-B's reported pre-training throughput (`PAPER_IOMM_B`) and the MFU it implies under a FLOP count of
    one training sample, for each GPU-hour figure quoted."""
    images = PAPER_IOMM_B["images"] * PAPER_IOMM_B["epochs"]
    peak = PEAK_BF16_TFLOPS[PAPER_IOMM_B["gpu"]] * 1e12
    rows = []
    for hours in PAPER_IOMM_B["gpu_hours"]:
        rate = images / (hours * 3600)
        rows.append({"gpu_hours": hours, "images_per_s_per_gpu": rate,
                     "implied_mfu": implied_mfu(rate, flops_per_sample, peak)})
    return {"paper": {**PAPER_IOMM_B, "gpu_hours": list(PAPER_IOMM_B["gpu_hours"])},
            "flops_per_sample": flops_per_sample, "peak_tflops": peak / 1e12, "figures": rows}
