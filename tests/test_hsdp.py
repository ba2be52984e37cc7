"""Hybrid sharding (`train.parallel: hsdp`) under torchrun on CPU (gloo): 4 ranks as 2 replicas x 2 shards train as
one process does at the same global batch, and a SIGKILLed run resumes exactly from its checkpoint across
hsdp -> fsdp -> hsdp and 4 -> 2 -> 4 ranks (DCP reshards the 2-D mesh's DTensors both ways)."""

import subprocess
import sys
from pathlib import Path

import pytest

from iomm.checkpointing import checkpoint as ckpt
from iomm.training.distributed import Distributed
from iomm.training.parallel import shard_groups
from iomm.training.trainer import Trainer
from iomm.typed_config import ConfigError
from tests.test_distributed import ENV, GLOO_ABORT, _losses, _port, _write_config

PORT_TAKEN = "EADDRINUSE"  # the free port _port() found was taken before torchrun bound it (suites side by side)


def _torchrun(config: Path, run_dir: Path, ranks: int = 2, program: tuple[str, ...] = ("-m", "iomm.cli"),
              timeout: int = 480) -> subprocess.CompletedProcess:
    """One `pretrain` launch of `ranks` processes, rerun once after gloo's native abort as test_distributed's is,
    or on another port when its port was taken (nothing has run then)."""
    def launch() -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                "127.0.0.1", "--master_port", str(_port()), *program, "pretrain", "--config", str(config), "--out",
                str(run_dir), "--no-progress"]
        return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout, start_new_session=True)

    done = launch()
    if done.returncode != 0 and (PORT_TAKEN in done.stderr
                                 or program == ("-m", "iomm.cli") and GLOO_ABORT in done.stderr):
        done = launch()
    return done


