"""Configs fail before any compute, naming file, field, expected and got."""

import dataclasses
import json
import typing
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iomm.config import Config, ConfigError
from iomm.config_checks import finetune_config, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


CONFIGS = Path(str(resources.files("iomm") / "configs"))  # the packaged configs, wherever pytest runs from


def test_shipped_configs_load():
    for name in ("nano", "smoke", "iomm-b", "iomm-l"):
        cfg = load_config(CONFIGS / f"{name}.yaml", check_paths=False)
        assert cfg.train.betas == [0.9, 0.95]
    b = load_config(CONFIGS / "iomm-b.yaml", check_paths=False)
    assert (b.masking.ratio, b.train.lr, b.train.ema_decay, b.train.grad_clip, b.adapter.num_queries) == (
        0.85, 1e-4, 0.999, 1.0, 256)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = _write(tmp_path, "masking:\n  ratoi: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert (str(path) in str(err.value) and "masking.ratoi" in str(err.value)
            and "did you mean 'ratio'" in str(err.value))


@pytest.mark.parametrize("overrides, field, expected, got", [
    (["masking.ratio=1.0"], "masking.ratio", "[0, 1)", 1.0),
    (["masking.ratio=-0.1"], "masking.ratio", "[0, 1)", -0.1),
    (["train.mix_ratio=1.5"], "train.mix_ratio", "[0, 1]", 1.5),
    (["train.mix_ratio=-0.5", "data.pairs=world:4"], "train.mix_ratio", "[0, 1]", -0.5),
    (["train.cond_dropout=1.0"], "train.cond_dropout", "[0, 1)", 1.0),
    (["data.resolution=31"], "data.resolution", "divisible", 31),
    (["train.steps=abc"], "train.steps", "an integer", "abc"),
    (["train.batch_size=2.5"], "train.batch_size", "an integer", 2.5),
    (["train.betas=0.9"], "train.betas", "a list of float", 0.9),
    (["mllm.trust_remote_code=yes please"], "mllm.trust_remote_code", "a boolean", "yes please"),
    (["masking=3"], "masking", "a mapping", 3),
    (["masking.mode=random"], "masking.mode", "'zero', 'drop'", "random"),
    (["adapter.kind=mlp"], "adapter.kind", "'rqa'", "mlp"),
    (["train.mixed_precision=fp16"], "train.mixed_precision", "'fp32', 'bf16'", "fp16"),
    (["mllm.path=/nonexistent/model"], "mllm.path", "existing local model directory", "/nonexistent/model"),
    (["codec.kind=vae", "codec.path=/nonexistent/vae", "data.resolution=64"], "codec.path", "AutoencoderKL",
     "/nonexistent/vae"),
    (["generator.pretrained=/nonexistent/g"], "generator.pretrained", "existing directory", "/nonexistent/g"),
    (["data.source=folder", "data.path=/nonexistent/i"], "data.path", "existing image folder", "/nonexistent/i"),
    (["data.pairs=/nonexistent.jsonl"], "data.pairs", "existing JSONL", "/nonexistent.jsonl"),
    (["train.mix_ratio=0.5", "data.pairs=null"], "data.pairs", "pair source", None),
])
def test_bad_values_fail_with_field_expected_and_got(overrides, field, expected, got):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.field_path == field and expected in err.value.expected
    assert err.value.got == got
    assert str(err.value).startswith(f"<defaults> with --set {' '.join(overrides)}: field '{field}': expected ")


def test_errors_in_a_file_name_the_file_field_expected_and_got(tmp_path):
    path = _write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: field 'train.lr': expected a number, got 'fast'"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: field '<file>': expected valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="an existing YAML file"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_section_suggests_the_close_one():
    with pytest.raises(ConfigError, match="field 'mlm': expected a known key \\(did you mean 'mllm'\\?\\)"):
        load_config(None, ["mlm.path=nano"])


def test_vae_factor_in_resolution_check():
    with pytest.raises(ConfigError, match="codec factor x patch size = 16"):
        load_config(None, ["codec.kind=vae", "data.resolution=520"], check_paths=False)


