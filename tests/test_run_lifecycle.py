"""What a researcher's run goes through: held-out sample grids from a folder with bad files, resuming with
changed settings, cluster-friendly logs, and a folder listed once per run."""

import dataclasses
import json

import datasets
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iomm.config import ConfigError, FinetuneConfig
from iomm.config_checks import finetune_config
from iomm.data import folder_index
from iomm.data.folder_index import indexed_images, split_held_out
from iomm.data.images import BadSource
from iomm.data.mixed_batches import DataPosition, MixedBatches
from iomm.evaluation.sample_grid import sample_grid
from iomm.training.resume import APPLIED_ON_RESUME, ResumeConflict
from iomm.training.trainer import Trainer


def _folder(tmp_path, n=12, broken=("zzz_broken.png",)):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    for name in broken:
        (folder / name).write_bytes(b"not an image")
    return folder


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_a_corrupt_file_among_the_held_out_ones_never_ends_the_run(tiny_config, tmp_path, capsys):
    folder = _folder(tmp_path)  # the sorted list ends with zzz_broken.png, which the held-out split takes
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.steps=2", "train.sample_every=1",
                      "data.max_bad_fraction=1.0", "data.holdout=4")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, sample_fn=sample_grid)
    split = split_held_out(indexed_images(folder, None), 4)
    assert folder / "zzz_broken.png" in split.held_out
    samples = trainer.batches.images
    training_files = {samples.items.files[i][0] for i in samples.keep}
    assert training_files == set(split.train) and not training_files & set(split.held_out)
    assert len(trainer.held_out) == 3  # the broken one is skipped and counted
    assert trainer.report.skipped["unreadable image (UnidentifiedImageError)"] == 1
    trainer.fit()
    assert (tmp_path / "run/samples/step_00000002.png").is_file()
    with Image.open(tmp_path / "run/samples/step_00000002.png") as grid:
        assert grid.height == 2 * (32 + 2) + 2  # originals and their regenerations


def test_a_failing_sample_grid_is_reported_and_training_goes_on(tiny_config, tmp_path, capsys):
    def broken(model, cfg, held_out):
        raise OSError("disk full")

    Trainer(tiny_config("train.steps=3", "train.sample_every=1"), tmp_path / "run", progress=False,
            sample_fn=broken).fit()
    out = capsys.readouterr().out
    assert out.count("sample grid at step") == 3 and "OSError: disk full" in out
    assert (tmp_path / "run/checkpoints/step_00000003/manifest.json").is_file()


def test_resume_applies_a_new_learning_rate_and_more_steps(tiny_config, tmp_path, capsys):
    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    resumed = Trainer(tiny_config("train.steps=4", "train.lr=0.003", "train.weight_decay=0.01"), tmp_path / "run",
                      progress=False)
    resumed.fit()
    out = capsys.readouterr().out
    assert "train.lr: 0.0001 -> 0.003 (applies from step 2)" in out and "train.steps: 2 -> 4" in out
    group = resumed.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.003) and group["weight_decay"] == 0.01
    assert resumed.step == 4 and _steps(tmp_path / "run") == [1, 2, 3, 4]


