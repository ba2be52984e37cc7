"""`iomm export`: consolidate a (sharded) training checkpoint into a diffusers pipeline directory."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="a checkpoint of any world size -> a diffusers pipeline directory")
    p.add_argument("--model", required=True, help="checkpoint dir or run dir (newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (a new one, or an earlier export to replace)")
    p.add_argument("--no-ema", action="store_true", help="export the raw instead of the EMA weights")
    p.add_argument("--lora", action="store_true",
                   help="also write a LoRA run's adapters as pytorch_lora_weights.safetensors (diffusers' format)")
    p.add_argument("--scores", action="append", default=[], metavar="JSON",
                   help="an evaluation's result file for the model card (repeatable)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from iomm.inference.export import export

    out = export(args.model, args.out, use_ema=not args.no_ema, scores=args.scores, lora=args.lora)
    print(f"exported {'raw' if args.no_ema else 'EMA'} weights to {out}")
    return 0
