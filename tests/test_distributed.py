"""Two ranks under torchrun (gloo on CPU), DDP and FSDP2: they train as one process does at the same global batch,
a sharded checkpoint resumes exactly at the same or another world size, and a stop on one rank (bad data, a
signal) stops every rank cleanly, with one report and a saved checkpoint, never a hang."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from iomm.checkpointing import checkpoint as ckpt
from iomm.cli import main
from iomm.config_checks import load_config
from iomm.evaluation.sample_grid import sample_grid
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.training.distributed import Distributed
from iomm.training.trainer import Trainer
from tests.test_parallel import TINY_GENERATORS


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun_argv(config, run_dir, program=("-m", "iomm.cli")):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_port()), *program, "pretrain", "--config", str(config), "--out", str(run_dir),
            "--no-progress"]


GLOO_ABORT = "terminate called without an active exception"  # std::terminate's message, no Python traceback


def _torchrun(config, run_dir, timeout=240, program=("-m", "iomm.cli")):
    """One launch. When a rank of `iomm` died of gloo's native abort (SIGABRT, no Python traceback;
    pytorch/pytorch#179291; seen once, in a full suite beside two training jobs on a 2-core machine), the same
    command is rerun once, as a user would rerun it: it resumes from the run's checkpoint, and a step logged
    twice keeps its last entry. Any other failure, and any failure of another program, is returned as it is."""
    def launch():
        # its own session: a rank that kills its process group (the SIGKILL test) takes the launcher with it
        return subprocess.run(_torchrun_argv(config, run_dir, program), env=ENV, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)

    done = launch()
    if program == ("-m", "iomm.cli") and done.returncode != 0 and GLOO_ABORT in done.stderr:
        print(f"torchrun: a rank aborted in gloo ({GLOO_ABORT!r}); rerunning the same command on {run_dir}")
        done = launch()
    return done


def _write_config(cfg, path):
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _logged(run_dir, key):
    """A logged value by step, in step order (after a resume a step's last entry wins)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row[key] for row in rows if key in row}
    return {step: by_step[step] for step in sorted(by_step)}


def _losses(run_dir):
    return list(_logged(run_dir, "loss").values())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp,muon"])
def test_two_ranks_train_as_one_process_does_at_the_same_global_batch(tiny_config, tmp_path, parallel):
    """Every sample's data, mask, dropout, timestep and noise come from its global index in the batch, and the
    gradients are averaged over ranks: 2 ranks x 2 samples follow the 1-process run of 4 samples step by step."""
    engine, _, optimizer = parallel.partition(",")
    cfg = tiny_config("train.steps=5", "train.batch_size=4", "train.checkpoint_every=100", f"train.parallel={engine}",
                      f"train.optimizer={optimizer or 'adamw'}")
    done = _torchrun(_write_config(cfg, tmp_path / "c.yaml"), tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    Trainer(cfg, tmp_path / "one", progress=False, dist=Distributed()).fit()
    two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two_losses) == 5 and len(set(one_losses)) == 5
    assert two_losses == pytest.approx(one_losses, abs=1e-5)


# `pretrain --config DIR --out OUT`: every DIR/<name>.yaml trained into OUT/<name> as `iomm pretrain` trains it, in
# one launch and one process group (a launch costs more than a tiny run; `iomm` leaves the group when it ends).
_EVERY_CONFIG = """
import sys
from pathlib import Path
import torch.distributed
from iomm.config_checks import load_config
from iomm.evaluation.sample_grid import sample_grid
from iomm.training.trainer import train
args = sys.argv[2:]
configs, out = Path(args[args.index("--config") + 1]), Path(args[args.index("--out") + 1])
for config in sorted(configs.glob("*.yaml")):
    train(load_config(config), out / config.stem, progress=False, sample_fn=sample_grid)
torch.distributed.destroy_process_group()
"""


def test_fsdp_trains_and_samples_every_generator_kind_as_one_process_does(tiny_config, tiny_mllm_dir, tmp_path):
    """Every kind shards (each of the U-Net's nested blocks once) and trains as 1 process does, and its sample grid
    runs under FSDP after every step (every rank gathers, rank 0 writes the grid and its metrics) without changing
    the next step. The U-Net is configs/smoke.yaml's; sd3 samples the stage-2 prompt row too."""
    run = ("train.steps=2", "train.sample_every=1", "train.log_every=1", "train.parallel=fsdp",
           "train.mixed_precision=fp32", "flow.sample_steps=2")
    smoke = Path(__file__).resolve().parents[1] / "configs/smoke.yaml"
    configs = {"sd3": tiny_config(*TINY_GENERATORS["sd3"], *run, "train.mix_ratio=0.5", "data.pairs=world:16"),
               "unet": load_config(smoke, [f"mllm.path={tiny_mllm_dir}", *run]),
               "zimage": tiny_config(*TINY_GENERATORS["zimage"], *run),
               "qwen_image": tiny_config(*TINY_GENERATORS["qwen_image"], *run)}
    assert {cfg.generator.kind for cfg in configs.values()} == set(TINY_GENERATORS)
    (tmp_path / "configs").mkdir()
    for kind, cfg in configs.items():
        _write_config(cfg, tmp_path / "configs" / f"{kind}.yaml")
    script = tmp_path / "every_config.py"
    script.write_text(_EVERY_CONFIG)
    done = _torchrun(tmp_path / "configs", tmp_path / "two", timeout=400, program=(str(script),))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "sample grid" not in out, out[-3000:]  # no grid failed (the trainer warns and trains on)
    for kind, cfg in configs.items():
        Trainer(cfg, tmp_path / "one" / kind, progress=False, dist=Distributed(), sample_fn=sample_grid).fit()
        two_losses = _losses(tmp_path / "two" / kind)
        assert len(two_losses) == 2 and two_losses == pytest.approx(_losses(tmp_path / "one" / kind), abs=1e-5), kind
        assert sorted(p.name for p in (tmp_path / "two" / kind / "samples").iterdir()) == [
            "step_00000001.png", "step_00000002.png"], kind
        two_grids, one_grids = (_logged(tmp_path / run / kind, "recon_mse_own") for run in ("two", "one"))
        assert list(two_grids) == [1, 2] and two_grids == pytest.approx(one_grids, abs=1e-5), kind


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bad_data_on_the_ranks_stops_every_rank_with_one_report(tiny_config, tmp_path, parallel):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"good{i}.png")
    for i in range(40):
        (folder / f"bad{i:02d}.jpg").write_bytes(b"garbage")
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.steps=50", "data.holdout=0",
                      f"train.parallel={parallel}")
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
from iomm.config_checks import load_config
from iomm.data.mixed_batches import MixedBatches, batch_loader, build_sources
from iomm.checkpointing import checkpoint as ckpt
from iomm.cli import main
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.training.distributed import Distributed
dist = Distributed.from_env()
cfg = load_config(sys.argv[1])
out = Path(sys.argv[2])
sources = build_sources(cfg, run_dir=out.parent / "run", main=dist.main, barrier=dist.barrier)
batches = MixedBatches(sources.images, None, cfg.train.batch_size // dist.world, 1.0, cfg.train.seed, dist.rank,
                       dist.world)
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
                      "train.batch_size=10", "data.num_workers=2")
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


