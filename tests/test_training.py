"""Training loop: exact resume, checkpoints that survive damage, save -> load round trip."""

import json
import math

import pytest
import torch

from iomm.checkpointing.checkpoint import latest_checkpoint
from iomm.inference.pipeline import load_model
from iomm.training.optimizers import lr_factor
from iomm.training.trainer import Trainer


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


MIXED = ("data.pairs=world:32", "train.mix_ratio=0.5", "train.cond_dropout=0.2", "train.warmup_steps=3")
# On pairs alone the token head (image rows only) never gets a gradient, so it has no optimizer state to save.
PAIRS_ONLY = ("data.pairs=world:32", "train.mix_ratio=0.0", "adapter.token_loss=1.0", "train.warmup_steps=3")


@pytest.mark.parametrize("data", [MIXED, PAIRS_ONLY], ids=["mixed", "pairs-only-with-token-head"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_config, tmp_path, data):
    straight = Trainer(tiny_config("train.steps=4", *data), tmp_path / "a", progress=False).fit()
    Trainer(tiny_config("train.steps=2", *data), tmp_path / "b", progress=False).fit()
    resumed = Trainer(tiny_config("train.steps=4", *data), tmp_path / "b", progress=False)
    assert resumed.step == 0
    resumed.fit()
    a, b = _losses(straight), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], abs=1e-6)
    assert a[3] != a[4]


@pytest.mark.parametrize("generator, output_layer", [
    (("generator.kind=sd3",), "proj_out"),
    (("generator.kind=unet", "generator.block_out_channels=[32,32]", "generator.attention_head_dim=16"), "conv_out"),
    (("generator.kind=zimage", "generator.attention_head_dim=16", "generator.refiner_layers=1"),
     "all_final_layer.4-1.linear"),
])
def test_save_then_load_gives_identical_outputs(tiny_config, tmp_path, generator, output_layer):
    trainer = Trainer(tiny_config("train.steps=2", "train.ema_decay=0.5", *generator), tmp_path / "run",
                      progress=False)
    trainer.fit()
    loaded = load_model(tmp_path / "run", use_ema=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    trainer.model.eval()
    with torch.no_grad(), trainer.ema.applied():
        expected = trainer.model.velocity(x, t, trainer.model.condition_texts(["a photo of a red circle"] * 2))
    with torch.no_grad():
        got = loaded.velocity(x, t, loaded.condition_texts(["a photo of a red circle"] * 2))
    assert torch.equal(expected, got)
    assert type(loaded.generator) is type(trainer.model.generator)
    raw = load_model(tmp_path / "run", use_ema=False)
    weight = f"{output_layer}.weight"
    assert not torch.equal(raw.generator.get_parameter(weight), loaded.generator.get_parameter(weight))


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys):
    Trainer(tiny_config("train.steps=4"), tmp_path / "run", progress=False).fit()
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.name == "step_00000004"
    weights = next((newest / "weights").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    messages = []
    assert latest_checkpoint(tmp_path / "run", log=messages.append).name == "step_00000002"
    assert "step_00000004" in messages[0] and weights.name in messages[0]
    resumed = Trainer(tiny_config("train.steps=4"), tmp_path / "run", progress=False)
    resumed.resume()
    assert resumed.step == 2


def test_ema_warm_up_forgets_the_initial_weights():
    from iomm.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": p}, decay=0.995)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.995
    with torch.no_grad():
        p.fill_(1.0)
    # The shadow keeps prod_s decay_at(s) of its initial 0 and takes the rest from 1. While the warm-up
    # (1 + s) / (10 + s) is below 0.995 (s < 1790) the product telescopes to 9! n! / (n + 9)! = 1 / C(n + 9, 9).
    for step in range(500):
        ema.update(step)
        if step < 20:
            assert ema.shadow["p"].tolist() == pytest.approx([1 - 1 / math.comb(step + 10, 9)] * 3, abs=1e-6), step
    # Without warm-up 0.995**500 = 8% of the (zero) initial weights would remain; with it 1 / C(509, 9) < 1e-17.
    assert ema.shadow["p"].tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_lr_schedule_warms_up_holds_then_decays_to_zero():
    factors = [lr_factor(s, steps=100, warmup=10, decay_fraction=0.2) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert factors[10:80] == [1.0] * 70
    assert all(a > b for a, b in zip(factors[80:], factors[81:]))
    assert factors[99] == pytest.approx(1 / 20)
    assert [lr_factor(s, steps=100, warmup=10, decay_fraction=0.0) for s in range(10, 100)] == [1.0] * 90


def test_where_bf16_is_native_frozen_weights_are_stored_in_bf16(tiny_config, tmp_path, monkeypatch):
    """(bf16 is emulated on this CPU: the test says it is native, to run the path a GPU takes.)"""
    from iomm.evaluation.sample_grid import sample_grid

    monkeypatch.setattr("iomm.training.precision.bf16_is_native", lambda device_type="cpu": True)
    trainer = Trainer(tiny_config("train.steps=2", "train.mixed_precision=bf16", "train.sample_every=2"),
                      tmp_path / "run", progress=False, sample_fn=sample_grid)
    trainer.fit()
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.startswith("mllm.")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if not n.startswith("mllm.")} == {torch.float32}
    assert (tmp_path / "run/samples/step_00000002.png").is_file()


def test_stage_two_logs_the_held_out_pairs_loss_the_same_after_a_resume(tiny_config, tmp_path, capsys):
    held = ("data.holdout_pairs=6",)
    straight = Trainer(tiny_config("train.steps=4", *MIXED, *held), tmp_path / "a", progress=False)
    assert straight.held_out_pairs is not None and len(straight.held_out_pairs.captions) == 6
    straight.fit()
    Trainer(tiny_config("train.steps=2", *MIXED, *held), tmp_path / "b", progress=False).fit()
    Trainer(tiny_config("train.steps=4", *MIXED, *held), tmp_path / "b", progress=False).fit()
    rows = {}
    for run in ("a", "b"):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        rows[run] = {r["step"]: r["heldout_loss"] for r in lines if "heldout_loss" in r}
    assert sorted(rows["a"]) == sorted(rows["b"]) == [1, 2, 3, 4]
    for step in (3, 4):
        assert rows["a"][step] == pytest.approx(rows["b"][step], abs=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in rows["a"].values())
    assert rows["a"][1] != rows["a"][4]  # the live weights are scored, not a frozen copy
    assert "heldout " in capsys.readouterr().out
    image_only = Trainer(tiny_config("train.steps=1", "data.pairs=world:32", "train.mix_ratio=1.0", *held),
                         tmp_path / "c", progress=False)
    assert image_only.held_out_pairs is None
