"""How the model spreads over the ranks of a torchrun launch: DDP replicas, or FSDP2 shards.

`train.parallel: fsdp` applies `torch.distributed.fsdp.fully_shard` to every generator block (the outermost modules
of the classes the diffusers model names in `_no_split_modules`, the same list accelerate's FSDP wrap policy reads)
and then to the root, which holds the adapter, connector and the generator's remaining layers. The frozen MLLM and
codec are left out of the shards (`ignored_params`): they have no gradients and no optimizer state, so replicating
them costs their weights once per GPU (about 4 GiB for a 2B MLLM in bf16) and saves an all-gather of them every step.

`train.parallel: hsdp` shards the same way on a 2-D DeviceMesh (replicas x `train.shard_size`): each parameter is
sharded within a group of `shard_size` ranks (a node by default) and replicated across the groups, so the per-step
all-gathers and reduce-scatters stay inside a node and only an all-reduce of the gradient shards crosses nodes.
Its checkpoints are DTensors like fsdp's, so DCP resumes either at any world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from iomm.config import TrainConfig
from iomm.training.precision import resolve_precision
from iomm.typed_config import require

Forward = Callable[..., torch.Tensor]
SHARDED = ("fsdp", "hsdp")  # the engines that shard with FSDP2
MESH_DIMS = ("dp_replicate", "dp_shard")  # torchtitan's names for HSDP's two dimensions


def generator_blocks(generator: nn.Module) -> list[nn.Module]:
    """The generator's repeated blocks in module order: the outermost modules whose class is in
    `_no_split_modules`. A listed class may sit inside another (the U-Net's ResnetBlock2D and BasicTransformerBlock
    inside its CrossAttnUpBlock2D); the outer one is the block, so every parameter is in one block at most and is
    sharded, compiled and given to Muon once."""
    names = set(getattr(generator, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(generator).__name__} names no blocks (_no_split_modules) to shard with FSDP; "
                         "use train.parallel: ddp")
    return list(_outermost_blocks(generator, names))


def _outermost_blocks(module: nn.Module, names: set[str]) -> Iterator[nn.Module]:
    for child in module.children():
        # by class and its bases: fully_shard turns a block's class into a subclass named FSDP<class>
        if any(c.__name__ in names for c in type(child).__mro__):
            yield child
        else:
            yield from _outermost_blocks(child, names)


def frozen_parameters(model: nn.Module) -> set[nn.Parameter]:
    return {p for p in model.parameters() if not p.requires_grad}


def fsdp_policy(train: TrainConfig, device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters and compute with fp32 gradient reduction where bf16 is native; fp32 otherwise. The
    optimizer always steps the fp32 sharded master weights."""
    if resolve_precision(train.mixed_precision, device_type) == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_groups(train: TrainConfig, world: int, local_world: int) -> tuple[int, int]:
    """(replicas, ranks per shard group) of a launch of `world` ranks, `local_world` of them per node: fsdp
    shards over all ranks, hsdp over groups of `train.shard_size` (default: a node's ranks). One process shards
    nothing, so a sharded run's config (and checkpoint) also runs there. Raises the ConfigError naming
    train.shard_size before anything is built when it does not divide the world size."""
    if train.parallel != "hsdp" or world == 1:
        return 1, world
    size = train.shard_size or local_world
    default = "" if train.shard_size else f" (null: the {local_world} ranks of a node, LOCAL_WORLD_SIZE)"
    require(world % size == 0, "the launch", "train.shard_size", f"a divisor of the {world} ranks{default}", size)
    return world // size, size


def data_parallel_mesh(train: TrainConfig, world: int, local_world: int, device_type: str) -> DeviceMesh | None:
    """hsdp's 2-D mesh (replicate over dim 0, shard over dim 1); None for fully_shard's default 1-D mesh over
    every rank (fsdp, and hsdp with one shard group, which is the same thing)."""
    replicas, size = shard_groups(train, world, local_world)
    if replicas == 1:
        return None
    return init_device_mesh(device_type, (replicas, size), mesh_dim_names=MESH_DIMS)


def shard(model: nn.Module, generator: nn.Module, train: TrainConfig, device_type: str,
          mesh: DeviceMesh | None = None) -> None:
    """FSDP2 in place: each generator block, then the root (frozen parameters replicated, not sharded)."""
    policy = fsdp_policy(train, device_type)
    frozen = frozen_parameters(model)
    for block in generator_blocks(generator):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=frozen)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=frozen)


def distribute(model: nn.Module, generator: nn.Module, train: TrainConfig, world: int,
               device: torch.device, local_world: int | None = None) -> Forward:
    """The callable that runs a training forward: the model itself, its DDP wrapper, or the FSDP2-sharded model
    (hsdp: on the 2-D mesh of `local_world` ranks a node; default: one node). Parameters are collected after this
    call: fully_shard replaces them with DTensors."""
    if train.activation_checkpointing:
        generator.enable_gradient_checkpointing()  # diffusers: recompute each block in the backward pass
    if train.compile:  # per block, before sharding, as torchtitan does: the blocks are where the FLOPs are
        for block in generator_blocks(generator):
            block.compile()
    if world == 1:
        return model
    if train.parallel in SHARDED:
        mesh = data_parallel_mesh(train, world, local_world or world, device.type)
        shard(model, generator, train, device.type, mesh)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True)


def gradient_sync(forward: Forward, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on the micro-batches before the last of a step."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(forward, nn.parallel.DistributedDataParallel):
        return forward.no_sync()
    if isinstance(forward, FSDPModule):
        return _fsdp_no_sync(forward)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: FSDPModule):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The root's own parameters all-gathered (a no-op unless FSDP2 sharded the model) for calls into the model
    other than its forward, such as sampling: FSDP2 gathers a module's parameters in its forward's hook, which
    `model.velocity` and friends bypass on the root; each block still gathers its own in its forward. Collective:
    every rank must enter, and run the same blocks inside."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        # reshards every group and drops the blocks' forward order recorded inside, which no backward consumes
        # (the next backward would prefetch by it); only called between steps, so no gradient is pending
        model.reset_iter_state()


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's full value (e.g. a gradient norm reduced over shards)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
