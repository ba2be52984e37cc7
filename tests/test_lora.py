"""LoRA mix fine-tuning of an existing model: peft adapters on the generator (diffusers' `add_adapter`), the
base frozen bit for bit, only the adapters optimised, and the adapters saved in diffusers' own LoRA format,
which plain diffusers loads."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from iomm.cli import main
from iomm.config_checks import load_config
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.training.trainer import Trainer
from iomm.typed_config import ConfigError

LORA = ("train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=4", "train.ema_decay=0.5",
        "data.pairs=world:16", "train.mix_ratio=0.5")


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def existing(tiny_config, tmp_path):
    """The "existing model": trained on pairs only."""
    Trainer(tiny_config("train.steps=2", "train.mix_ratio=0", "data.pairs=world:16", "train.ema_decay=0.5"),
            tmp_path / "existing", progress=False).fit()
    return tmp_path / "existing"


def test_lora_mix_fine_tuning_trains_only_adapters_that_plain_diffusers_loads(tiny_config, tmp_path, existing):
    trainer = Trainer(tiny_config("train.steps=3", *LORA), tmp_path / "lora", init=existing, progress=False)
    trainer.fit()
    assert trainer.params and all("lora_" in name for name in trainer.params)  # optimizer and EMA: adapters only
    base = load_model(existing)  # its EMA weights: what the adapters start from
    tuned = trainer.model.generator.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in tuned.items() if "lora_" not in k}
    assert frozen.keys() == base.generator.state_dict().keys()
    assert all(torch.equal(v, frozen[k]) for k, v in base.generator.state_dict().items())  # bit for bit

    checkpoint = tmp_path / "lora/checkpoints/step_00000003"
    adapters = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") and "lora_" in k for k in adapters)
    # plain diffusers: the base generator from its own directory, then the LoRA file
    assert main(["export", "--model", str(existing), "--out", str(tmp_path / "existing_export")]) == 0
    plain = SD3Transformer2DModel.from_pretrained(tmp_path / "existing_export/generator")
    plain.load_lora_adapter(str(checkpoint / "pytorch_lora_weights.safetensors"), prefix="transformer")
    ours = load_model(tmp_path / "lora")  # the EMA adapters, as in the file
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([300.0, 800.0])
    tokens, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.no_grad():
        a = plain(hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled).sample
        b = ours.generator(hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled).sample
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base.generator(
        hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled).sample.detach())

    # the iomm pipeline loads the same file onto the existing model
    pipe = IOMMPipeline.from_pretrained(existing)
    pipe.load_lora_weights(checkpoint)
    prompts = ["a photo of a red circle"]
    loaded = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt")
    run = IOMMPipeline.from_pretrained(tmp_path / "lora")(prompts, num_inference_steps=2,
                                                           generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.allclose(loaded.images, run.images, atol=1e-3)

    # an export of the LoRA run: the adapters fused into its generator, and the LoRA file beside it
    assert main(["export", "--model", str(tmp_path / "lora"), "--out", str(tmp_path / "lora_export"), "--lora"]) == 0
    assert (tmp_path / "lora_export/pytorch_lora_weights.safetensors").is_file()
    fused = IOMMPipeline.from_pretrained(tmp_path / "lora_export")(
        prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.allclose(fused.images, run.images, atol=1e-3)


def test_lora_resume_is_exact(tiny_config, tmp_path, existing):
    Trainer(tiny_config("train.steps=4", *LORA), tmp_path / "straight", init=existing, progress=False).fit()
    Trainer(tiny_config("train.steps=2", *LORA), tmp_path / "resumed", init=existing, progress=False).fit()
    Trainer(tiny_config("train.steps=4", *LORA), tmp_path / "resumed", init=existing, progress=False).fit()
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in a)


def test_unet_lora_is_saved_in_the_unet_format(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=1", "generator.kind=unet", "generator.block_out_channels=[32,32]",
                      "generator.attention_head_dim=16", *LORA)
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    adapters = load_file(tmp_path / "run/checkpoints/step_00000001/pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("unet.") for k in adapters)


def test_bad_lora_settings_fail_before_any_compute(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="train.lora.rank.*>= 1"):
        load_config(None, ["train.lora.enabled=true", "train.lora.rank=0"], check_paths=False)
    with pytest.raises(ConfigError, match="train.lora.target_modules"):
        Trainer(tiny_config("train.steps=1", *LORA, "train.lora.target_modules=[no_such_layer]"), tmp_path / "run",
                progress=False)
    assert not (tmp_path / "run/checkpoints").exists()
