"""Run logs: metrics.jsonl, TensorBoard scalars, sample grids and a loss curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path


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


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
