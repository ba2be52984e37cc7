"""`iomm eval compare`: a paired difference of two evaluations of the same items, with a 95% interval
(`iomm.evaluation.paired`). It reads the per-image files of `iomm eval shapes --results` (one record per
generated image: category `tag`, cluster `prompt`, value `correct`) or `iomm eval reconstruct --results`
(category `ratio`, cluster `scene`, value `exact` or any other attribute).

Records of a category that only one file holds (the nano world's held-out compositions, scored since a later
revision) are left out, with a message and a `left_out` entry in the report; the rest must match item by item.

One file per arm compares two trained models: the interval covers prompts and images, not the training draw.
Several runs per arm (files A1 B1 A2 B2 ..., one pair per training seed, or records carrying their seed in
`--seed-field`) compare the recipes: decided at the level of training runs (`seed_bootstrap`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

SHAPES_FIELDS = {"category": "tag", "cluster": "prompt", "value": "correct"}
RECONSTRUCT_FIELDS = {"category": "ratio", "cluster": "scene", "value": "exact"}
# The nano world's held-out compositions are scored on their own, not in GenEval's overall.
SHAPES_OUTSIDE_OVERALL = ["compositions"]
ONE_RUN_SCOPE = "one training run per arm: the interval covers prompts and images, so it is about these two models"
SEED_SCOPE = "training runs: hierarchical bootstrap over seeds, prompts and images, and a t-interval over seeds"


def register_under(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="paired difference (B - A) of per-image result files, with a 95%% "
                                            "interval; several runs per arm are compared at the level of seeds")
    p.add_argument("files", type=Path, nargs="+", metavar="A B",
                   help="per-image results JSONL of the baseline (A) and of the arm compared with it (B); "
                        "repeat A B once per training seed (A1 B1 A2 B2 ...) to compare at the level of runs")
    p.add_argument("--seed-field", default=None,
                   help="field holding each record's training seed: its runs are compared at the level of seeds")
    p.add_argument("--value", default=None, help="field compared (default: correct, or exact for reconstruct)")
    p.add_argument("--category", default=None, help="field that groups items (default: tag, or ratio)")
    p.add_argument("--cluster", default=None, help="field of the resampled unit (default: prompt, or scene)")
    p.add_argument("--outside-overall", action="append", default=None, metavar="CATEGORY",
                   help="a category scored on its own, outside overall (repeatable; default: compositions for "
                        "shapes results, none otherwise)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="comparison JSON file")
    p.set_defaults(func=_compare)


def read_records(path: Path) -> list[dict[str, Any]]:
    from iomm.evaluation.prompt_images import read_jsonl

    try:
        records = [record for _, record in read_jsonl(path)]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"eval compare: {error}") from None
    if not records:
        raise SystemExit(f"eval compare: {path} holds no records")
    return records


def format_table(result: dict[str, Any]) -> str:
    seeds = "t_ci95" in next(iter(result.values()))
    rows = [f"{'category':<16}{'n':>6}{'A':>8}{'B':>8}{'B - A':>8}{'95% interval':>20}"
            + (f"{'t over seeds':>20}" if seeds else "") + "  verdict"]
    for name, s in result.items():
        interval = f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
        t_ci = s.get("t_ci95")
        t_text = f"[{t_ci[0]:+.3f}, {t_ci[1]:+.3f}]" if t_ci else "-"
        rows.append(f"{name:<16}{s['n']:>6}{s['a']:>8.3f}{s['b']:>8.3f}{s['diff']:>+8.3f}{interval:>20}"
                    + (f"{t_text:>20}" if seeds else "") + f"  {s['verdict']}")
    return "\n".join(rows)


def _compare(args: argparse.Namespace) -> int:
    from iomm.evaluation.paired import pair_records, pair_runs, paired_bootstrap, seed_bootstrap, shared_categories
    from iomm.training.hardware import machine_facts

    if len(args.files) % 2:
        raise SystemExit(f"eval compare: expected result files in pairs A B (one pair per training seed), "
                         f"got {len(args.files)} files")
    pairs = [(args.files[i], args.files[i + 1]) for i in range(0, len(args.files), 2)]
    records = [(read_records(a), read_records(b)) for a, b in pairs]
    defaults = SHAPES_FIELDS if "correct" in records[0][0][0] else RECONSTRUCT_FIELDS
    fields = {key: getattr(args, key) or default for key, default in defaults.items()}
    left_out: dict[str, dict[str, str]] = {}
    for index, ((a, b), (path_a, path_b)) in enumerate(zip(records, pairs)):
        a, b, missing = shared_categories(a, b, fields["category"])
        if not a:
            raise SystemExit(f"eval compare: {path_a} and {path_b} share no {fields['category']!r} value: "
                             f"{', '.join(missing)}")
        if missing:
            records[index] = (a, b)
            left_out[f"{path_a} vs {path_b}"] = missing
            print(f"eval compare: {path_a} vs {path_b}: compared on the {fields['category']!r} values both hold; "
                  f"left out: {', '.join(f'{name} ({where})' for name, where in missing.items())}")
    outside = args.outside_overall if args.outside_overall is not None else (
        SHAPES_OUTSIDE_OVERALL if defaults is SHAPES_FIELDS else [])
    by_seeds = len(pairs) > 1 or args.seed_field is not None
    try:
        if by_seeds:
            runs: dict[str, Any] = {}
            for (a, b), (path_a, path_b) in zip(records, pairs):
                if args.seed_field is None:
                    runs[f"{path_a} vs {path_b}"] = pair_records(a, b, fields["value"], fields["category"],
                                                                 fields["cluster"])
                    continue
                for seed, items in pair_runs(a, b, fields["value"], fields["category"], fields["cluster"],
                                             args.seed_field).items():
                    if seed in runs:
                        raise ValueError(f"seed {seed!r} appears in more than one pair of files")
                    runs[seed] = items
            result = seed_bootstrap(runs, n_boot=args.n_boot, seed=args.seed, outside_overall=outside)
        else:
            items = pair_records(*records[0], fields["value"], fields["category"], fields["cluster"])
            result = paired_bootstrap(items, n_boot=args.n_boot, seed=args.seed, outside_overall=outside)
    except ValueError as error:
        raise SystemExit(f"eval compare: {' '.join(map(str, args.files))}: {error}") from None
    seed_field = ["--seed-field", args.seed_field] if args.seed_field else []
    command = ["iomm", "eval", "compare", *map(str, args.files), *[f"--{k}={v}" for k, v in fields.items()],
               *seed_field, *[f"--outside-overall={c}" for c in outside], "--n-boot", str(args.n_boot),
               "--seed", str(args.seed), "--out", str(args.out)]
    report = {"command": shlex.join(command), "machine": machine_facts(), "a": [str(a) for a, _ in pairs],
              "b": [str(b) for _, b in pairs], **fields, "seed_field": args.seed_field, "outside_overall": outside,
              "left_out": left_out, "n_boot": args.n_boot, "unit": SEED_SCOPE if by_seeds else ONE_RUN_SCOPE,
              "results": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(result))
    print(f"unit of comparison: {report['unit']}")
    print(f"wrote {args.out}")
    return 0
