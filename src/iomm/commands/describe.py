"""`iomm describe`: parameter counts per component without allocating weights; with --gpus, the per-GPU memory
of the model state; with --estimate, the GPU-hours and wall time of the config's schedule (`iomm.estimate`)."""

from __future__ import annotations

import argparse
import json

from iomm.commands.train import add_config_args
from iomm.config_checks import load_config
from iomm.estimate import STAGES

# Nominal memory of common GPUs (GB as sold, compared here with GiB, so the room left reads a few GiB high:
# CUDA shows about 79 GiB on an H100); --gpu-memory takes the exact figure.
GPU_MEMORY_GIB = {"h100": 80.0, "h100-nvl": 94.0, "h200": 141.0, "h800": 80.0, "a100": 80.0, "a100-40gb": 40.0,
                  "b200": 192.0, "l40s": 48.0}
DEFAULT_GPU = "h100"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("describe", help="parameter counts per component (meta device, no weights)")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--gpus", type=int, default=None, help="also the per-GPU memory of the model state on N GPUs")
    p.add_argument("--parallel", choices=("ddp", "fsdp", "hsdp"), default="ddp",
                   help="with --gpus: replicated, sharded, or sharded within groups of --shard-size")
    p.add_argument("--shard-size", type=int, default=None, help="with --parallel hsdp: GPUs a shard group spans "
                                                               "(default: all of them)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=str.lower, choices=sorted(GPU_MEMORY_GIB), default=None,
                        help=f"with --gpus: the GPU the model state is set against (default {DEFAULT_GPU})")
    device.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="with --gpus: the memory of one GPU in GiB, for a GPU not in --gpu's list")
    p.add_argument("--flops", action="store_true", help="also the forward FLOPs of one sample per part, and ratios")
    p.add_argument("--estimate", action="store_true",
                   help="with --gpus: also the GPU-hours, wall time and images/s per GPU of the config's schedule")
    mfu = p.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=float, default=None, metavar="M",
                     help="with --estimate: the model FLOPs utilisation assumed, in (0, 1], e.g. 0.35")
    mfu.add_argument("--mfu-file", default=None, metavar="PATH",
                     help="with --estimate: the MFU measured by `iomm bench train-step` (its --out JSON)")
    p.add_argument("--stage", choices=tuple(STAGES), default="both",
                   help="with --estimate: pre-training (train.steps), fine-tuning (finetune.steps) or both")
    p.set_defaults(func=_describe)


def _gpu_memory(kind: str | None, gib: float | None) -> tuple[float, str]:
    """One GPU's memory in GiB, and how it was chosen: --gpu-memory, else --gpu's table entry, else the default."""
    if gib is not None:
        return gib, f"--gpu-memory {gib:g}"
    if kind is not None:
        return GPU_MEMORY_GIB[kind], f"--gpu {kind}"
    return GPU_MEMORY_GIB[DEFAULT_GPU], f"by default an {DEFAULT_GPU.upper()}; set --gpu KIND or --gpu-memory GIB"


def _estimate_inputs(args: argparse.Namespace) -> tuple[float, str] | None:
    """The MFU of --estimate and where it came from; None without --estimate. Checks the flags around it."""
    from iomm.estimate import check_mfu, measured_mfu

    if not args.estimate:
        if args.mfu is not None or args.mfu_file or args.stage != "both":
            raise SystemExit("iomm describe: --mfu, --mfu-file and --stage size the estimate; add --estimate")
        return None
    if args.gpus is None:
        raise SystemExit("iomm describe --estimate: expected --gpus N (the wall time divides by it), got none")
    if args.gpu_memory is not None:
        raise SystemExit(f"iomm describe --estimate: expected --gpu KIND (its bf16 peak), got --gpu-memory "
                         f"{args.gpu_memory:g}, which has no peak; --gpu is one of {', '.join(sorted(GPU_MEMORY_GIB))}")
    try:
        if args.mfu is not None:
            check_mfu(args.mfu, "--mfu")
            return args.mfu, f"--mfu {args.mfu:g}, an assumption"
        if args.mfu_file:
            return measured_mfu(args.mfu_file)
    except ValueError as err:
        raise SystemExit(f"iomm describe --estimate: {err}") from None
    raise SystemExit("iomm describe --estimate: expected --mfu M (an assumption, e.g. 0.35) or --mfu-file PATH "
                     "(`iomm bench train-step`'s JSON), got neither")


