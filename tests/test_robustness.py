"""A killed run resumes exactly; saves are atomic; signals save; non-finite steps are skipped."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from iomm.config import save_config
from iomm.training import checkpoint as ckpt
from iomm.training.trainer import Trainer, TrainingStopped


def _losses(run_dir):
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]  # after a resume the last entry of a step wins
    return losses


def _cli(config_path, run_dir):
    return [sys.executable, "-m", "iomm.cli", "pretrain", "--config", str(config_path), "--out", str(run_dir),
            "--no-progress"]


def test_sigkill_then_same_command_continues_exactly(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=10", "train.checkpoint_every=2", "data.pairs=world:16", "train.mix_ratio=0.5")
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(config_path, tmp_path / "straight"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(config_path, tmp_path / "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed/checkpoints/step_00000004/manifest.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = ckpt.latest_checkpoint(tmp_path / "killed")
    assert newest is not None and newest.name < "step_00000010", "the run was not interrupted"
    resumed = subprocess.run(_cli(config_path, tmp_path / "killed"), check=True, env=env, capture_output=True, text=True)
    assert f"resumed from {newest}" in resumed.stdout
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_sigterm_saves_a_checkpoint_before_exit(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=50", "train.checkpoint_every=100"), tmp_path / "run", progress=False)
    original = trainer.train_step

    def step_then_signal(batches):
        outcome = original(batches)
        if trainer.step == 2:  # the step counter is incremented after train_step: this is step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    trainer.train_step = step_then_signal
    trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    def ok(tmp):
        (tmp / "a.bin").write_bytes(b"1234")

    def full(tmp):
        (tmp / "a.bin").write_bytes(b"12")
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt.save_checkpoint(tmp_path, 1, ok, keep_last=3)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        ckpt.save_checkpoint(tmp_path, 2, full, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_keep_last_and_keep_every(tmp_path):
    for step in range(1, 9):
        ckpt.save_checkpoint(tmp_path, step, lambda tmp: (tmp / "x").write_text("x"), keep_last=2, keep_every=4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step_00000004", "step_00000007", "step_00000008"]


def test_missing_manifest_means_incomplete(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, lambda tmp: (tmp / "x").write_text("x"), keep_last=3)
    ckpt.save_checkpoint(tmp_path, 2, lambda tmp: (tmp / "x").write_text("x"), keep_last=3)
    (tmp_path / "checkpoints/step_00000002/manifest.json").unlink()
    logged = []
    assert ckpt.latest_checkpoint(tmp_path, log=logged.append).name == "step_00000001"
    assert "incomplete" in logged[0]
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere")


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=20", "train.max_nonfinite_in_row=3"), tmp_path / "run", progress=False)
    original = trainer.model.loss
    calls = {"n": 0}

    def sometimes_nan(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 5 else loss

    trainer.model.loss = sometimes_nan
    before = {k: v.clone() for k, v in trainer.params.items()}
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row"):
        trainer.fit()
    assert trainer.nonfinite_total == 4
    assert all(torch.isfinite(p).all() for p in trainer.params.values())
    assert any(not torch.equal(before[k], p) for k, p in trainer.params.items())
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["nonfinite_total"] == 4
