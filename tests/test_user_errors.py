"""What a new researcher runs into: numbers YAML reads as strings, wrong directories, bad images and stage-2
configs fail with a clear message naming the file, the field and what was expected, not a traceback."""

from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

from iomm.cli import main
from iomm.conditioning.mllm import FrozenMLLM
from iomm.config import ConfigError, config_source
from iomm.config_checks import codec_factor, finetune_config, load_config
from tests.test_mllm import BUILDERS, save, tiny_internvl

# ---------------------------------------------------------------- A: 5e-4 and friends


def test_exponent_floats_yaml_reads_as_strings_load_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n  betas: [9e-1, 95e-2]\n  weight_decay: 1e-2\nfinetune:\n  lr: 1.0e-5\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.betas, cfg.train.weight_decay, cfg.finetune.lr) == (5e-4, [0.9, 0.95], 0.01, 1e-5)
    assert all(isinstance(v, float) for v in (cfg.train.lr, *cfg.train.betas, cfg.finetune.lr))
    cfg = load_config(None, ["train.lr=5e-4", "finetune.lr=2E-5", "train.betas=[9e-1, 0.95]", "masking.ratio=.5"])
    assert (cfg.train.lr, cfg.finetune.lr, cfg.train.betas, cfg.masking.ratio) == (5e-4, 2e-5, [0.9, 0.95], 0.5)


@pytest.mark.parametrize("override, field, expected, got", [
    ("train.lr=fast", "train.lr", "a number", "fast"),
    ("train.lr=true", "train.lr", "a number", True),
    ("finetune.lr=fast", "finetune.lr", "a number or null", "fast"),
    ("train.betas=[5e-1, x]", "train.betas[1]", "a number", "x"),
    ("train.steps=5e-4", "train.steps", "an integer", "5e-4"),
    ("train.steps=1e3", "train.steps", "an integer", "1e3"),
])
def test_strings_that_are_not_numbers_and_exponents_for_integers_are_refused(override, field, expected, got):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert (err.value.field_path, err.value.expected, err.value.got) == (field, expected, got)


def test_a_word_for_a_float_in_a_file_names_file_field_expected_and_got(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: field 'train.lr': expected a number, got 'fast'"


# ---------------------------------------------------------------- B1: codec.path not an AutoencoderKL


@pytest.mark.parametrize("config", [
    None,  # an empty directory
    {},
    {"_class_name": "AutoencoderKL", "latent_channels": 4},
    {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64]},
    {"_class_name": "AutoencoderKL", "block_out_channels": "64"},
    ["not", "a", "mapping"],
])
def test_codec_path_that_is_not_an_autoencoderkl_directory_is_a_config_error(tmp_path, config):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["codec.kind=vae", f"codec.path={tmp_path}", "data.resolution=64"])
    assert err.value.field_path == "codec.path"
    assert "AutoencoderKL directory (config.json with block_out_channels)" in err.value.expected
    assert str(tmp_path) in str(err.value.got)


def test_autoencoderkl_directories_and_the_builtin_vae_still_load(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32).save_config(tmp_path / "vae")
    cfg = load_config(None, ["codec.kind=vae", f"codec.path={tmp_path / 'vae'}"])
    assert codec_factor(cfg) == 2
    cfg = load_config(None, ["codec.kind=vae", "codec.path=nano", f"codec.nano_dir={tmp_path / 'nano'}"])
    assert cfg.codec.path == "nano"


# ---------------------------------------------------------------- B2: MLLM of an unsupported family


def test_mllm_directory_of_an_unsupported_family_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"mllm.path={tmp_path}"])
    assert err.value.field_path == "mllm.path"
    assert "internvl" in err.value.expected and "qwen2_5_vl" in err.value.expected
    assert str(tmp_path) in err.value.got and "llava" in err.value.got
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="mllm.path"):
        load_config(None, [f"mllm.path={tmp_path}"])


def test_supported_and_remote_code_mllm_directories_keep_loading(tmp_path, tiny_mllm_dir):
    assert load_config(None, [f"mllm.path={tiny_mllm_dir}"]).mllm.path == str(tiny_mllm_dir)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": {"AutoModel": "m.X"}}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(None, [f"mllm.path={tmp_path}"])
    assert load_config(None, [f"mllm.path={tmp_path}", "mllm.trust_remote_code=true"]).mllm.trust_remote_code


