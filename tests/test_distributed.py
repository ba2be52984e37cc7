"""Two ranks under torchrun (gloo on CPU): logged values are reduced over ranks, and a stop on one rank
(here: bad data) stops every rank cleanly, with one report and a saved checkpoint."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iomm.checkpointing.weights import step_seed
from iomm.training.distributed import Distributed
from iomm.training.trainer import Trainer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config, run_dir, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_port()), "-m", "iomm.cli", "pretrain", "--config", str(config), "--out", str(run_dir),
            "--no-progress"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _write_config(cfg, path):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_logged_loss_is_the_mean_over_both_ranks(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=1", "train.log_every=1")
    done = _torchrun(_write_config(cfg, tmp_path / "c.yaml"), tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    logged = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])["loss"]
    # each rank's first loss, computed here in one process: its own batch and noise, the same initial weights
    trainer = Trainer(cfg, tmp_path / "local", progress=False, dist=Distributed())
    trainer.model.train()
    losses = []
    for rank in (0, 1):
        trainer.batches.rank = rank
        batch = trainer.batches[0]
        with torch.no_grad():
            generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, 0, 0, rank))
            losses.append(float(trainer.model(batch.images, batch.captions, generator)))
    assert losses[0] != pytest.approx(losses[1])
    assert logged == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_bad_data_on_the_ranks_stops_every_rank_with_one_report(tiny_config, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"good{i}.png")
    for i in range(40):
        (folder / f"bad{i:02d}.jpg").write_bytes(b"garbage")
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.steps=50", "data.holdout=0")
    done = _torchrun(_write_config(cfg, tmp_path / "c.yaml"), tmp_path / "run")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    # no traceback from iomm's own code (its files live under src/iomm/; the checkout may be named iomm too)
    assert "Connection closed by peer" not in out and "src/iomm/" not in out.split("Traceback")[-1], out[-4000:]
    assert out.count("iomm: ") == 1, out[-4000:]  # one message, from rank 0
    message = next(line for line in out.splitlines() if line.startswith("iomm: "))
    assert "stopped instead of training on garbage" in message and ("rank 0:" in message or "rank 1:" in message)
    state = json.loads(next((tmp_path / "run/checkpoints").glob("step_*/state.json")).read_text())
    assert f"data: {state['data']['seen']} samples read" not in out or "rank 1:" not in message  # counts merged
    assert out.count("x unreadable image") == 1
    assert any((tmp_path / "run/checkpoints").glob("step_*/manifest.json"))
