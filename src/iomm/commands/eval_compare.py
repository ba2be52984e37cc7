"""`iomm eval compare`: a paired difference of two evaluations of the same items, with a 95% bootstrap interval
(`iomm.evaluation.paired`). It reads the per-image files of `iomm eval shapes --results` (one record per
generated image: category `tag`, cluster `prompt`, value `correct`) or `iomm eval reconstruct --results`
(category `ratio`, cluster `scene`, value `exact` or any other attribute)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

SHAPES_FIELDS = {"category": "tag", "cluster": "prompt", "value": "correct"}
RECONSTRUCT_FIELDS = {"category": "ratio", "cluster": "scene", "value": "exact"}


def register_under(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="paired difference (B - A) of two per-image result files, "
                                            "with a 95%% bootstrap interval over prompts (or scenes) and samples")
    p.add_argument("a", type=Path, help="per-image results JSONL of the baseline")
    p.add_argument("b", type=Path, help="per-image results JSONL of the arm compared with it")
    p.add_argument("--value", default=None, help="field compared (default: correct, or exact for reconstruct)")
    p.add_argument("--category", default=None, help="field that groups items (default: tag, or ratio)")
    p.add_argument("--cluster", default=None, help="field of the resampled unit (default: prompt, or scene)")
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
    rows = [f"{'category':<16}{'n':>6}{'A':>8}{'B':>8}{'B - A':>8}{'95% interval':>20}  verdict"]
    for name, s in result.items():
        interval = f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
        rows.append(f"{name:<16}{s['n']:>6}{s['a']:>8.3f}{s['b']:>8.3f}{s['diff']:>+8.3f}{interval:>20}"
                    f"  {s['verdict']}")
    return "\n".join(rows)


def _compare(args: argparse.Namespace) -> int:
    from iomm.evaluation.paired import pair_records, paired_bootstrap

    a, b = read_records(args.a), read_records(args.b)
    defaults = SHAPES_FIELDS if "correct" in a[0] else RECONSTRUCT_FIELDS
    fields = {key: getattr(args, key) or default for key, default in defaults.items()}
    try:
        items = pair_records(a, b, fields["value"], fields["category"], fields["cluster"])
        result = paired_bootstrap(items, n_boot=args.n_boot, seed=args.seed)
    except ValueError as error:
        raise SystemExit(f"eval compare: {args.a} vs {args.b}: {error}") from None
    command = ["iomm", "eval", "compare", str(args.a), str(args.b), *[f"--{k}={v}" for k, v in fields.items()],
               "--n-boot", str(args.n_boot), "--seed", str(args.seed), "--out", str(args.out)]
    report = {"command": shlex.join(command), "a": str(args.a), "b": str(args.b), **fields,
              "n_boot": args.n_boot, "results": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0
