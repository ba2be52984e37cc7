"""`IOMMPipeline` as a diffusers `DiffusionPipeline`: `iomm export` writes a pipeline directory that diffusers'
loading reads back, each component saved by its own library; the call follows diffusers' conventions."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel
from PIL import Image
from transformers import AutoModelForImageTextToText

from iomm.cli import main
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.nano.vae import tiny_config as tiny_vae_config
from iomm.nano.vae import train_nano_vae
from iomm.training.trainer import Trainer


@pytest.fixture
def trained(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2", "train.ema_decay=0.5"), tmp_path / "run", progress=False).fit()
    return tmp_path / "run"


def test_export_is_a_diffusers_pipeline_directory_that_loads_back(tiny_config, tmp_path):
    vae = train_nano_vae(tmp_path / "vae", steps=2, config=tiny_vae_config(), progress=False)
    cfg = tiny_config("train.steps=2", "train.ema_decay=0.5", "codec.kind=vae", f"codec.path={vae}")
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    (tmp_path / "scores.json").write_text(json.dumps({"command": "iomm eval shapes --model run", "overall": 0.25}))
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "export"),
                 "--scores", str(tmp_path / "scores.json")]) == 0
    index = json.loads((tmp_path / "export/model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "IOMMPipeline"]  # diffusers' generic loader: OUT/pipeline.py
    assert index["conditioner"] == ["iomm.inference.conditioner", "IOMMConditioner"]
    assert index["generator"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["mllm"] == ["transformers", "InternVLForConditionalGeneration"]
    card = (tmp_path / "export/README.md").read_text()
    assert "2 steps of 2" in card and "overall = 0.250" in card and "iomm eval shapes --model run" in card
    # the checkpoint is named inside its run, without the local path to it
    record = json.loads((tmp_path / "export/export.json").read_text())
    assert record["checkpoint"] == "run/checkpoints/step_00000002" and "`run/checkpoints/step_00000002`" in card
    assert str(tmp_path / "run") not in card
    assert 'DiffusionPipeline.from_pretrained("THIS_DIRECTORY", trust_remote_code=True)' in card

    # each component loads with its own library's class, unchanged
    run = load_model(tmp_path / "run")  # its EMA weights: the exported ones
    generator = SD3Transformer2DModel.from_pretrained(tmp_path / "export/generator")
    assert all(torch.equal(v, run.generator.state_dict()[k]) for k, v in generator.state_dict().items())
    assert torch.equal(AutoencoderKL.from_pretrained(tmp_path / "export/vae").decoder.conv_out.weight,
                       run.codec.vae.decoder.conv_out.weight)
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "export/mllm")).__name__ == \
        "InternVLForConditionalGeneration"

    # `iomm generate` on the export (diffusers' loading) gives the run's images, bit for bit
    for model in ("run", "export"):
        assert main(["generate", "--model", str(tmp_path / model), "--prompt", "a photo of a red circle",
                     "--prompt", "a photo of two squares", "--seed", "3", "--out", str(tmp_path / f"gen_{model}")]) == 0
    for name in ("00000.png", "00001.png"):
        a, b = (np.asarray(Image.open(tmp_path / f"gen_{m}" / name)) for m in ("run", "export"))
        assert np.array_equal(a, b)

    wide = IOMMPipeline.from_pretrained(tmp_path / "export", dtype=torch.float64)
    assert wide.generator.dtype == torch.float64 and wide.conditioner.dtype == torch.float64

    # diffusers' generic loader: the class from the export's pipeline.py, run only when the caller trusts it
    generic = DiffusionPipeline.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert type(generic) is IOMMPipeline
    assert torch.equal(generic.generator.state_dict()["proj_out.weight"], run.generator.state_dict()["proj_out.weight"])
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "export")
    (tmp_path / "export/generator/diffusers.py").write_text("import os  # a component's own module\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        IOMMPipeline.from_pretrained(tmp_path / "export")
    (tmp_path / "export/generator/diffusers.py").unlink()
    (tmp_path / "export/pipeline.py").write_text("import os  # not the file iomm writes\n")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        IOMMPipeline.from_pretrained(tmp_path / "export")


def test_call_follows_diffusers_conventions(trained):
    pipe = IOMMPipeline.from_pretrained(trained)
    prompts = ["a photo of a red circle", "a photo of two squares"]
    pt = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    (np_images,) = pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                        return_dict=False)
    assert np.allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    # one generator per image: each image depends on its own generator only
    pair = pipe(prompts, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    alone = pipe(prompts[1:], num_inference_steps=2, generator=[torch.Generator().manual_seed(8)]).images
    assert np.array_equal(np.asarray(pair[1]), np.asarray(alone[0]))
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompts, output_type="latent")


def test_reconstruction_shows_the_masked_condition_and_the_understanding_tab_answers(trained):
    pipe = IOMMPipeline.from_pretrained(trained)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    masked, regenerated = pipe.reconstruct(image, 0.5, generator=torch.Generator().manual_seed(1),
                                           num_inference_steps=2)
    shown = np.asarray(masked)
    assert masked.size == regenerated.size == (32, 32)
    grey = (shown == 128).all(axis=-1)  # masked patches: uniform grey cells of the token grid
    assert 0 < grey.mean() < 1 and np.array_equal(shown[~grey], np.asarray(image)[~grey])
    unmasked, _ = pipe.reconstruct(image, 0.0, num_inference_steps=2)
    assert np.array_equal(np.asarray(unmasked), np.asarray(image))
    assert isinstance(pipe.answer(image, "what color is the shape?", max_new_tokens=4), str)
    with pytest.raises(ValueError, match="mask_ratio"):
        pipe.reconstruct(image, 1.0)


def test_a_run_with_a_builtin_model_is_not_loaded_with_another_one(tmp_path, monkeypatch):
    """Built-in models live in directories relative to the working directory: loading a run from elsewhere
    must fail clearly, not build (train) a different nano MLLM and use it."""
    from iomm.config_checks import load_config
    from iomm.inference.pipeline import require_builtins

    cfg = load_config(None, ["mllm.path=nano", "mllm.nano_dir=.cache/nano-mllm"], check_paths=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="mllm.nano_dir.*Run from the directory the run was trained in"):
        require_builtins(cfg, tmp_path / "run/checkpoints/step_00000001")
    (tmp_path / ".cache/nano-mllm").mkdir(parents=True)
    (tmp_path / ".cache/nano-mllm/config.json").write_text("{}")
    require_builtins(cfg, tmp_path / "run/checkpoints/step_00000001")  # there: it is the run's own
