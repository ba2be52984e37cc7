"""The process group of a torchrun launch, and the few collectives the trainer needs.

Every stop is collective: a rank that must stop (bad data, non-finite steps, a signal) says so before the
next step, every rank learns every reason, rank 0 saves, and all ranks leave together. Logged values are
reduced over ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # the ranks on this node (torchrun's LOCAL_WORLD_SIZE): hsdp's default shard size

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if world > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)  # collectives on objects use the current device
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world, local_rank, local_world)

    def stop_requested(self, reason: str | None) -> list[tuple[int, str]] | None:
        """Called by every rank before each step: None when no rank must stop, else (rank, reason) of each
        rank that must."""
        if self.world == 1:
            return None if reason is None else [(self.rank, reason)]
        if self.sum([float(reason is not None)])[0] == 0:
            return None
        return [(rank, why) for rank, why in enumerate(self.gather(reason)) if why is not None]

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order (a list of one without a process group)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
