"""`iomm describe`: parameter counts per component without allocating weights."""

from __future__ import annotations

import argparse
import json

from iomm.commands.train import add_config_args
from iomm.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("describe", help="parameter counts per component (meta device, no weights)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--gpus", type=int, default=None, help="also the per-GPU memory of the model state on N GPUs")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="with --gpus: replicated or sharded")
    p.add_argument("--flops", action="store_true", help="also the forward FLOPs of one sample per part, and ratios")
    p.set_defaults(func=_describe)


def _describe(args: argparse.Namespace) -> int:
    from iomm.describe import describe, format_counts, format_flops, format_memory, forward_flops, memory_per_gpu

    cfg = load_config(args.config, args.overrides, check_paths=False)
    counts = describe(cfg)
    try:
        flops = forward_flops(cfg) if args.flops else None
    except ValueError as err:
        raise SystemExit(f"iomm describe --flops: {err}") from None
    if args.gpus is not None and args.gpus < 1:
        raise SystemExit(f"iomm describe: expected --gpus >= 1, got {args.gpus}")
    memory = memory_per_gpu(counts, args.gpus, args.parallel) if args.gpus else None
    if args.json:
        command = " ".join(["iomm describe", *([f"--config {args.config}"] if args.config else []),
                            *(f"--set {o}" for o in args.overrides), "--json",
                            *([f"--gpus {args.gpus} --parallel {args.parallel}"] if memory else []),
                            *(["--flops"] if flops else [])])
        print(json.dumps({"command": command, **counts, **({"memory_gib": memory} if memory else {}),
                          **({"forward": flops} if flops else {})}, indent=1))
        return 0
    print(format_counts(counts))
    if memory:
        print(format_memory(memory, args.gpus, args.parallel))
    if flops:
        print(format_flops(flops))
    return 0