def test_remote_code_model_needs_the_opt_in(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(None, [f"mllm.path={model}"])
    assert load_config(None, [f"mllm.path={model}", "mllm.trust_remote_code=true"]).mllm.trust_remote_code


def test_finetune_config_takes_stage2_fields():
    cfg = finetune_config(load_config(None, ["data.pairs=world:10", "finetune.steps=7", "finetune.lr=0.001"]))
    assert (cfg.train.steps, cfg.train.mix_ratio, cfg.train.lr) == (7, 0.5, 0.001)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["masking.ratio", "train.mix_ratio", "train.cond_dropout", "data.resolution",
                                        "train.steps", "train.lr", "adapter.num_queries", "generator.patch_size"]),
                       st.one_of(st.integers(-5, 600), st.floats(-2, 2), st.just(float("nan")), st.just(float("inf")),
                                 st.text(max_size=5), st.booleans(), st.none()), max_size=4))
def test_any_value_loads_or_fails_with_a_config_error(values):
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()] + ["data.pairs=world:5"]
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert err.field_path and err.expected


@pytest.mark.parametrize("override, field", [
    ("train.checkpoint_every=0", "train.checkpoint_every"),  # these would stop a run mid-way (ZeroDivisionError)
    ("train.log_every=0", "train.log_every"),
    ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.decay_fraction=1.5", "train.decay_fraction"),
    ("train.threads=-2", "train.threads"),
    ("train.lr=.inf", "train.lr"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("data.num_workers=-1", "data.num_workers"),
    ("flow.sample_steps=0", "flow.sample_steps"),
    ("flow.logit_std=0", "flow.logit_std"),
    ("flow.guidance_scale=-1", "flow.guidance_scale"),
    ("flow.reconstruct_guidance_scale=nan", "flow.reconstruct_guidance_scale"),
    ("connector.num_heads=0", "connector.num_heads"),  # was a ZeroDivisionError inside the value checks
    ("generator.num_layers=0", "generator.num_layers"),
    ("codec.kind=vae", "codec.path"),  # was a traceback from inside diffusers
    ("data.pairs=world:\u00b2", "data.pairs"),  # '²'.isdigit() but int('²') raises
    ("data.pairs=" + "x" * 5000, "data.pairs"),  # File name too long
    ("mllm.path=" + "x" * 5000, "mllm.path"),
    ("train.betas=[0.9", "train.betas"),  # not YAML
    ("masking.prompt=\x00", "masking.prompt"),  # YAML refuses control characters
])
def test_values_that_would_crash_a_run_fail_before_any_compute(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.pairs=world:4", override])
    assert err.value.field_path == field and err.value.expected


@pytest.mark.parametrize("override, field", [
    ("generator.block_out_channels=[48]", "generator.block_out_channels"),  # GroupNorm needs multiples of 32
    ("generator.block_out_channels=[]", "generator.block_out_channels"),
    ("generator.layers_per_block=0", "generator.layers_per_block"),
    ("data.resolution=33", "data.resolution"),  # two levels halve the side once
])
def test_unet_generator_settings_are_checked_before_any_compute(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["generator.kind=unet", "generator.block_out_channels=[32,64]", "codec.kind=pixel", override])
    assert err.value.field_path == field and err.value.expected


def _leaves(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    return [leaf for f in dataclasses.fields(cls) for leaf in (
        _leaves(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name])]


_values = st.one_of(
    st.integers(-5, 600), st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=8),
    st.text(min_size=250, max_size=300), st.lists(st.floats(-1, 2), max_size=3),
    st.sampled_from(["nano", "world:3", "world:0", "world:\u00b2", "vae", "folder", "rqa", "bf16", ".", "/"]),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(_leaves(Config)), _values, max_size=4), st.text(max_size=6))
def test_any_value_of_any_field_loads_or_fails_with_a_config_error(values, raw):
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()] + [f"train.seed={raw}"]
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert err.field_path and err.expected
