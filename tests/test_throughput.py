"""Live throughput in every training run: what each log step records, and that its FLOPs are bench's and counting
them changes nothing."""

import json
import math

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iomm.lab.bench.train_step import step_flops
from iomm.training import throughput
from iomm.training.throughput import DATA_WAIT
from iomm.training.trainer import Trainer

MIXED = ("data.pairs=world:32", "train.mix_ratio=0.5")
RATES = ("images_per_s", "images_per_s_per_device", "condition_tokens_per_s", "tflop_per_s_per_device", "mfu",
         "peak_memory_gib", "step_s")
SPLIT = (DATA_WAIT, "conditioning_forward", "codec_encode", "generator_forward", "generator_backward",
         "conditioning_backward", "optimizer_and_ema")


def _log_steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def test_every_log_step_records_throughput_time_split_flops_and_memory(tiny_config, tmp_path, capsys):
    trainer = Trainer(tiny_config("train.steps=3", *MIXED), tmp_path / "run", progress=False)
    trainer.fit()
    rows = _log_steps(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        fields = [*RATES, *(f"{phase}_s" for phase in SPLIT)]
        assert all(math.isfinite(row[name]) and row[name] > 0 for name in fields), row
        assert sum(row[f"{phase}_s"] for phase in SPLIT) <= row["step_s"]
        assert row["images_per_s"] == row["images_per_s_per_device"]  # one process
    assert not trainer.timer.enabled  # held-out losses and sampling after training run untimed
    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("images_per_s")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("mfu")] == [1, 2, 3]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(" img/s  MFU " in line for line in lines)
    with Image.open(tmp_path / "run/throughput.png") as plot:  # the four panels, drawn at the run's end
        assert plot.width > 3 * plot.height


def test_the_flops_per_sample_are_those_bench_train_step_counts(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=1", *MIXED)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    fresh = Trainer(cfg, tmp_path / "bench", progress=False)
    first = fresh.batches[0]
    counted = step_flops(fresh, [first])["step"] / len(first.captions)
    assert counted > 0 and trainer.meter.flops_per_sample == counted
    assert trainer.meter.condition_tokens_per_sample > 0


def test_counting_the_flops_leaves_the_training_bit_for_bit_as_it_was(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=3", *MIXED, "train.cond_dropout=0.2")
    Trainer(cfg, tmp_path / "counted", progress=False).fit()
    monkeypatch.setattr(throughput, "count_step", lambda trainer, micro_batches: ({"step": 1}, 1))
    Trainer(cfg, tmp_path / "uncounted", progress=False).fit()
    counted, uncounted = ([(row["loss"], row["grad_norm"]) for row in _log_steps(tmp_path / run)]
                          for run in ("counted", "uncounted"))
    assert counted == uncounted
