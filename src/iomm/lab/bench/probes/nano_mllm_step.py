"""The nano MLLM's training step: its time in fp32 and (where native) bf16, how much of it is data, its FLOPs and
its MFU against this machine's fastest matmul peak. Decides the nano MLLM's precision and tells where its
build time goes.

    .venv/bin/python -m iomm.lab.bench.probes.nano_mllm_step --steps 30 --out bench/results/nano_mllm_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from iomm.lab.bench.probes.report import command_line
from iomm.nano.mllm import NanoMLLMConfig, build_nano_mllm
from iomm.nano.mllm_training import TaskSampler, train_loop
from iomm.training.hardware import bf16_is_native, fastest_matmul_peak, machine_facts


def step_flops(cfg: NanoMLLMConfig) -> int:
    """FLOPs of one training step (forward and backward of both task batches, auxiliaries included)."""
    model, tokenizer = build_nano_mllm(cfg, 0)
    counter = FlopCounterMode(display=False)
    with counter:
        train_loop(model, TaskSampler(cfg, tokenizer, 0), cfg, steps=1, minutes=None, progress=False)
    return counter.get_total_flops()


def seconds_per_step(cfg: NanoMLLMConfig, steps: int) -> float:
    model, tokenizer = build_nano_mllm(cfg, 0)
    sampler = TaskSampler(cfg, tokenizer, 0)
    train_loop(model, sampler, cfg, steps=3, minutes=None, progress=False)  # warm-up: allocator, oneDNN kernels
    start = time.perf_counter()
    train_loop(model, sampler, cfg, steps=steps, minutes=None, progress=False)
    return (time.perf_counter() - start) / steps


def data_seconds_per_step(cfg: NanoMLLMConfig, steps: int) -> float:
    _, tokenizer = build_nano_mllm(cfg, 0)
    sampler = TaskSampler(cfg, tokenizer, 0)
    start = time.perf_counter()
    for _ in range(steps):
        sampler.image_batch()
        sampler.text_batch(cfg.text_batch_size)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = NanoMLLMConfig()
    precisions = ["fp32", "bf16"] if bf16_is_native() else ["fp32"]
    seconds = {p: seconds_per_step(dataclasses.replace(cfg, precision=p), args.steps) for p in precisions}
    flops = step_flops(cfg)
    peak = fastest_matmul_peak(torch.device("cpu"))
    record = {
        "command": command_line("nano_mllm_step"), "machine": machine_facts(), "steps_timed": args.steps,
        "seconds_per_step": seconds, "data_seconds_per_step": data_seconds_per_step(cfg, args.steps),
        "flops_per_step": flops, "matmul_peak_flops": peak,
        "mfu": {p: flops / (s * peak) for p, s in seconds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: record[k] for k in ("seconds_per_step", "data_seconds_per_step", "mfu")}))


if __name__ == "__main__":
    main()
