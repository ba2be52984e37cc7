"""`iomm describe`: parameter counts per component without allocating weights."""

from __future__ import annotations

import argparse
import json

from iomm.commands.train import add_config_args
from iomm.config import load_config

# Nominal memory of common GPUs (GB as sold, compared here with GiB, so the room left reads a few GiB high:
# CUDA shows about 79 GiB on an H100); --gpu-memory takes the exact figure.
GPU_MEMORY_GIB = {"h100": 80.0, "h100-nvl": 94.0, "h200": 141.0, "a100": 80.0, "a100-40gb": 40.0, "b200": 192.0,
                  "l40s": 48.0}
DEFAULT_GPU = "h100"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("describe", help="parameter counts per component (meta device, no weights)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--gpus", type=int, default=None, help="also the per-GPU memory of the model state on N GPUs")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="with --gpus: replicated or sharded")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=str.lower, choices=sorted(GPU_MEMORY_GIB), default=None,
                        help=f"with --gpus: the GPU the model state is set against (default {DEFAULT_GPU})")
    device.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="with --gpus: the memory of one GPU in GiB, for a GPU not in --gpu's list")
    p.add_argument("--flops", action="store_true", help="also the forward FLOPs of one sample per part, and ratios")
    p.set_defaults(func=_describe)


def _gpu_memory(kind: str | None, gib: float | None) -> tuple[float, str]:
    """One GPU's memory in GiB, and how it was chosen: --gpu-memory, else --gpu's table entry, else the default."""
    if gib is not None:
        return gib, f"--gpu-memory {gib:g}"
    if kind is not None:
        return GPU_MEMORY_GIB[kind], f"--gpu {kind}"
    return GPU_MEMORY_GIB[DEFAULT_GPU], f"by default an {DEFAULT_GPU.upper()}; set --gpu KIND or --gpu-memory GIB"


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
    if args.gpus is None and (args.gpu or args.gpu_memory is not None):
        raise SystemExit("iomm describe: --gpu and --gpu-memory size the per-GPU memory table; add --gpus N")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise SystemExit(f"iomm describe: expected --gpu-memory > 0 (GiB), got {args.gpu_memory:g}")
    memory = memory_per_gpu(counts, args.gpus, args.parallel) if args.gpus else None
    gpu_gib, gpu_origin = _gpu_memory(args.gpu, args.gpu_memory)
    if args.json:
        device = [f"--gpu {args.gpu}"] if args.gpu else [f"--gpu-memory {args.gpu_memory:g}"] if args.gpu_memory else []
        command = " ".join(["iomm describe", *([f"--config {args.config}"] if args.config else []),
                            *(f"--set {o}" for o in args.overrides), "--json",
                            *([f"--gpus {args.gpus} --parallel {args.parallel}", *device] if memory else []),
                            *(["--flops"] if flops else [])])
        device_memory = {"gpu_memory_gib": gpu_gib, "gpu_memory_from": gpu_origin}
        print(json.dumps({"command": command, **counts, **({"memory_gib": memory, **device_memory} if memory else {}),
                          **({"forward": flops} if flops else {})}, indent=1))
        return 0
    print(format_counts(counts))
    if memory:
        print(format_memory(memory, args.gpus, args.parallel, counts, gpu_gib, gpu_origin))
    if flops:
        print(format_flops(flops))
    return 0
