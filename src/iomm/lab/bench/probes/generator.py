"""Generator-only probe: how fast does the nano generator learn the world's images, per flow setting?

`--condition none`: trains the generator of configs/nano.yaml unconditionally (a constant null
condition, no MLLM) on the world's image stream, then samples 32 images and counts the objects the
shapes scorer detects (world images hold 2.5 objects on average).

`--condition caption` (the text oracle): the same generator conditioned on captions through a small
trainable word-level text encoder instead of the frozen MLLM and adapter, on an unlimited stream of
captioned scenes (held-out combinations excluded, as in the pair set), then scored with GenEval-shapes
on the held-out prompts. It bounds what the generator can learn at a given budget when the condition
is clean and trained end to end, so it separates generator limits from conditioning-path limits.

Both isolate generator capacity and flow settings from the MLLM. Examples (about 6 minutes on 2 cores):

    python -m iomm.lab.bench.probes.generator --steps 1000 --out bench/results/generator_probe/nano
    python -m iomm.lab.bench.probes.generator --steps 1000 --condition caption \
        --out bench/results/generator_probe/oracle
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from iomm.config_checks import load_config
from iomm.generator.flow import TIMESTEP_SCALE, euler_sample, flow_matching_loss, output_to_velocity
from iomm.generator.network import build_generator, run_generator
from iomm.image_tensors import captioned_grid, to_tensor, to_uint8
from iomm.model import build_codec
from iomm.nano.prompts import eval_prompts
from iomm.nano.scorer import detect_objects, judge, score
from iomm.nano.world import World
from iomm.training.optimizers import lr_factor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/nano.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. generator.patch_size=2")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=None, help="stop after this much training time instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--condition", choices=("none", "caption"), default="none",
                   help="caption: condition on captions through a small trainable text encoder (the text oracle)")
    p.add_argument("--per-category", type=int, default=32, help="held-out prompts per category (--condition caption)")
    p.add_argument("--out", default="bench/results/generator_probe")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(args.seed)
    codec = build_codec(cfg)
    side = cfg.data.resolution // codec.factor
    gen = build_generator(cfg.generator, in_channels=codec.channels, sample_size=side, cond_width=cfg.connector.width)
    flow = cfg.flow
    encoder = CaptionEncoder(cfg.connector.width) if args.condition == "caption" else None
    params = [*gen.parameters(), *(encoder.parameters() if encoder else [])]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    null = torch.zeros(1, 4, cfg.connector.width)

    def velocity(x: torch.Tensor, t: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        cond = encoder(texts) if encoder else null.expand(x.shape[0], -1, -1)
        out = run_generator(gen, x, t * TIMESTEP_SCALE, cond, cond.mean(1))
        return output_to_velocity(flow, x, out, t)

    world = World()
    stream = world.images(args.seed)
    g, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(step, steps=args.steps, warmup=cfg.train.warmup_steps,
                                                   decay_fraction=cfg.train.decay_fraction)
        if encoder:
            pairs = world.pairs(cfg.train.batch_size, seed=args.seed * 1_000_003 + step)
            images, texts = [image for image, _, _ in pairs], [caption for _, caption, _ in pairs]
        else:
            images, texts = [next(stream)[0] for _ in range(cfg.train.batch_size)], None
        x = codec.encode(to_tensor(images))
        loss = flow_matching_loss(lambda x_t, t: velocity(x_t, t, texts), x, flow, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        done = step == args.steps - 1 or (args.seconds is not None and time.time() - start >= args.seconds)
        if step % 100 == 0 or done:
            print(f"step {step}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
        if done:
            break
    train_s = time.time() - start
    gen.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if encoder:
        encoder.eval()
        result = {"args": vars(args), "steps_done": step + 1, "train_s": round(train_s, 1), "final_loss": loss.item(),
                  "geneval_shapes": oracle_eval(velocity, codec, side, cfg, args, out)}
        (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(json.dumps({k: v for k, v in result["geneval_shapes"].items() if isinstance(v, float)}))
        return
    noise = torch.randn(32, codec.channels, side, side, generator=torch.Generator().manual_seed(args.seed + 1))
    images = to_uint8(codec.decode(euler_sample(velocity, noise, cfg.flow.sample_steps)))
    counts = [len(detect_objects(im)) for im in images]
    captioned_grid(list(images[:16]), [f"{c} found" for c in counts[:16]], scale=3, columns=8).save(out / "samples.png")
    result = {"args": vars(args), "steps_done": step + 1, "train_s": round(train_s, 1), "final_loss": loss.item(),
              "objects_found_mean": float(np.mean(counts)),
              "images_with_an_object": float(np.mean([c > 0 for c in counts]))}
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps(result))


class CaptionEncoder(torch.nn.Module):
    """Word embeddings + positions + a 2-layer transformer: a clean condition trained with the generator."""

    def __init__(self, width: int, vocab: int = 256, max_words: int = 32):
        super().__init__()
        self.words: dict[str, int] = {}
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(max_words, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, "gelu", batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [[self.words.setdefault(w, len(self.words) + 1) % self.vocab for w in t.split()] for t in texts]
        tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row)
        x = self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]], src_key_padding_mask=tokens == 0)
        return x * (tokens != 0).unsqueeze(-1)


@torch.no_grad()
def oracle_eval(velocity, codec, side: int, cfg, args: argparse.Namespace, out: Path) -> dict:
    """GenEval-shapes on the held-out prompts, one image each, fixed noise; a grid of the first 32."""
    prompts, results, images = eval_prompts(args.per_category, seed=0), [], []
    g = torch.Generator().manual_seed(args.seed + 1)
    for i in range(0, len(prompts), 64):
        batch = prompts[i: i + 64]
        texts = [meta["prompt"] for meta in batch]
        noise = torch.randn(len(batch), codec.channels, side, side, generator=g)
        decoded = codec.decode(euler_sample(lambda x, t: velocity(x, t, texts), noise, cfg.flow.sample_steps))
        batch_images = to_uint8(decoded)
        images += list(batch_images)
        results += [(meta, judge(image, meta)[0]) for meta, image in zip(batch, batch_images)]
    captioned_grid(images[:32], [meta["prompt"].removeprefix("a photo of ") for meta in prompts[:32]],
                   scale=3, columns=8).save(out / "samples.png")
    return score(results)


if __name__ == "__main__":
    main()
