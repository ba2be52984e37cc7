"""Where in the noise schedule does the generator use its condition? One-step clean-latent predictions.

For held-out world images (the held-out stream, unmasked stage-1 condition), noisy latents
x_t = (1 - t) x + t z are denoised in one step, x0 = x_t - t v(x_t, t, condition), at several t; the
prediction's latent MSE to the image's own latent and to another image's (the previous one) is reported
with the image's own condition and with the null condition. At high t the noisy latent holds little of
the image, so a generator that follows its condition predicts its own image there (own well below
other) and the null condition does not; where both rows agree, the condition is not used.

    cd DIR_WITH_THE_RUN_AND_ITS_CACHE && OMP_NUM_THREADS=1 python -m iomm.lab.bench.probes.denoise \
        --model runs/nano/pretrain --out /work/main/bench/results/denoise_probe/nano_recipe_pretrain.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from iomm.inference.pipeline import load_model
from iomm.lab.bench.probes.report import write_report
from iomm.nano.registration import held_out_scenes

TIMES = (0.98, 0.9, 0.8, 0.7, 0.5, 0.3)


@torch.no_grad()
def probe(model, n: int, seed: int, times: tuple[float, ...] = TIMES) -> dict[str, dict[str, float]]:
    images, _ = held_out_scenes(model.cfg, n)
    cfg = model.cfg
    model.cfg = dataclasses.replace(cfg, masking=dataclasses.replace(cfg.masking, ratio=0.0))
    try:
        cond = model.condition_masked_images(images, torch.Generator().manual_seed(seed))
    finally:
        model.cfg = cfg
    latents = model.codec.encode(images, torch.Generator().manual_seed(seed))
    null = model.null_condition(images.shape[0], cond.tokens.shape[1])
    noise_gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in times:
        noise = torch.randn(latents.shape, generator=noise_gen)
        x_t = (1 - t) * latents + t * noise
        row = {}
        for name, c in (("own", cond), ("null", null)):
            x0 = x_t - t * model.velocity(x_t, torch.full((latents.shape[0],), t), c)
            row[f"{name}_condition_mse_own"] = float(((x0 - latents) ** 2).mean())
            row[f"{name}_condition_mse_other"] = float(((x0 - latents.roll(1, 0)) ** 2).mean())
        out[str(t)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run dir or checkpoint (EMA weights)")
    parser.add_argument("--oracle-arm", default=None, help="a run of iomm.lab.bench.probes.oracle_arms: its arm")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.oracle_arm is not None:
        from iomm.lab.bench.probes.oracle_arms import oracle_model_fn

        model = load_model(args.model, model_fn=oracle_model_fn(args.oracle_arm))
    else:
        model = load_model(args.model)
    result = probe(model, args.n, args.seed)
    write_report(args.out, "denoise", argv, {"cwd": str(Path.cwd()), "model": args.model, "n": args.n,
                                             "seed": args.seed, "times": result})
    print(f"{'t':>5} {'own cond: own':>14} {'other':>7} {'null cond: own':>15} {'other':>7}")
    for t, r in result.items():
        print(f"{t:>5} {r['own_condition_mse_own']:>14.3f} {r['own_condition_mse_other']:>7.3f} "
              f"{r['null_condition_mse_own']:>15.3f} {r['null_condition_mse_other']:>7.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