# `iomm pretrain` as torchrun runs it, except that rank 0 prints the mesh of the trainable parameters and
# SIGKILLs itself the moment the checkpoint of step KILL_AT is on disk (torchrun then ends the other ranks).
_KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from iomm.training.trainer import Trainer
save = Trainer.save
def save_then_die(self):
    saved = save(self)
    if self.step == KILL_AT and self.dist.main:
        weight = next(iter(self.params.values()))
        print(f"mesh {tuple(weight.device_mesh.shape)} {weight.device_mesh.mesh_dim_names} {weight.placements}",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
Trainer.save = save_then_die
from iomm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_at(step: int, path: Path) -> Path:
    path.write_text(_KILLED_AFTER_CHECKPOINT.replace("KILL_AT", str(step)))
    return path


def test_shard_size_defaults_to_a_node_and_must_divide_the_world(tiny_config):
    hsdp = tiny_config("train.parallel=hsdp").train
    assert shard_groups(hsdp, 16, 8) == (2, 8)  # 2 nodes of 8: replicate across them, shard within each
    assert shard_groups(tiny_config("train.parallel=hsdp", "train.shard_size=4").train, 16, 8) == (4, 4)
    assert shard_groups(tiny_config("train.parallel=fsdp").train, 16, 8) == (1, 16)
    assert shard_groups(hsdp, 1, 1) == (1, 1)  # one process shards nothing: a sharded run's config runs there
    with pytest.raises(ConfigError, match=r"train.shard_size.*a divisor of the 4 ranks, got 3"):
        shard_groups(tiny_config("train.parallel=hsdp", "train.shard_size=3").train, 4, 4)
    with pytest.raises(ConfigError, match=r"train.shard_size.*null or >= 1, got 0"):
        tiny_config("train.parallel=hsdp", "train.shard_size=0")


def test_hsdp_2x2_trains_as_one_process_and_resumes_exactly_across_hsdp_and_fsdp(tiny_config, tmp_path):
    """4 ranks as 2 x 2 follow the 1-process losses of 4 samples a step. SIGKILLed after the checkpoint of step 2,
    the run resumes on 2 fsdp ranks, each holding half a weight; SIGKILLed again after step 3, it resumes as 2 x 2
    from that fsdp checkpoint. Every step keeps the straight run's loss. Each rank samples a grid at step 2 (gathered
    on the 2-D mesh) without changing the losses."""
    run = ("train.steps=4", "train.batch_size=4", "train.checkpoint_every=1", "train.sample_every=2",
           "train.shard_size=2", "train.mix_ratio=0.5", "data.pairs=world:16", "data.holdout_pairs=0")
    cfg = tiny_config(*run, "train.parallel=hsdp")
    hsdp = _write_config(cfg, tmp_path / "hsdp.yaml")
    # shard_size stays (fsdp ignores it): resume.py refuses a change of it, as of any field it does not list
    fsdp = _write_config(tiny_config(*run, "train.parallel=fsdp"), tmp_path / "fsdp.yaml")
    Trainer(cfg, tmp_path / "straight", progress=False, dist=Distributed()).fit()
    straight = _losses(tmp_path / "straight")
    assert len(set(straight)) == 4

    killed = _torchrun(hsdp, tmp_path / "run", program=(str(_killed_at(2, tmp_path / "kill2.py")),), ranks=4)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL) received" in killed.stderr, killed.stderr[-3000:]
    assert "mesh (2, 2) ('dp_replicate', 'dp_shard') (Replicate(), Shard(dim=0))" in killed.stdout, killed.stdout
    assert (tmp_path / "run/samples/step_00000002.png").is_file()
    assert ckpt.latest_checkpoint(tmp_path / "run") == tmp_path / "run/checkpoints/step_00000002"
    assert _losses(tmp_path / "run") == pytest.approx(straight[:2], abs=1e-5)

    as_fsdp = _torchrun(fsdp, tmp_path / "run", program=(str(_killed_at(3, tmp_path / "kill3.py")),))
    out = as_fsdp.stdout + as_fsdp.stderr
    assert "Signal 9 (SIGKILL) received" in as_fsdp.stderr, as_fsdp.stderr[-3000:]
    assert "mesh (2,) None (Shard(dim=0),)" in as_fsdp.stdout, as_fsdp.stdout
    assert "resumed from" in out and "train.parallel: 'hsdp' -> 'fsdp'" in out, out[-3000:]
    step3 = tmp_path / "run/checkpoints/step_00000003"
    assert ckpt.latest_checkpoint(tmp_path / "run") == step3
    assert _losses(tmp_path / "run") == pytest.approx(straight[:3], abs=1e-5)

    as_hsdp = _torchrun(hsdp, tmp_path / "run", ranks=4)  # the first command again, from the fsdp checkpoint
    out = as_hsdp.stdout + as_hsdp.stderr
    assert as_hsdp.returncode == 0, as_hsdp.stderr[-3000:]
    assert f"resumed from {step3} at step 3" in out and "train.parallel: 'fsdp' -> 'hsdp'" in out, out[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(straight, abs=1e-5)


def test_describe_gives_hsdp_the_memory_of_its_shard_group(capsys):
    import json as json_module

    from iomm.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs/iomm-b.yaml")
    plans = {}
    for flags in (["--parallel", "fsdp"], ["--parallel", "hsdp", "--shard-size", "4"], ["--parallel", "ddp"]):
        assert main(["describe", "--config", config, "--gpus", "16", *flags, "--json"]) == 0
        plans[flags[1]] = json_module.loads(capsys.readouterr().out)["memory_gib"]
    assert plans["fsdp"]["optimizer"] < plans["hsdp"]["optimizer"] < plans["ddp"]["optimizer"]
    assert plans["hsdp"]["optimizer"] == pytest.approx(plans["ddp"]["optimizer"] / 4)
    with pytest.raises(SystemExit, match="--shard-size: expected a divisor of --gpus"):
        main(["describe", "--config", config, "--gpus", "16", "--parallel", "hsdp", "--shard-size", "3"])
