"""`iomm recipe nano`: the whole method end to end on the built-in world (nano MLLM, pre-train, mix fine-tune, eval)."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("iomm") / "configs" / f"{name}.yaml"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recipe", help="run a whole recipe end to end")
    p.add_argument("name", choices=["nano"])
    p.add_argument("--config", default=None, help="config (default: the packaged configs/nano.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/nano")
    p.add_argument("--per-category", type=int, default=32, help="held-out evaluation prompts per GenEval category")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_recipe)


def _recipe(args: argparse.Namespace) -> int:
    from iomm.config import config_source, finetune_config, load_config
    from iomm.evaluation.reconstruction import sample_grid
    from iomm.model import build_codec, load_mllm
    from iomm.training.trainer import train

    config_path = args.config or packaged_config(args.name)
    cfg = load_config(config_path, args.overrides)
    stage2 = finetune_config(cfg, config_source(config_path, args.overrides))  # a bad stage 2 fails before stage 1
    out, times = Path(args.out), {}
    start = time.time()
    print(f"== 1/5 nano MLLM ({cfg.mllm.nano_dir})", flush=True)
    load_mllm(cfg)
    times["mllm_s"] = time.time() - start
    print(f"== 2/5 codec ({cfg.codec.kind}" + (f", {cfg.codec.nano_dir})" if cfg.codec.path == "nano" else ")"),
          flush=True)
    build_codec(cfg)
    times["codec_s"] = time.time() - start - sum(times.values())
    print("== 3/5 stage 1: image-only pre-training", flush=True)
    train(cfg, out / "pretrain", progress=not args.no_progress, sample_fn=sample_grid)
    times["pretrain_s"] = time.time() - start - sum(times.values())
    print("== 4/5 stage 2: mixed fine-tuning", flush=True)
    train(stage2, out / "finetune", init=out / "pretrain", progress=not args.no_progress, sample_fn=sample_grid)
    times["finetune_s"] = time.time() - start - sum(times.values())
    print("== 5/5 evaluation on held-out prompts (GenEval-shapes)", flush=True)
    metrics = evaluate_run(out / "finetune", out / "eval", args.per_category)
    times["eval_s"] = time.time() - start - sum(times.values())
    times["total_s"] = time.time() - start
    summary = {"metrics": metrics, "times": times, "config": cfg.to_dict()}
    (out / "recipe.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(format_metrics(metrics))
    print(f"total {times['total_s'] / 60:.1f} min ("
          + ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in times.items() if k != "total_s") + "); "
          + f"wrote {out / 'recipe.json'}")
    return 0


def evaluate_run(model_path: Path, out_dir: Path, per_category: int, seed: int = 0) -> dict:
    from iomm.evaluation.prompt_images import generate_for_prompts
    from iomm.nano.prompts import eval_prompts
    from iomm.nano.scorer import score_directory

    prompts = eval_prompts(per_category=per_category, seed=seed)
    generate_for_prompts(model_path, prompts, out_dir, seed=seed)
    metrics = score_directory(out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall")
            if k in metrics]
    return "GenEval-shapes: " + "  ".join(f"{k}={metrics[k]:.3f}" for k in keys)
