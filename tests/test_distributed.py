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
        trainer.batches.rank, trainer.batches.world = rank, 2
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


# Reads STEPS micro-batches on each rank through the real sources and DataLoader workers; rank 0 writes what
# every rank saw (a fingerprint per image: its pixel sum, an exact integer) to argv[2].
_EPOCH_PROBE = """
import json, sys
from pathlib import Path
from iomm.config import load_config
from iomm.data.mixed_batches import MixedBatches, batch_loader, build_sources
from iomm.training.distributed import Distributed
dist = Distributed.from_env()
cfg = load_config(sys.argv[1])
out = Path(sys.argv[2])
sources = build_sources(cfg, run_dir=out.parent / "run", main=dist.main, barrier=dist.barrier)
batches = MixedBatches(sources.images, None, cfg.train.batch_size, 1.0, cfg.train.seed, dist.rank, dist.world)
loader = batch_loader(batches, 0, int(sys.argv[3]), num_workers=cfg.data.num_workers)
seen = [[int((image * 255).round().sum()) for image in batch.images] for batch in loader]
every = dist.gather(seen)
if dist.main:
    out.write_text(json.dumps(every))
import torch.distributed
torch.distributed.destroy_process_group()
"""


def test_two_ranks_with_two_workers_each_read_every_shard_sample_once_per_epoch(tiny_config, tmp_path):
    from iomm.data.images import DataReport, load_image
    from iomm.data.shards import write_shards

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    files = sorted(folder.glob("*.png"))
    write_shards([(f, None) for f in files], tmp_path / "shards", 32, 5, "png", DataReport(), progress=False)
    # 2 held out, 10 train: a global micro-batch of 2 x 5 samples is one epoch; each rank's 5 come from one worker
    cfg = tiny_config("data.source=webdataset", f"data.path={tmp_path / 'shards'}", "data.holdout=2",
                      "train.batch_size=5", "data.num_workers=2")
    probe = tmp_path / "probe.py"
    probe.write_text(_EPOCH_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    steps = 4
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_port()), str(probe),
                           str(_write_config(cfg, tmp_path / "c.yaml")), str(tmp_path / "seen.json"), str(steps)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())  # [rank][micro-batch][image]
    everything = {int((load_image(f, 32) * 255).round().sum()) for f in files}
    held_out = {int((load_image(files[i], 32) * 255).round().sum()) for i in (0, 11)}  # spread: first and last
    assert len(everything) == 12  # the fingerprints tell the images apart
    epochs = [sorted(seen[0][e] + seen[1][e]) for e in range(steps)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 10 and set(epoch) == everything - held_out
    assert seen[0][0] != seen[0][1]  # each epoch in a new order