def test_from_pretrained_of_an_unsupported_family_is_a_value_error_naming_dir_and_types(tmp_path):
    model, tokenizer, preprocessing = tiny_internvl()
    save(model, tokenizer, preprocessing, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError) as err:
        FrozenMLLM.from_pretrained(tmp_path)
    assert not isinstance(err.value, NotImplementedError)
    assert str(tmp_path) in str(err.value) and "internvl, qwen2_5_vl" in str(err.value)


# ---------------------------------------------------------------- B3: iomm edit --image not an image


@pytest.fixture
def no_model_load(monkeypatch):
    from iomm.inference.pipeline import IOMMPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(IOMMPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("content, reason", [
    (b"definitely not a PNG", "unreadable image"),
    (None, "missing file"),
])
def test_edit_with_an_unreadable_image_says_so_before_loading_the_model(tmp_path, capsys, no_model_load, content,
                                                                       reason):
    image = tmp_path / "broken.png"
    if content is not None:
        image.write_bytes(content)
    rc = main(["edit", "--model", str(tmp_path / "run"), "--image", str(image), "--instruction", "make it red",
               "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"iomm: {image}: not a readable image (") and reason in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_edit_reference_that_reads_reaches_the_model(tmp_path, no_model_load):
    from iomm.data.images import read_image

    Image.new("RGB", (16, 12), (255, 0, 0)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png").size == (16, 12)
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["edit", "--model", str(tmp_path / "run"), "--image", str(tmp_path / "ok.png"), "--instruction", "x",
              "--out", str(tmp_path / "out.png")])


# ---------------------------------------------------------------- B4: stage-2 errors name the config file


def test_config_source_is_what_load_config_names(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  steps: 0\n")
    for overrides in ([], ["train.seed=1"]):
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides)
        assert str(err.value).startswith(config_source(path, overrides) + ": field 'train.steps'")
    assert config_source(None) == "<defaults>"


def test_finetune_without_pairs_names_the_config_file_and_the_stage(tmp_path, capsys, monkeypatch):
    import iomm.model
    import iomm.training.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(iomm.training.trainer, "train", refuse)
    monkeypatch.setattr(iomm.model, "load_mllm", refuse)
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  steps: 3\n")
    expected = ("field 'data.pairs': expected a pair source (KIND:LOCATION, a JSONL path or NAME:N) "
                "when train.mix_ratio < 1")
    assert main(["finetune", "--config", str(path), "--init", "none", "--out", str(tmp_path / "run")]) == 2
    assert f"{path} (fine-tuning): {expected}" in capsys.readouterr().err
    assert main(["finetune", "--config", str(path), "--set", "train.seed=1", "--init", "none",
                 "--out", str(tmp_path / "run")]) == 2
    assert f"{path} with --set train.seed=1 (fine-tuning): {expected}" in capsys.readouterr().err
    assert main(["recipe", "nano", "--config", str(path), "--out", str(tmp_path / "recipe")]) == 2
    assert f"{path} (fine-tuning): {expected}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^<config> \(fine-tuning\): field 'data.pairs'"):
        finetune_config(load_config(None))


# ---------------------------------------------------------------- C: no preprocessor_config.json


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_checkpoint_without_image_processor_settings_warns_with_the_defaults(tmp_path, family):
    model, tokenizer, _ = BUILDERS[family]()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="image-processor settings") as record:
        mllm = FrozenMLLM.from_pretrained(tmp_path)
    messages = [str(w.message) for w in record if "image-processor settings" in str(w.message)]
    assert len(messages) == 1
    message, f = messages[0], mllm.family
    assert str(tmp_path) in message and f"mean={f.mean}" in message and f"std={f.std}" in message
    if family == "internvl":
        assert f"size={f.size}" in message
    else:
        for name in ("patch", "merge", "min_pixels", "max_pixels"):
            assert f"{name}={getattr(f, name)}" in message


def test_checkpoints_with_image_processor_settings_do_not_warn(tmp_path, tiny_mllm_dir):
    model, tokenizer, preprocessing = tiny_internvl()
    save(model, tokenizer, preprocessing, tmp_path)
    for path in (tmp_path, tiny_mllm_dir):  # the nano testbed's checkpoint has preprocessor_config.json
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            FrozenMLLM.from_pretrained(path)
