"""`iomm bench`, the benchmark commands: `train-step` (images/s and the time split of a training step, as JSON),
`speedups` (each training-step speed-up alone and all together), `sample` (iomm's sampler against diffusers' loop),
`world` (the procedural world's render speed). What they measure lives in `iomm.lab.bench`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from iomm.commands.train import add_config_args
from iomm.config_checks import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    b = sub.add_parser("train-step", help="time one training step, split by component")
    add_config_args(b)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--compare-naive", action="store_true",
                   help="also time the naive faithful step (fp32, zero masking, no prefix cache, online VAE, "
                        "eager blocks, AdamW's loop) and report the speed-up")
    b.add_argument("--out", default="runs/bench/train_step.json",
                   help="result JSON (default: runs/bench/train_step.json, outside the tracked tree)")
    b.set_defaults(func=_train_step)
    s = sub.add_parser("speedups", help="each training-step speed-up alone and all together, one process each")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--repeats", type=int, default=1,
                   help="rounds over all rows; each row keeps its fastest round (a shared machine's speed drifts)")
    s.add_argument("--images", type=int, default=64, help="world images in the folder every row reads")
    s.add_argument("--work", type=Path, default=Path("runs/bench/speedups"), help="images, latent cache, rows")
    s.add_argument("--out", type=Path, default=Path("runs/bench/speedups.json"))
    s.set_defaults(func=_speedups)
    s = sub.add_parser("sample", help="text-to-image with iomm's sampler against diffusers' scheduler loop")
    s.add_argument("--model", required=True, help="run, checkpoint or exported pipeline directory")
    s.add_argument("--prompts", type=int, default=16, help="how many (held-out world prompts)")
    s.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    s.add_argument("--cfg", type=float, default=None, help="guidance scale (default: config)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--out", default="runs/bench/sample.json")
    s.set_defaults(func=_sample)
    w = sub.add_parser("world", help="render speed of the procedural world (images/s, one thread)")
    w.add_argument("--n", type=int, default=5000)
    w.add_argument("--resolution", type=int, default=32)
    w.set_defaults(func=_world)


def _train_step(args: argparse.Namespace) -> int:
    from iomm.lab.bench.train_step import NAIVE, bench_train_step
    from iomm.training.hardware import machine

    command = ["iomm", "bench", "train-step", *(["--config", args.config] if args.config else []),
               *(f"--set={o}" for o in args.overrides), f"--steps={args.steps}", f"--warmup={args.warmup}",
               *(["--compare-naive"] if args.compare_naive else []), f"--out={args.out}"]
    result = {"command": shlex.join(command), "config": args.config, "overrides": args.overrides, "machine": machine()}
    result["run"] = bench_train_step(load_config(args.config, args.overrides), args.steps, args.warmup)
    _print("this config", result["run"])
    if args.compare_naive:
        result["naive"] = bench_train_step(load_config(args.config, args.overrides + NAIVE), args.steps, args.warmup)
        _print("naive faithful step", result["naive"])
        result["speedup"] = result["run"]["images_per_s"] / result["naive"]["images_per_s"]
        print(f"speed-up over the naive step: {result['speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _speedups(args: argparse.Namespace) -> int:
    from iomm.lab.bench.speedups import run, table

    record = run(args.config, args.overrides, args.steps, args.warmup, args.repeats, args.images, args.work,
                 args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(table(record))
    print(f"wrote {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from iomm.inference.pipeline import IOMMPipeline
    from iomm.lab.bench.sampling import bench_sample
    from iomm.nano.prompts import eval_prompts
    from iomm.training.hardware import machine

    pipe = IOMMPipeline.from_pretrained(args.model)
    cfg = pipe.cfg
    prompts = [p["prompt"] for p in eval_prompts(max(1, args.prompts // 6 + 1), seed=0,
                                                  resolution=cfg.data.resolution)][:args.prompts]
    with torch.no_grad():
        result = bench_sample(pipe.model, prompts, args.steps or cfg.flow.sample_steps,
                              cfg.flow.guidance_scale if args.cfg is None else args.cfg, args.repeats)
    command = ["iomm", "bench", "sample", f"--model={args.model}", f"--prompts={args.prompts}",
               *([f"--steps={args.steps}"] if args.steps else []), *([f"--cfg={args.cfg}"] if args.cfg else []),
               f"--repeats={args.repeats}", f"--out={args.out}"]
    record = {"command": shlex.join(command), "machine": machine(), "threads": torch.get_num_threads(), **result}
    print(f"{result['images']} images, {result['steps']} steps: iomm {result['iomm_s']:.2f} s, diffusers' loop "
          f"{result['diffusers_loop_s']:.2f} s ({result['iomm_over_diffusers']:.2f}x the time); images differ by "
          f"at most {result['max_abs_difference']:.1e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _print(title: str, run: dict) -> None:
    print(f"{title}: {run['images_per_s']:.1f} images/s ({run['mixed_precision']}, masking {run['masking_mode']}, "
          f"{run['threads']} threads)")
    for name, seconds in run["seconds_per_step"].items():
        print(f"  {name:>22s}  {seconds * 1000:8.1f} ms")
    mfu = run["mfu"]
    print(f"  {run['flops_per_step']['step'] / 1e9:.2f} GFLOP a step; MFU {mfu['step']:.1%} of the "
          f"{run['matmul_peak_flops'] / 1e9:.1f} GFLOP/s matmul peak" + (
              f", generator {mfu['generator']:.1%}" if mfu["generator"] is not None else ""))


def _world(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from iomm.nano.world import World, WorldConfig

    world, rng = World(WorldConfig(resolution=args.resolution)), np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(args.n):
        world.render(world.sample_scene(rng))
    rate = args.n / (time.perf_counter() - start)
    print(f"world: {rate:.0f} images/s sampled and rendered at {args.resolution} px (one process)")
    return 0
