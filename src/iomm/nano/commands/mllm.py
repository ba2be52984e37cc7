"""`iomm mllm train|eval` (the nano MLLM) and `iomm understand` (ask any supported VLM about an image)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from iomm.image_tensors import to_tensor


def register(subparsers: argparse._SubParsersAction) -> None:
    mllm = subparsers.add_parser("mllm", help="the nano MLLM: train it, measure its understanding")
    commands = mllm.add_subparsers(dest="mllm_command", required=True)

    train = commands.add_parser("train", help="train the nano MLLM and save it as a HF checkpoint dir")
    train.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    train.add_argument("--steps", type=int, default=None,
                       help="optimizer steps (default: iomm.nano.mllm.DEFAULT_STEPS): the same model on every machine")
    train.add_argument("--minutes", type=float, default=None,
                       help="also stop at this wall-clock budget if it comes first (the model then depends on the "
                            "machine's speed)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--random-init", action="store_true",
                       help="save the same architecture randomly initialised, untrained (ablation)")
    train.add_argument("--tiny", action="store_true", help="a seconds-long toy version (tests, smoke runs)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a NanoMLLMConfig field, e.g. --set text_heads=4 (repeatable)")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("eval", help="held-out understanding accuracy of a nano MLLM dir (JSON)")
    evaluate.add_argument("--mllm", type=Path, required=True, help="checkpoint directory")
    evaluate.add_argument("--out", type=Path, required=True, help="output JSON file")
    evaluate.add_argument("--n", type=int, default=200, help="questions per question type")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--results", type=Path, default=None,
                          help="also write one record per answer (JSONL: path image/text, tag, prompt, correct)")
    evaluate.set_defaults(func=run_eval)

    understand = subparsers.add_parser("understand", help="ask a VLM checkpoint a question about an image")
    understand.add_argument("--mllm", type=Path, required=True, help="checkpoint directory (nano or HF VLM)")
    understand.add_argument("--image", type=Path, default=None, help="image file (omit for a text-only question)")
    understand.add_argument("--question", required=True)
    understand.add_argument("--max-new-tokens", type=int, default=32)
    understand.add_argument("--trust-remote-code", action="store_true",
                            help="allow a checkpoint's own Python code to run (needed by non-HF-native models)")
    understand.set_defaults(func=run_understand)


def run_train(args: argparse.Namespace) -> int:
    from iomm.nano.mllm import DEFAULT_STEPS, NanoMLLMConfig, tiny_config
    from iomm.nano.mllm_training import train_nano_mllm
    from iomm.typed_config import apply_overrides, build_dataclass

    base = tiny_config() if args.tiny else NanoMLLMConfig()
    config = build_dataclass(NanoMLLMConfig, apply_overrides(dataclasses.asdict(base), args.set), "--set")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_nano_mllm(args.out, steps=args.steps or DEFAULT_STEPS, minutes=args.minutes, seed=args.seed,
                    random_init=args.random_init, config=config)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from iomm.evaluation.prompt_images import write_jsonl
    from iomm.nano.understanding import evaluate_understanding

    records: list[dict] = []
    results = evaluate_understanding(args.mllm, n=args.n, seed=args.seed, records=records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if args.results is not None:
        write_jsonl(args.results, records)
    print(json.dumps(results["accuracy"]))
    return 0


def load_image(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1]."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as image:
        return to_tensor(image.convert("RGB")).contiguous()


def run_understand(args: argparse.Namespace) -> int:
    from iomm.conditioning.mllm import FrozenMLLM

    mllm = FrozenMLLM.from_pretrained(args.mllm, trust_remote_code=args.trust_remote_code)
    image = load_image(args.image) if args.image is not None else None
    print(mllm.answer(image, args.question, max_new_tokens=args.max_new_tokens))
    return 0
