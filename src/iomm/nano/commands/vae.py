"""`iomm vae train`: the nano VAE (a diffusers AutoencoderKL trained on the world)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    vae = subparsers.add_parser("vae", help="the nano VAE: train it on the world and save it as a diffusers dir")
    commands = vae.add_subparsers(dest="vae_command", required=True)
    train = commands.add_parser("train", help="train the nano VAE; writes the AutoencoderKL dir and nano_vae.json")
    train.add_argument("--out", type=Path, required=True, help="output directory (use as codec.path)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 600, about 3.5 min)")
    train.add_argument("--resolution", type=int, default=32)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--tiny", action="store_true", help="a seconds-long toy version (tests, smoke runs)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from iomm.nano.vae import DEFAULT_STEPS, NanoVAEConfig, tiny_config, train_nano_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    config = tiny_config() if args.tiny else NanoVAEConfig()
    config.resolution = args.resolution
    train_nano_vae(args.out, steps=args.steps or DEFAULT_STEPS, seed=args.seed, config=config)
    return 0
