"""Wall time (and, with a FLOP counter, FLOPs) of the phases of the real training step, for `iomm bench
train-step` and a run's live throughput (`iomm.training.throughput`).

The model marks its phases with `phase(name)` and `mark_gradient(...)`, as code marks `torch.profiler`'s
`record_function`: they are no-ops unless a `PhaseTimer` is enabled, which then records them. The model holds no
timer; the trainer owns one, and a benchmark or the throughput meter enables it, so both time
`Trainer.train_step` itself rather than a copy of it. Backward is split
where the gradient reaches the condition tokens: before that the generator's backward runs, after it the
conditioning path's (connector, the frozen LLM's query positions, adapter). FLOPs are read from a running
`FlopCounterMode` at the same boundaries (its own per-module split misattributes backward FLOPs).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

GENERATOR_BACKWARD = "generator_backward"
CONDITIONING_BACKWARD = "conditioning_backward"


_recording: PhaseTimer | None = None  # the enabled timer, if any: the one the model's markers report to


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Time the enclosed code as phase `name` of the enabled timer (nothing when none is)."""
    return _recording(name) if _recording is not None else contextlib.nullcontext()


def mark_gradient(*tensors: torch.Tensor) -> None:
    """The enabled timer's split of backward: the generator's backward ends when the gradient reaches `tensors`."""
    if _recording is not None:
        _recording.mark_gradient(*tensors)


class PhaseTimer:
    def __init__(self) -> None:
        self._enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self.flop_totals: dict[str, int] = defaultdict(int)
        self.flop_counter: FlopCounterMode | None = None  # set inside `counting_flops`
        self._gradient_arrival: tuple[float, int] | None = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Enabled, this timer records the model's phase markers (one timer at a time)."""
        global _recording
        self._enabled = value
        if value:
            _recording = self
        elif _recording is self:
            _recording = None

    def reset(self) -> None:
        self.totals.clear()
        self.flop_totals.clear()

    @contextlib.contextmanager
    def counting_flops(self) -> Iterator[None]:
        """On, and counting FLOPs into `flop_totals` at every phase boundary, while inside."""
        was_enabled = self.enabled
        self.enabled, self.flop_counter = True, FlopCounterMode(display=False)
        try:
            with self.flop_counter:
                yield
        finally:
            self.enabled, self.flop_counter = was_enabled, None

    def _flops(self) -> int:
        return self.flop_counter.get_total_flops() if self.flop_counter is not None else 0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU kernels run asynchronously: time them, not their launch
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start, flops = self._now(), self._flops()
        yield
        self.totals[name] += self._now() - start
        self.flop_totals[name] += self._flops() - flops

    def mark_gradient(self, *tensors: torch.Tensor) -> None:
        """Note when backward reaches `tensors` (the condition): the generator's backward ends there."""
        if not self.enabled:
            return
        for tensor in tensors:
            if tensor.requires_grad:
                tensor.register_hook(self._arrived)

    def _arrived(self, grad: torch.Tensor) -> None:
        self._gradient_arrival = self._now(), self._flops()

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, timed in two parts when enabled."""
        if not self.enabled:
            loss.backward()
            return
        self._gradient_arrival = None
        start, start_flops = self._now(), self._flops()
        loss.backward()
        end, end_flops = self._now(), self._flops()
        split, split_flops = self._gradient_arrival if self._gradient_arrival is not None else (end, end_flops)
        self.totals[GENERATOR_BACKWARD] += split - start
        self.totals[CONDITIONING_BACKWARD] += end - split
        self.flop_totals[GENERATOR_BACKWARD] += split_flops - start_flops
        self.flop_totals[CONDITIONING_BACKWARD] += end_flops - split_flops
