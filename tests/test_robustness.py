"""A killed run resumes exactly; saves are atomic; signals save; non-finite steps are skipped; loads are safe."""

import ast
import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import iomm
from iomm.checkpointing import checkpoint as ckpt
from iomm.cli import main
from iomm.config import save_config
from iomm.data.images import DataReport
from iomm.data.shards import write_shards
from iomm.training.trainer import Trainer, TrainingInterrupted, TrainingStopped


def _losses(run_dir):
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]  # after a resume the last entry of a step wins
    return losses


def _cli_args(config_path, run_dir):
    return ["pretrain", "--config", str(config_path), "--out", str(run_dir), "--no-progress"]


# `iomm pretrain` exactly as the CLI runs it, except that the process SIGKILLs itself (and its process group: no
# data worker outlives it) the moment checkpoint step KILL_AT is on disk: the kill cannot race the end of the run.
KILL_AT = 4
_KILLED_AT_A_STEP = f"""
import os, signal, sys
from iomm.training.trainer import Trainer
save = Trainer.save
def save_then_die(self):
    saved = save(self)
    if self.step == {KILL_AT}:
        os.killpg(0, signal.SIGKILL)
    return saved
Trainer.save = save_then_die
from iomm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _shards(tmp_path):
    """12 captioned images as 3 WebDataset shards."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    samples = [(f, f"caption {f.stem}") for f in sorted(folder.glob("*.png"))]
    write_shards(samples, tmp_path / "shards", 32, 5, "png", DataReport(), progress=False)
    return tmp_path / "shards"


DATA = {  # the nano world; and shards read in epochs by 2 DataLoader workers, images and pairs from the same shards
    "world": lambda tmp_path: ("data.pairs=world:16",),
    "shards": lambda tmp_path: ("data.source=webdataset", f"data.path={_shards(tmp_path)}",
                                f"data.pairs=webdataset:{tmp_path / 'shards'}", "data.num_workers=2", "data.holdout=2"),
}


@pytest.mark.parametrize("data", sorted(DATA))
def test_sigkill_then_same_command_continues_exactly(tiny_config, tmp_path, capsys, data):
    steps = 10  # checkpoints every 2 steps: the kill leaves 6 steps that only a correct resume reproduces
    cfg = tiny_config(f"train.steps={steps}", "train.checkpoint_every=2", "train.mix_ratio=0.5", *DATA[data](tmp_path))
    config_path = tmp_path / "tiny.yaml"
    save_config(cfg, config_path)
    assert main(_cli_args(config_path, tmp_path / "straight")) == 0  # the uninterrupted run (in this process: fast)
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, steps + 1))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_A_STEP, *_cli_args(config_path, tmp_path / "killed")],
                            env=env, capture_output=True, text=True, start_new_session=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    newest = ckpt.latest_checkpoint(tmp_path / "killed")
    assert newest == tmp_path / f"killed/checkpoints/step_{KILL_AT:08d}"
    before = _losses(tmp_path / "killed")
    assert sorted(before) == list(range(1, KILL_AT + 1))
    assert all(before[s] == pytest.approx(straight[s], abs=1e-6) for s in before)

    capsys.readouterr()
    assert main(_cli_args(config_path, tmp_path / "killed")) == 0  # the same command, in a fresh Trainer
    assert f"resumed from {newest} at step {KILL_AT}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))  # each step ran once, none again
    after = _losses(tmp_path / "killed")
    for step in range(1, steps + 1):  # weights, EMA, optimizer, schedule and data all came back, or these would differ
        assert after[step] == pytest.approx(straight[step], abs=1e-6), step
    final = [json.loads((tmp_path / run / f"checkpoints/step_{steps:08d}/state.json").read_text())["data_position"]
             for run in ("straight", "killed")]
    assert final[0] == final[1]  # the same samples taken from each stream


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_restores_optimizer_schedule_ema_and_counters(tiny_config, tmp_path, optimizer):
    overrides = ("train.steps=2", "train.ema_decay=0.5", "train.warmup_steps=5", f"train.optimizer={optimizer}")
    trained = Trainer(tiny_config(*overrides), tmp_path / "run", progress=False)
    trained.fit()
    resumed = Trainer(tiny_config(*overrides), tmp_path / "run", progress=False)
    assert resumed.resume() and resumed.step == 2 and resumed.nonfinite_total == trained.nonfinite_total
    assert len(trained.optimizers) == (2 if optimizer == "muon" else 1)
    assert [s.state_dict() for s in resumed.schedulers] == [s.state_dict() for s in trained.schedulers]
    assert resumed.schedulers[0].get_last_lr() == trained.schedulers[0].get_last_lr() != [1e-4]  # mid-warmup
    for name, p in trained.params.items():
        assert torch.equal(resumed.params[name], p), name
        assert torch.equal(resumed.ema.shadow[name], trained.ema.shadow[name]), name
    assert any(not torch.equal(trained.ema.shadow[n], p) for n, p in trained.params.items())  # EMA is its own state
    for a, b in zip((o.state_dict() for o in trained.optimizers), (o.state_dict() for o in resumed.optimizers)):
        assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() != set()
        for k, state in a["state"].items():
            assert all(torch.equal(v, b["state"][k][key]) for key, v in state.items()), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_before_exit(tiny_config, tmp_path, sig):
    before = signal.getsignal(sig)
    trainer = Trainer(tiny_config("train.steps=50", "train.checkpoint_every=100"), tmp_path / "run", progress=False)
    original = trainer.train_step

    def step_then_signal(batches):
        outcome = original(batches)
        if trainer.step == 2:  # the step counter is incremented after train_step: this is step 3
            os.kill(os.getpid(), sig)
        return outcome

    trainer.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted, match="rerun the same command"):  # a recipe must not go on
        trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert signal.getsignal(sig) == before


