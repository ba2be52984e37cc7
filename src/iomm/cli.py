"""The `iomm` command line: one sub-command per user task.

The library's commands live in `iomm.commands`; packages add their own through the `iomm.commands` entry-point group
(each entry a `register(subparsers)`): the nano testbed adds `world`, `mllm`, `vae` and `recipe`, the lab `study`
and `bench`. So the command line imports neither, as the rest of the library does not.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from iomm.checkpointing.checkpoint import CheckpointError
from iomm.config import ConfigError
from iomm.data.images import BadSource
from iomm.quiet import quiet_libraries
from iomm.registry import BuiltinBelowTarget, entry_point_hooks

# Modules under iomm.commands each add their sub-commands with `register(subparsers)`.
COMMAND_MODULES = ("train", "data", "describe", "generate", "export", "demo", "eval")
ENTRY_POINT_GROUP = "iomm.commands"  # other packages' `register(subparsers)`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iomm", description="Image-only pre-training for UMM visual generation (IOMM).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"iomm.commands.{name}").register(subparsers)
    for register in entry_point_hooks(ENTRY_POINT_GROUP):
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    quiet_libraries(show_progress=not getattr(args, "no_progress", False) and sys.stderr.isatty())
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        _error(f"config error: {err}")
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError, BadSource,
            BuiltinBelowTarget) as err:
        _error(str(err))
        return 2
    except RuntimeError as err:
        from iomm.training.stopping import TrainingInterrupted, TrainingStopped

        if not isinstance(err, TrainingStopped):
            raise
        _error(str(err))  # stopped on purpose (signal, bad data, non-finite steps) on every rank, saved
        return 130 if isinstance(err, TrainingInterrupted) else 1
    finally:
        _leave_process_group()


def _error(message: str) -> None:
    """Errors are the same on every rank of a torchrun launch: rank 0 says them."""
    if os.environ.get("RANK", "0") == "0":
        print(f"iomm: {message}", file=sys.stderr)


def _leave_process_group() -> None:
    """Ranks leave together, so that the launcher never sees one rank gone while another still works."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
