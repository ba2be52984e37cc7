"""Plain logs (no terminal, or --no-progress) hold iomm's own lines: no other library's progress bars, none of
the warnings known to be harmless here."""

import os
import subprocess
import sys

import pytest

from iomm.training.trainer import Trainer

LORA = ("train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=4", "data.pairs=world:16",
        "train.mix_ratio=0.5")
NOISE = ("Loading weights", "Writing model shards", "requires torchvision", "it/s]")


def test_a_lora_export_logged_to_a_file_holds_only_iomms_own_lines(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=2", "train.mix_ratio=0", "data.pairs=world:16"), tmp_path / "existing",
            progress=False).fit()
    Trainer(tiny_config("train.steps=2", *LORA), tmp_path / "lora", init=tmp_path / "existing", progress=False).fit()
    done = subprocess.run([sys.executable, "-m", "iomm.cli", "export", "--model", str(tmp_path / "lora"),
                           "--out", str(tmp_path / "export"), "--lora"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "exported EMA weights to" in log
    assert not [noise for noise in NOISE if noise in log], log


@pytest.mark.parametrize(("env", "level"), [({"RANK": "1"}, "ERROR"), ({"RANK": "0"}, None), ({}, None),
                                            ({"RANK": "1", "TORCH_CPP_LOG_LEVEL": "INFO"}, "INFO")])
def test_only_rank_0_of_a_launch_prints_torchs_cpp_warnings(env, level):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "TORCH_CPP_LOG_LEVEL")}
    code = "import os, iomm; print(os.environ.get('TORCH_CPP_LOG_LEVEL'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(level)
