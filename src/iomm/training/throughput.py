"""Live throughput of a training run, averaged over the steps since the last log step: images/s, condition
tokens/s, the step's time split by phase, achieved FLOP/s and MFU, and peak memory.

The split is the trainer's `PhaseTimer` (iomm.profiling), the phases `iomm bench train-step` reports,
switched on around the data wait and the train step only (the held-out loss and sample grids between steps
stay out of it) and only on the main rank, the one that logs; the timer already synchronises CUDA at each
phase boundary. FLOPs and condition tokens are counted once, on the run's first micro-batches, by the timer's
FLOP counter as `iomm bench train-step` counts them; MFU divides by bench's measured matmul peak (the faster of
fp32 and native bf16), which bench measures on a CPU too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from iomm.data.mixed_batches import Batch
from iomm.model import IOMM
from iomm.profiling import PhaseTimer
from iomm.training.distributed import Distributed
from iomm.training.hardware import fastest_matmul_peak, peak_memory_mib

DATA_WAIT = "data_wait"
STEP = "step"


class Trainer(Protocol):
    """What the meter reads of `iomm.training.trainer.Trainer` (which imports the meter)."""

    timer: PhaseTimer
    dist: Distributed
    device: torch.device
    model: IOMM
    params: dict[str, nn.Parameter]

    def forward_backward(self, micro_batches: list[Batch]) -> float: ...


class ThroughputMeter:
    """Wrap each step's data wait in `data_wait()` and its `train_step` in `step(micro_batches)`; `read()` at a
    log step gives the metrics of the steps since the previous `read()`."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.timer = trainer, trainer.timer
        self.enabled, self.world = trainer.dist.main, trainer.dist.world
        self.flops_per_sample: float | None = None  # this rank's FLOPs of a step over its samples
        self.condition_tokens_per_sample = 0.0
        self.peak_flops = measured_peak(trainer.device, torch.get_num_threads()) if self.enabled else 0.0
        self.steps = self.samples = 0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        with self._timed(DATA_WAIT):
            yield

    @contextlib.contextmanager
    def step(self, micro_batches: list[Batch]) -> Iterator[None]:
        samples = sum(len(batch.captions) for batch in micro_batches)
        if self.flops_per_sample is None:  # every rank: the counted pass runs the collectives of a step
            flops, tokens = count_step(self.trainer, micro_batches)
            self.flops_per_sample, self.condition_tokens_per_sample = flops[STEP] / samples, tokens / samples
        with self._timed(STEP):
            yield
        self.steps += 1
        self.samples += samples

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.timer.enabled = True
        try:
            with self.timer(phase):
                yield
        finally:
            self.timer.enabled = False

    def read(self) -> dict[str, float]:
        """images/s (global and per device), condition tokens/s, seconds per step and per phase, achieved TFLOP/s
        and MFU per device, peak memory in GiB; empty on the ranks that do not log."""
        if not self.enabled or not self.steps:
            return {}
        totals = self.timer.totals
        step_s = (totals[DATA_WAIT] + totals[STEP]) / self.steps
        per_device = self.samples / self.steps / step_s
        achieved = (self.flops_per_sample or 0.0) * per_device
        metrics = {"images_per_s": per_device * self.world, "images_per_s_per_device": per_device,
                   "condition_tokens_per_s": self.condition_tokens_per_sample * per_device * self.world,
                   "step_s": step_s}
        metrics |= {f"{phase}_s": seconds / self.steps for phase, seconds in totals.items() if phase != STEP}
        metrics |= {"tflop_per_s_per_device": achieved / 1e12, "mfu": achieved / self.peak_flops,
                    "peak_memory_gib": peak_memory_gib()}
        self.timer.reset()
        self.steps = self.samples = 0
        return metrics


def count_step(trainer: Trainer, micro_batches: list[Batch]) -> tuple[dict[str, int], int]:
    """The FLOPs (of the whole step and of each phase) and the frozen LLM's input tokens of the forward and
    backward of `micro_batches`, run once more and thrown away. Training goes on bit for bit as without it: the
    random state, the gradients and the timer's times are left as they were, and no update follows (a real step
    under the counter would round differently: the counter runs some operators decomposed)."""
    timer = trainer.timer
    times = dict(timer.totals)
    tokens: list[int] = []
    hook = trainer.model.mllm.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(llm_input_tokens(kwargs)), with_kwargs=True)
    try:
        with (torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []),
              timer.counting_flops(), timer(STEP)):
            trainer.forward_backward(micro_batches)
    finally:
        hook.remove()
        for parameter in trainer.params.values():
            parameter.grad = None
    flops = dict(timer.flop_totals)
    timer.reset()
    timer.totals.update(times)
    return flops, sum(tokens)


def llm_input_tokens(kwargs: dict) -> int:
    """The valid tokens a call of the frozen LLM reads: the condition and the adapter's queries (after a cached
    prefix the mask covers the prefix too, so only its last columns, those of the call's own inputs, count)."""
    length = kwargs["inputs_embeds"].shape[1]
    return int(kwargs["attention_mask"][:, -length:].sum()) if length else 0


@functools.cache
def measured_peak(device: torch.device, threads: int) -> float:
    """`iomm bench train-step`'s matmul peak of this device at `threads`, measured once per process, leaving the
    random state and (on a GPU) the memory statistics as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peak = fastest_matmul_peak(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def peak_memory_gib() -> float:
    return peak_memory_mib() / 1024


def plot_throughput(rows: list[dict[str, Any]], out: Path) -> None:
    """The log steps among a run's `read_metrics` rows in four panels: images/s, the step's time split by phase
    (stacked), MFU and peak memory; nothing when no row holds them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "images_per_s" in row]
    if not rows:
        return
    steps = [row["step"] for row in rows]
    phases = [name for name in rows[-1]  # seconds a step per phase: not the rates, the step, the run's time
              if name.endswith("_s") and not name.endswith("_per_s") and name not in ("step_s", "elapsed_s")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    axes[0].plot(steps, [row["images_per_s"] for row in rows], lw=1)
    axes[0].set_ylabel("images/s (all devices)")
    axes[1].stackplot(steps, *([row.get(name, 0.0) for row in rows] for name in phases),
                      labels=[name.removesuffix("_s").replace("_", " ") for name in phases])
    top = max(sum(row.get(name, 0.0) for name in phases) for row in rows)
    axes[1].set_ylabel("seconds a step"), axes[1].set_ylim(0, 1.6 * top)  # headroom for the legend
    axes[1].legend(fontsize=6, loc="upper left", ncol=2)
    axes[2].plot(steps, [100 * row["mfu"] for row in rows], lw=1)
    axes[2].set_ylabel("MFU (%)"), axes[2].set_ylim(bottom=0)
    axes[3].plot(steps, [row["peak_memory_gib"] for row in rows], lw=1)
    axes[3].set_ylabel("peak memory (GiB)"), axes[3].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("step"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
