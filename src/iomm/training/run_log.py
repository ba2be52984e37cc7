"""Run logs: metrics.jsonl, TensorBoard scalars and sample grids, plain progress lines, a loss curve PNG."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class Progress:
    """Step / loss / speed / ETA lines, at most every `every` seconds."""

    def __init__(self, enabled: bool, tag: str, every: float = 10.0) -> None:
        self.enabled, self.tag, self.every = enabled, tag, every
        self.start = self.last = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, step: int, loss: float, progress: float, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and not force):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed * (1 - progress) / max(progress, 1e-9)
        print(f"[{self.tag}] step {step} loss {loss:.4f} {step / max(elapsed, 1e-9):.2f} it/s "
              f"elapsed {elapsed:.0f}s ETA {eta:.0f}s", flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def step_line(step: int, steps: int, loss: float, lr: float, done: int, elapsed: float,
              heldout_loss: float | None = None, throughput: Mapping[str, float] | None = None) -> str:
    """One plain log line: `step 20/1100  loss 0.1234  lr 2.0e-03  3.10 it/s  elapsed 0m06s  ETA 5m42s`,
    where speed and ETA come from the `done` steps of this process in `elapsed` seconds; with a held-out loss,
    `heldout 0.1301` follows the loss; with a `ThroughputMeter`'s reading, `52.1 img/s  MFU 38.2%` the speed."""
    rate = done / max(elapsed, 1e-9)
    eta = (steps - step) / max(rate, 1e-9)
    heldout = f"  heldout {heldout_loss:.4f}" if heldout_loss is not None else ""
    images = f"  {throughput['images_per_s']:.1f} img/s  MFU {throughput['mfu']:.1%}" if throughput else ""
    return (f"step {step}/{steps}  loss {loss:.4f}{heldout}  lr {lr:.1e}  {rate:.2f} it/s{images}  "
            f"elapsed {_duration(elapsed)}  ETA {_duration(eta)}")


class RunLog:
    """metrics.jsonl and TensorBoard of a run (main rank only). `start(step)` opens them for a run that
    (re)starts after `step`: what an interrupted run logged after its last checkpoint is dropped, so that
    no step appears twice."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(metrics_file: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per logged line, in the order they were logged."""
    return [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(rows: list[dict[str, Any]], out: Path) -> None:
    """The loss of the `read_metrics` rows that hold one; nothing when none does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
