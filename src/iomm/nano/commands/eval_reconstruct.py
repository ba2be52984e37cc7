"""`iomm eval reconstruct`: does stage 1 carry the image? Held-out world images regenerated from their own
masked stage-1 condition, judged against their scene metadata (`iomm.nano.fidelity`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any


def register_under(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("reconstruct", help="regenerate held-out world images from their own masked "
                                                "stage-1 condition and score them against their scenes")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_CKPT")
    p.add_argument("--ratio", type=float, nargs="+", default=None, metavar="R",
                   help="masking ratios in [0, 1) (default: 0 and the run's masking.ratio)")
    p.add_argument("--n", type=int, default=64, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="masks and sampling noise")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: config)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: the run's flow.reconstruct_guidance_scale, else flow.guidance_scale)")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON file")
    p.add_argument("--results", type=Path, default=None,
                   help="also write per-image records (JSONL: ratio, scene, attributes; for iomm eval compare)")
    p.set_defaults(func=_reconstruct)


def format_table(ratios: dict[str, dict[str, Any]]) -> str:
    from iomm.nano.fidelity import ATTRIBUTES

    keys = (*ATTRIBUTES, "mse_own", "mse_other")
    rows = [f"{'ratio':<8}" + "".join(f"{k:>11}" for k in keys)]
    rows += [f"{ratio:<8}" + "".join(f"{m[k]:>11.4f}" for k in keys) for ratio, m in ratios.items()]
    return "\n".join(rows)


def _reconstruct(args: argparse.Namespace) -> int:
    from iomm.evaluation.prompt_images import write_jsonl
    from iomm.inference.pipeline import load_model
    from iomm.nano.fidelity import TOLERANCE, tolerance_px
    from iomm.nano.reconstruction import reconstruction_guidance, reconstruction_records, summaries
    from iomm.nano.registration import WORLD

    if args.n < 1:
        raise SystemExit(f"--n: expected >= 1, got {args.n}")
    for ratio in args.ratio or []:
        if not 0.0 <= ratio < 1.0:
            raise SystemExit(f"--ratio: expected values in [0, 1), got {ratio}")
    model = load_model(args.model)
    if model.cfg.data.source != WORLD:
        raise SystemExit(f"eval reconstruct: {args.model} was trained on data.source={model.cfg.data.source!r}; "
                         f"the scene metadata this needs exists for data.source={WORLD!r} only")
    records = reconstruction_records(model, args.ratio, args.n, args.seed, steps=args.steps, guidance_scale=args.cfg)
    ratios = {str(ratio): metrics for ratio, metrics in summaries(records).items()}
    options = [("--steps", args.steps), ("--cfg", args.cfg), ("--out", args.out), ("--results", args.results)]
    command = ["iomm", "eval", "reconstruct", "--model", str(args.model), "--n", str(args.n), "--seed", str(args.seed),
               *[arg for ratio in args.ratio or [] for arg in ("--ratio", str(ratio))],
               *[arg for flag, value in options if value is not None for arg in (flag, str(value))]]
    report = {"command": shlex.join(command), "model": str(args.model), "n": args.n,
              "steps": args.steps or model.cfg.flow.sample_steps,
              "guidance_scale": reconstruction_guidance(model.cfg, args.cfg), "ratios": ratios,
              "tolerance": {"fraction_of_extent": TOLERANCE, "px": tolerance_px(model.cfg.data.resolution)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.results is not None:
        write_jsonl(args.results, ({"ratio": str(ratio), **r} for ratio, rows in records.items() for r in rows))
    print(format_table(ratios))
    print(f"wrote {args.out}")
    return 0
