"""IOMM-B's MLLM and VAE with random weights, for timing the training step: `bench-b` at their real sizes
(InternVL3-2B's layout, the FLUX.1 VAE's; `scripts/gpu_bench.sh`) and `bench-b-mini` at a size a CPU steps in
seconds (`configs/bench-b-mini.yaml`), whose sizes keep IOMM-B's proportions of MLLM and VAE to generator FLOPs
and of condition to latent tokens (`iomm describe --flops`; bench/README.md). Each is saved with
`save_pretrained` in the config's `nano_dir` on first use and loaded back through the real code path; the
tokenizer is the nano one (what it says does not matter to the step's cost). The lab registers them as built-ins
through the `iomm.builtins` entry-point group (pyproject.toml), as the testbed registers its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iomm.registry import BuiltinModel, Registry

# The mini InternVL, as a NanoMLLMConfig: 224 px / 14 = 16 x 16 patches -> 64 LLM tokens (IOMM-B: 448 px, 256)
MLLM = dict(resolution=224, patch_size=14, vision_width=256, vision_layers=8, vision_heads=4, text_width=512,
            text_layers=8, text_heads=8, text_kv_heads=2, text_mlp_ratio=3.0, max_positions=1024, eval_n=8)
VAE = dict(  # FLUX.1's layout (8x down, 16 channels) at an eighth of its width
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[16, 32, 64, 64],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def mini_mllm_architecture() -> Any:
    from iomm.nano.mllm import NanoMLLMConfig, nano_config

    return nano_config(NanoMLLMConfig(**MLLM))


def ensure_mini_mllm(path: str | Path) -> Path:
    from iomm.nano.mllm import NanoMLLMConfig
    from iomm.nano.mllm_training import ensure_nano_mllm

    return ensure_nano_mllm(path, random_init=True, config=NanoMLLMConfig(**MLLM))


def full_mllm_architecture() -> Any:
    from iomm.footprint import internvl3_2b

    return internvl3_2b()


def ensure_full_mllm(path: str | Path) -> Path:
    """InternVL3-2B's layout with random weights (bf16 on disk: 4 GB), saved in `path` once."""
    from transformers import InternVLForConditionalGeneration

    from iomm.nano.tokenizer import build_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = InternVLForConditionalGeneration(full_mllm_architecture()).to(torch.bfloat16)
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
    return path


def vae_architecture(name: str, resolution: int) -> dict[str, Any]:
    from iomm.footprint import FLUX_VAE

    return {**(VAE if name == "bench-b-mini" else FLUX_VAE), "sample_size": resolution}


def ensure_vae(path: str | Path, name: str, resolution: int) -> Path:
    """A random-init AutoencoderKL of the `name` layout, saved in `path` once."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            AutoencoderKL(**vae_architecture(name, resolution)).save_pretrained(path)
    return path


# builtin name -> the MLLM's (ensure, architecture); each name has a VAE too (`vae_architecture`)
MODELS = {"bench-b-mini": (ensure_mini_mllm, mini_mllm_architecture),
          "bench-b": (ensure_full_mllm, full_mllm_architecture)}


def register(registry: Registry) -> None:
    for name, (ensure_mllm, mllm_architecture) in MODELS.items():
        registry.mllms[name] = BuiltinModel(ensure=lambda cfg, f=ensure_mllm: f(cfg.mllm.nano_dir),
                                            architecture=lambda cfg, f=mllm_architecture: f())
        registry.vaes[name] = BuiltinModel(
            ensure=lambda cfg, n=name: ensure_vae(cfg.codec.nano_dir, n, cfg.data.resolution),
            architecture=lambda cfg, n=name: vae_architecture(n, cfg.data.resolution))
