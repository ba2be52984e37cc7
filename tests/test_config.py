"""Configs fail before any compute, naming file, field, expected and got."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iomm.config import ConfigError, finetune_config, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    for name in ("nano", "iomm-b", "iomm-l"):
        cfg = load_config(f"configs/{name}.yaml", check_paths=False)
        assert cfg.train.betas == [0.9, 0.95]
    b = load_config("configs/iomm-b.yaml", check_paths=False)
    assert (b.masking.ratio, b.train.lr, b.train.ema_decay, b.train.grad_clip, b.adapter.num_queries) == (0.85, 1e-4, 0.999, 1.0, 256)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = _write(tmp_path, "masking:\n  ratoi: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "masking.ratoi" in str(err.value) and "did you mean 'ratio'" in str(err.value)


@pytest.mark.parametrize("override, field, expected", [
    ("masking.ratio=1.0", "masking.ratio", "[0, 1)"),
    ("masking.ratio=-0.1", "masking.ratio", "[0, 1)"),
    ("train.mix_ratio=1.5", "train.mix_ratio", "[0, 1]"),
    ("train.cond_dropout=1.0", "train.cond_dropout", "[0, 1)"),
    ("data.resolution=31", "data.resolution", "divisible"),
    ("train.steps=abc", "train.steps", "an integer"),
    ("train.batch_size=2.5", "train.batch_size", "an integer"),
    ("masking.mode=random", "masking.mode", "'zero', 'drop'"),
    ("adapter.kind=mlp", "adapter.kind", "'rqa'"),
    ("train.mixed_precision=no", "train.mixed_precision", "'fp32', 'bf16'"),
    ("mllm.path=/nonexistent/model", "mllm.path", "existing local model directory"),
    ("data.pairs=/nonexistent.jsonl", "data.pairs", "existing JSONL"),
    ("train.mix_ratio=0.5", "data.pairs", "pair source"),
])
def test_bad_values_fail_with_field_expected_and_got(override, field, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override] + (["data.pairs=null"] if field == "data.pairs" and "mix" in override else []))
    assert err.value.field_path == field and expected in err.value.expected


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
                       st.one_of(st.integers(-5, 600), st.floats(-2, 2), st.just(float("nan")), st.just(float("inf")), st.text(max_size=5),
                                 st.booleans(), st.none()), max_size=4))
def test_any_value_loads_or_fails_with_a_config_error(values):
    overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()] + ["data.pairs=world:5"]
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert err.field_path and err.expected