def _describe(args: argparse.Namespace) -> int:
    from iomm.estimate import estimate, format_estimate, stage_configs
    from iomm.footprint import describe, format_counts, format_flops, format_memory, forward_flops, memory_per_gpu

    if args.gpus is not None and args.gpus < 1:
        raise SystemExit(f"iomm describe: expected --gpus >= 1, got {args.gpus}")
    if args.gpus is None and (args.gpu or args.gpu_memory is not None):
        raise SystemExit("iomm describe: --gpu and --gpu-memory size the per-GPU memory table; add --gpus N")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise SystemExit(f"iomm describe: expected --gpu-memory > 0 (GiB), got {args.gpu_memory:g}")
    if args.shard_size is not None and (args.parallel != "hsdp" or not args.gpus or args.shard_size < 1
                                        or args.gpus % args.shard_size):
        raise SystemExit(f"iomm describe: --shard-size: expected a divisor of --gpus with --parallel hsdp, got "
                         f"{args.shard_size} with --gpus {args.gpus} --parallel {args.parallel}")
    mfu = _estimate_inputs(args)
    cfg = load_config(args.config, args.overrides, check_paths=False)
    counts = describe(cfg)
    try:
        forward = forward_flops(cfg) if args.flops or args.estimate else None
    except ValueError as err:
        raise SystemExit(f"iomm describe --{'flops' if args.flops else 'estimate'}: {err}") from None
    memory = memory_per_gpu(counts, args.gpus, args.parallel, args.shard_size) if args.gpus else None
    gpu_gib, gpu_origin = _gpu_memory(args.gpu, args.gpu_memory)
    cost = None
    if mfu is not None:
        stages = stage_configs(cfg, args.stage)
        cost = estimate(stages, forward, gpus=args.gpus, gpu=args.gpu or DEFAULT_GPU, mfu=mfu[0], mfu_from=mfu[1])
        if not args.gpu:
            cost["gpu_from"] = gpu_origin
    if args.json:
        device = [f"--gpu {args.gpu}"] if args.gpu else [f"--gpu-memory {args.gpu_memory:g}"] if args.gpu_memory else []
        shard = [f"--shard-size {args.shard_size}"] if args.shard_size else []
        mfu_flag = f"--mfu {args.mfu:g}" if args.mfu is not None else f"--mfu-file {args.mfu_file}"
        estimate_flags = ["--estimate", mfu_flag, *([f"--stage {args.stage}"] if args.stage != "both" else [])]
        command = " ".join(["iomm describe", *([f"--config {args.config}"] if args.config else []),
                            *(f"--set {o}" for o in args.overrides), "--json",
                            *([f"--gpus {args.gpus} --parallel {args.parallel}", *shard, *device] if memory else []),
                            *(["--flops"] if args.flops else []), *(estimate_flags if cost else [])])
        device_memory = {"gpu_memory_gib": gpu_gib, "gpu_memory_from": gpu_origin}
        print(json.dumps({"command": command, **counts, **({"memory_gib": memory, **device_memory} if memory else {}),
                          **({"forward": forward} if args.flops else {}),
                          **({"estimate": cost} if cost else {})}, indent=1))
        return 0
    print(format_counts(counts))
    if memory:
        print(format_memory(memory, args.gpus, args.parallel, counts, gpu_gib, gpu_origin))
    if cost:
        print(format_estimate(cost))
    if args.flops:
        print(format_flops(forward))
    return 0