# `iomm pretrain` as torchrun runs it, except that rank 0 SIGKILLs itself the moment the checkpoint of step 4 is on
# disk (torchrun then ends the other rank: a lost node).
_KILLED_AT_STEP_4 = """
import os, signal, sys
from iomm.training.trainer import Trainer
save = Trainer.save
def save_then_die(self):
    saved = save(self)
    if self.step == 4 and self.dist.main:
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
Trainer.save = save_then_die
from iomm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sharded_checkpoint_resumes_exactly_after_sigkill_and_in_one_process(tiny_config, tmp_path, capsys):
    cfg = tiny_config("train.steps=8", "train.checkpoint_every=2", "train.parallel=fsdp", "train.mix_ratio=0.5",
                      "data.pairs=world:16")
    config = _write_config(cfg, tmp_path / "c.yaml")
    Trainer(cfg, tmp_path / "straight", progress=False, dist=Distributed()).fit()
    straight = _losses(tmp_path / "straight")

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_AT_STEP_4)
    killed = _torchrun(config, tmp_path / "run", program=(str(script),))
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received" in killed.stderr, killed.stderr[-3000:]
    step4 = tmp_path / "run/checkpoints/step_00000004"
    assert ckpt.latest_checkpoint(tmp_path / "run") == step4
    assert sorted(p.name for p in (step4 / "weights").iterdir()) == [  # each rank wrote its own shards
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    shutil.copytree(tmp_path / "run", tmp_path / "moved")

    resumed = _torchrun(config, tmp_path / "run")  # the same command: 2 ranks, from the sharded checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {step4} at step 4" in resumed.stdout + resumed.stderr
    assert _losses(tmp_path / "run") == pytest.approx(straight, abs=1e-5)

    Trainer(cfg, tmp_path / "moved", progress=False, dist=Distributed()).fit()  # the 2-rank checkpoint, 1 process
    assert f"resumed from {tmp_path / 'moved/checkpoints/step_00000004'} at step 4" in capsys.readouterr().out
    assert _losses(tmp_path / "moved") == pytest.approx(straight, abs=1e-5)

    # consolidated offline: the EMA weights of the sharded checkpoint, loadable by iomm and by diffusers itself
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    exported = IOMMPipeline.from_pretrained(tmp_path / "export").model
    ema = load_model(tmp_path / "run")
    for name, module in ema.trainable().items():
        for key, value in module.state_dict().items():
            assert torch.equal(exported.trainable()[name].state_dict()[key], value), f"{name}.{key}"
    generator = type(ema.generator).from_pretrained(tmp_path / "export/generator")
    assert all(torch.equal(v, ema.generator.state_dict()[k]) for k, v in generator.state_dict().items())
    assert json.loads((tmp_path / "export/export.json").read_text())["weights"] == "ema"


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigterm_on_one_rank_saves_and_ends_both(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=100000", "train.checkpoint_every=100000", "train.parallel=fsdp")
    launcher = subprocess.Popen(_torchrun_argv(_write_config(cfg, tmp_path / "c.yaml"), tmp_path / "run"), env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        metrics = tmp_path / "run/metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)  # a deadlock fails here instead of hanging CI
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    message = next(line for line in out.splitlines() if line.startswith("iomm: "))
    assert out.count("iomm: ") == 1 and "rank 1: signal SIGTERM: checkpoint saved at step" in message, out[-3000:]
    step = int(message.split("checkpoint saved at step ")[1].split()[0])
    saved = tmp_path / f"run/checkpoints/step_{step:08d}"
    assert (saved / "manifest.json").is_file() and len(list((saved / "weights").iterdir())) == 2
    # torchrun reports the interrupted ranks (exit 130); nothing in iomm's own code raised, no rank lost its peer
    assert "Connection closed by peer" not in out and "src/iomm/" not in out.split("Traceback")[-1], out[-4000:]
