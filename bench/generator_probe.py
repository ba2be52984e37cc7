"""Generator-only probe: how fast does the nano MM-DiT learn the world's images, per flow setting?

Trains the generator of configs/nano.yaml unconditionally (a constant null condition, no MLLM) on the
world's image stream, then samples 32 images and counts the objects the shapes scorer detects
(world images hold 2.5 objects on average). This isolates generator capacity and flow settings
from the conditioning path. Example (about 6 minutes on 2 cores):

    python bench/generator_probe.py --steps 1000 --out bench/results/generator_probe/nano
    python bench/generator_probe.py --steps 1000 --set flow.prediction=velocity --set train.lr=3e-4 \
        --out bench/results/generator_probe/velocity_lr3e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iomm.config import load_config
from iomm.data.world import World, captioned_grid
from iomm.evaluation.shapes import detect_objects
from iomm.generator.flow import (
    euler_sample,
    interpolate,
    sample_timesteps,
    velocity_from_sample,
    velocity_target,
)
from iomm.generator.transformer import build_generator
from iomm.model import build_codec
from iomm.nano.mllm import to_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/nano.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. generator.patch_size=2")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=None, help="stop after this much training time instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/generator_probe")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(args.seed)
    codec = build_codec(cfg)
    side = cfg.data.resolution // codec.factor
    gen = build_generator(cfg.generator, in_channels=codec.channels, sample_size=side, cond_width=cfg.connector.width)
    flow = cfg.flow
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cond, pooled = torch.zeros(1, 4, cfg.connector.width), torch.zeros(1, cfg.connector.width)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = gen(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.expand(b, -1, -1),
                  pooled_projections=pooled.expand(b, -1), return_dict=False)[0]
        return velocity_from_sample(x, out, t, flow.min_t) if flow.prediction == "sample" else out

    stream, g, start = World().images(args.seed), torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / cfg.train.warmup_steps)
        x = codec.encode(to_tensor([next(stream)[0] for _ in range(cfg.train.batch_size)]))
        z, t = torch.randn(x.shape, generator=g), sample_timesteps(flow, cfg.train.batch_size, g)
        loss = F.mse_loss(velocity(interpolate(x, z, t), t), velocity_target(x, z))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.train.grad_clip)
        opt.step()
        done = step == args.steps - 1 or (args.seconds is not None and time.time() - start >= args.seconds)
        if step % 100 == 0 or done:
            print(f"step {step}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
        if done:
            break
    train_s = time.time() - start
    gen.eval()
    noise = torch.randn(32, codec.channels, side, side, generator=torch.Generator().manual_seed(args.seed + 1))
    images = codec.decode(euler_sample(velocity, noise, cfg.flow.sample_steps)).mul(255).round()
    images = images.byte().permute(0, 2, 3, 1).numpy()
    counts = [len(detect_objects(im)) for im in images]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captioned_grid(list(images[:16]), [f"{c} found" for c in counts[:16]], scale=3, columns=8).save(out / "samples.png")
    result = {"args": vars(args), "steps_done": step + 1, "train_s": round(train_s, 1), "final_loss": loss.item(),
              "objects_found_mean": float(np.mean(counts)),
              "images_with_an_object": float(np.mean([c > 0 for c in counts]))}
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