def _fill_dev_full(tmp):  # the trainer's state.json writer into a device that is always full
    (tmp / "state.json").symlink_to("/dev/full")
    (tmp / "state.json").write_text(json.dumps({"step": list(range(10000))}), encoding="utf-8")


def _raise(err):
    def write(tmp):
        (tmp / "a.bin").write_bytes(b"12")
        raise err
    return write


@pytest.mark.parametrize("write, message", [
    (_raise(OSError(errno.ENOSPC, "No space left on device")), "No space left on device"),
    (_raise(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
     "No space left on device"),
    (_fill_dev_full, ""),  # Linux (the project's machines and CI) always has /dev/full
], ids=["oserror", "safetensors", "write-into-dev-full"])
def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, write, message):
    def ok(tmp):
        (tmp / "a.bin").write_bytes(b"1234")

    ckpt.save_checkpoint(tmp_path, 1, ok, keep_last=3)
    expected = f"step_00000002: .*{message}.*MiB free.*previous checkpoint is intact"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.save_checkpoint(tmp_path, 2, write, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"


def test_saves_go_through_a_temporary_directory_and_leftovers_are_removed(tmp_path):
    stale = tmp_path / "checkpoints/.tmp-step_00000005-99999"  # a save killed half-way
    stale.mkdir(parents=True)
    (stale / "generator.safetensors").write_bytes(b"half")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path / "checkpoints" and tmp.name.startswith(".")
        assert not (tmp_path / "checkpoints/step_00000001").exists()
        (tmp / "x").write_text("x")

    final = ckpt.save_checkpoint(tmp_path, 1, write, keep_last=3)
    assert final.name == "step_00000001" and not seen[0].exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert json.loads((final / "manifest.json").read_text()) == \
        {"x": {"size": 1, "sha256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}}


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


def _two_checkpoints(tmp_path):
    def write(tmp):
        (tmp / "weights.bin").write_bytes(bytes(range(64)))

    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, write, keep_last=3)
    return tmp_path / "checkpoints/step_00000002"


def test_corrupt_checkpoint_of_the_right_size_is_caught_by_sha256(tmp_path):
    newest = _two_checkpoints(tmp_path)
    data = bytearray((newest / "weights.bin").read_bytes())
    data[10] ^= 0xFF
    (newest / "weights.bin").write_bytes(bytes(data))
    logged = []
    assert ckpt.latest_checkpoint(tmp_path, log=logged.append).name == "step_00000001"
    assert logged == [f"warning: skipping damaged checkpoint {newest}: weights.bin does not match its sha256"]
    with pytest.raises(ckpt.CheckpointError, match="step_00000002: damaged checkpoint: weights.bin"):
        ckpt.resolve_checkpoint(newest)


@pytest.mark.parametrize("manifest, problem", [
    ("{not json", "not valid JSON"),
    ("[]", "lists no files"),
    ("{}", "lists no files"),
    ('{"weights.bin": 64}', "entry for weights.bin is malformed"),
    ('{"weights.bin": {"size": 64}}', "entry for weights.bin is malformed"),
    ('{"../../secret": {"size": 1, "sha256": "0"}}', "outside the checkpoint"),
    ('{"gone.bin": {"size": 1, "sha256": "0"}}', "missing file gone.bin"),
])
def test_a_malformed_manifest_is_reported_not_raised(tmp_path, manifest, problem):
    newest = _two_checkpoints(tmp_path)
    (newest / "manifest.json").write_text(manifest)
    logged = []
    assert ckpt.latest_checkpoint(tmp_path, log=logged.append).name == "step_00000001"
    assert len(logged) == 1 and "step_00000002" in logged[0] and problem in logged[0]


def test_a_checkpoint_holds_no_pickle(tiny_config, tmp_path):
    """Weights, EMA and optimizer state are safetensors; the rest is JSON and YAML: nothing is unpickled."""
    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    files = [p for p in (tmp_path / "run/checkpoints/step_00000002").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json", ".yaml"}
    assert len(list((tmp_path / "run/checkpoints/step_00000002/weights").glob("*.safetensors"))) == 1


UNPICKLERS = {"pickle", "dill", "joblib", "cloudpickle", "shelve"}


def test_source_loads_weights_safely_and_runs_remote_code_only_when_asked():
    files = sorted(Path(iomm.__file__).parent.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                assert not UNPICKLERS & {a.name.split(".")[0] for a in node.names}, where
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in UNPICKLERS, where
            elif isinstance(node, ast.Call):
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if ast.unparse(node.func) == "torch.load":
                    assert kwargs.get("weights_only") == "True", where
                # trust_remote_code is passed on from the config / CLI flag, never switched on in the code
                assert kwargs.get("trust_remote_code") != "True" and kwargs.get("allow_pickle") != "True", where


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


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped_too(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.steps=5", "train.max_nonfinite_in_row=2"), tmp_path / "run", progress=False)
    next(iter(trainer.params.values())).register_hook(lambda grad: grad + float("inf"))
    before = {k: v.clone() for k, v in trainer.params.items()}
    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row at step 2"):
        trainer.fit()
    assert all(torch.equal(before[k], p) for k, p in trainer.params.items())  # no update, no EMA drift
    assert all(torch.equal(before[k], trainer.ema.shadow[k]) for k in before)
    assert _losses(tmp_path / "run") and all(map(math.isfinite, _losses(tmp_path / "run").values()))


def test_a_stopped_run_reports_without_a_traceback(tiny_config, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "good.png")
    for i in range(20):
        (folder / f"bad{i}.png").write_bytes(b"garbage")
    save_config(tiny_config("data.source=folder", f"data.path={folder}", "train.steps=40"), tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("iomm: ") or "\niomm: " in err  # its own line
    assert "x unreadable image (UnidentifiedImageError)" in err and "Traceback" not in err
    assert (tmp_path / "run/checkpoints").is_dir()
