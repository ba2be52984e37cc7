"""The nano VAE: trained on the world, saved as a diffusers AutoencoderKL, loaded like SD3's VAE."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from iomm.config import ConfigError
from iomm.config_checks import codec_factor, load_config
from iomm.generator.codec import VAECodec
from iomm.inference.pipeline import IOMMPipeline, load_model
from iomm.nano.vae import NanoVAEConfig, ensure_nano_vae, train_nano_vae
from iomm.nano.vae import tiny_config as tiny_vae_config
from iomm.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return train_nano_vae(tmp_path_factory.mktemp("vae"), steps=2, config=tiny_vae_config(), progress=False)


def test_saved_nano_vae_loads_through_the_checkpoint_path_with_measured_statistics(tiny_vae_dir):
    meta = json.loads((tiny_vae_dir / "nano_vae.json").read_text())
    assert meta["steps"] == 2 and 0.0 <= meta["reconstruction"]["scorer_exact"] <= 1.0
    codec = VAECodec.from_pretrained(tiny_vae_dir)
    assert (codec.factor, codec.channels) == (2, 4)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = codec.encode(images, torch.Generator().manual_seed(1))
    assert latents.shape == (3, 4, 16, 16)
    raw = codec.vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(1))
    assert torch.allclose(latents, (raw - codec.shift) * codec.scale)
    assert codec.scale != AutoencoderKL().config.scaling_factor  # measured, not the SD default
    assert codec.decode(latents).shape == images.shape


def test_codec_can_train_on_the_posterior_mean(tiny_vae_dir):
    codec = VAECodec.from_pretrained(tiny_vae_dir, sample_posterior=False)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = codec.encode(images, torch.Generator().manual_seed(1))
    assert torch.equal(latents, codec.encode(images, torch.Generator().manual_seed(2)))
    mean = codec.vae.encode(images * 2 - 1).latent_dist.mean
    assert torch.allclose(latents, (mean - codec.shift) * codec.scale)
    sampled = VAECodec.from_pretrained(tiny_vae_dir).encode(images, torch.Generator().manual_seed(1))
    assert not torch.allclose(latents, sampled)


def test_ensure_reuses_a_built_vae_and_refuses_another_resolution(tiny_vae_dir):
    assert ensure_nano_vae(tiny_vae_dir, resolution=32) == tiny_vae_dir
    with pytest.raises(ValueError, match="trained at 32 px, but data.resolution is 64"):
        ensure_nano_vae(tiny_vae_dir, resolution=64)


def test_codec_factor_comes_from_the_vae_config(tiny_vae_dir, tmp_path):
    nano_default = 2 ** (len(NanoVAEConfig().block_out_channels) - 1)
    assert codec_factor(load_config(None, ["codec.kind=vae", "codec.path=nano", f"codec.nano_dir={tmp_path}"])) \
        == nano_default
    assert codec_factor(load_config(None, ["codec.kind=vae", f"codec.path={tiny_vae_dir}"])) == 2
    with pytest.raises(ConfigError, match="divisible by the codec factor x patch size = 8"):
        load_config(None, ["codec.kind=vae", f"codec.path={tiny_vae_dir}", "generator.patch_size=4",
                           "data.resolution=36"])


def test_training_and_sampling_in_vae_latents(tiny_config, tiny_vae_dir, tmp_path):
    cfg = ("codec.kind=vae", f"codec.path={tiny_vae_dir}", "generator.patch_size=2", "train.steps=2")
    trainer = Trainer(tiny_config(*cfg), tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.model.generator.config.in_channels == 4
    assert trainer.model.generator.config.sample_size == 16
    images = IOMMPipeline.from_model(load_model(tmp_path / "run"))("a photo of a red circle", num_inference_steps=2)
    assert images.images[0].size == (32, 32)


def test_a_nano_vae_of_another_resolution_fails_the_config_before_any_compute(tiny_vae_dir):
    with pytest.raises(ConfigError, match="codec.nano_dir.*built for 32 px"):
        load_config(None, ["codec.kind=vae", "codec.path=nano", f"codec.nano_dir={tiny_vae_dir}",
                           "data.resolution=64"])