def test_resume_refuses_a_changed_model_or_data_naming_the_fields(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2"), tmp_path / "run", progress=False).fit()
    changed = Trainer(tiny_config("train.steps=4", "adapter.num_queries=8", "train.seed=3"), tmp_path / "run",
                      progress=False)
    with pytest.raises(ResumeConflict) as err:
        changed.fit()
    assert isinstance(err.value, ConfigError)
    message = str(err.value)
    assert "adapter.num_queries: checkpoint has 4, now 8" in message
    assert "train.seed: checkpoint has 0, now 3" in message
    assert "train.steps" not in message and "new --out" in message
    assert changed.step == 0  # nothing was loaded


def test_a_finetune_resume_may_change_the_mix_ratio_and_the_streams_go_on_from_the_checkpoint(tiny_config, tmp_path,
                                                                                             capsys):
    def stage2(*overrides: str):
        return finetune_config(tiny_config("data.pairs=world:64", "finetune.steps=2", *overrides))

    run = tmp_path / "run"
    Trainer(stage2(), run, progress=False).fit()
    resumed = Trainer(stage2("finetune.steps=4", "finetune.mix_ratio=0.75"), run, progress=False)
    resumed.fit()  # the finished run, rerun with a new ratio: more steps, drawn with it
    assert "train.mix_ratio: 0.5 -> 0.75 (applies from step 2)" in capsys.readouterr().out
    at = {step: json.loads((run / f"checkpoints/step_{step:08d}/state.json").read_text())["data_position"]
          for step in (2, 4)}
    start = DataPosition(at[2]["micro_batch"], at[2]["images"], at[2]["pairs"])
    continued = MixedBatches(resumed.batches.images, resumed.batches.pairs, 4, 0.75, seed=0, start=start)
    assert at[4] == continued.state(4)


def test_every_setting_finetune_replaces_may_change_on_resume_under_both_names():
    """`iomm finetune` copies `finetune.X` into `train.X`: a refusal of `train.X` would name a field the user never
    set."""
    for name in (f.name for f in dataclasses.fields(FinetuneConfig)):
        assert {f"finetune.{name}", f"train.{name}"} <= APPLIED_ON_RESUME


def test_a_run_that_fails_before_training_leaves_no_run_folder(tiny_config, tmp_path):
    folder = _folder(tmp_path, n=6, broken=())  # listed into the run folder first
    datasets.Dataset.from_dict({"caption": ["a red circle"]}).save_to_disk(str(tmp_path / "pairs"))
    cfg = tiny_config("data.source=folder", f"data.path={folder}", "train.mix_ratio=0.5",
                      f"data.pairs=hf:{tmp_path / 'pairs'}")
    with pytest.raises(BadSource, match="no column 'image'"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    earlier = tmp_path / "earlier"  # a folder this invocation did not make is never removed
    (earlier / "checkpoints").mkdir(parents=True)
    with pytest.raises(BadSource):
        Trainer(cfg, earlier, progress=False)
    assert (earlier / "checkpoints").is_dir()


def test_without_a_progress_bar_every_log_step_prints_a_line(tiny_config, tmp_path, capsys):
    Trainer(tiny_config("train.steps=4", "train.log_every=2"), tmp_path / "run", progress=True).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all(" loss " in line and " it/s " in line and " ETA " in line for line in lines)


def test_tensorboard_and_metrics_hold_each_step_once_after_a_resume(tiny_config, tmp_path):
    run = tmp_path / "run"
    cfg = ("train.steps=6", "train.checkpoint_every=2", "train.sample_every=2")
    Trainer(tiny_config(*cfg), run, progress=False, sample_fn=sample_grid).fit()
    # an interrupted run: keep the checkpoint of step 2 only, as if it had died at step 3 after logging it
    for late in ("step_00000004", "step_00000006"):
        for path in sorted((run / "checkpoints" / late).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (run / "checkpoints" / late).rmdir()
    Trainer(tiny_config(*cfg), run, progress=False, sample_fn=sample_grid).fit()
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Images("samples")] == [2, 4, 6]


def test_a_folder_is_listed_once_per_run_and_the_list_is_reused(tmp_path, monkeypatch):
    folder = _folder(tmp_path, n=6, broken=())
    calls = []
    real = folder_index.list_images
    monkeypatch.setattr(folder_index, "list_images", lambda root: calls.append(root) or real(root))
    run = tmp_path / "run"
    first = indexed_images(folder, run)
    assert indexed_images(folder, run, main=False) == first and len(calls) == 1  # another rank reads the list
    assert indexed_images(folder, run) == first and len(calls) == 1  # a resume reuses it
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "new.png")  # the folder changed: list again
    assert len(indexed_images(folder, run)) == 7 and len(calls) == 2


def test_held_out_files_are_spread_over_the_list():
    files = [f"{i:02d}" for i in range(20)]
    split = split_held_out(files, 5)
    assert split.held_out == ["00", "05", "10", "14", "19"] and len(split.train) == 15
    assert split_held_out(files[:3], 8).held_out == ["00"]  # at most half of a small folder
    assert split_held_out(files, 0).held_out == []


def test_world_sample_grids_log_the_fidelity_of_their_regenerations(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=1", "train.sample_every=1"), tmp_path / "run", progress=False,
            sample_fn=sample_grid).fit()
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    grid = next(row for row in rows if "recon_mse_own" in row)
    for key in ("exact", "shape", "color", "count", "position", "placement"):
        assert 0.0 <= grid[f"fidelity_{key}"] <= 1.0 and (grid[f"fidelity_{key}"] * 8).is_integer()  # 8 images
