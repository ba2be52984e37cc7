"""Why a run stops before its last step, and the signal handler that turns SIGTERM / Ctrl-C into a clean stop."""

from __future__ import annotations

import signal
from typing import Any


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (bad data, non-finite losses); a checkpoint was saved first."""


class TrainingInterrupted(TrainingStopped):
    """SIGTERM / Ctrl-C: a checkpoint was saved; callers (a recipe's next stage) must not go on."""


class StopSignal:
    """SIGTERM / Ctrl-C request a checkpoint and a clean exit instead of killing the step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
