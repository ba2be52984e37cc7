"""Shared fixtures: a tiny real-architecture MLLM saved with save_pretrained, and tiny IOMM configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mllm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny nano InternVL, saved exactly as a downloaded checkpoint is laid out."""
    from iomm.nano.mllm import build_nano_mllm, save_nano_mllm, tiny_config

    out = tmp_path_factory.mktemp("tiny-mllm")
    cfg = tiny_config()
    model, tokenizer = build_nano_mllm(cfg, seed=0)
    save_nano_mllm(out, model, tokenizer, cfg, {"random_init": True})
    return out


TINY_OVERRIDES = [
    "adapter.num_queries=4", "adapter.num_heads=2",
    "connector.width=32", "connector.num_heads=2", "connector.num_layers=1",
    "generator.num_layers=1", "generator.attention_head_dim=8", "generator.num_attention_heads=2",
    "codec.kind=pixel", "generator.patch_size=4", "masking.prompt='a photo of'", "flow.sample_steps=3",
    "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2",
    "train.mixed_precision=fp32", "train.keep_last=10",
    "data.holdout_pairs=4",  # the held-out pairs' loss at every log step: a few rows keep tiny runs quick
]


@pytest.fixture
def tiny_config(tiny_mllm_dir: Path):
    from iomm.config_checks import load_config

    def make(*overrides: str):
        return load_config(None, [f"mllm.path={tiny_mllm_dir}", *TINY_OVERRIDES, *overrides])

    return make
