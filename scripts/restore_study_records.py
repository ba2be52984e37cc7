"""Restore a study's scored runs from its committed result files, so that `iomm study` resumes from them.

    .venv/bin/python scripts/restore_study_records.py docs/results/pair-budget runs/pair-budget

For every arm and seed in RESULTS/results.json (or partial.json, written by `--arms`) with a per-image record file
(RESULTS/per_image/NAME_seedS.jsonl.gz, NAME the arm with "@N=" written "_N" and "@" written "_"), it writes
RUN/ARM/seedS/results.jsonl and metrics.json (the row's scores). `iomm study` counts such an arm as scored, skips
the pre-training only it needed, and compares it with the arms it trains. A study's runs do not outlive the machine
they ran on; its per-image records do.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from iomm.lab.studies import Arm, arm_dir

ROW_LABELS = ("arm", "seed", "method", "budget")


def record_name(arm: str, seed: int) -> str:
    return f"{arm.replace('@N=', '_N').replace('@', '_')}_seed{seed}.jsonl.gz"


def restore(results_dir: Path, run_dir: Path) -> list[Path]:
    name = "results.json" if (results_dir / "results.json").is_file() else "partial.json"  # a group of arms
    record = json.loads((results_dir / name).read_text(encoding="utf-8"))
    restored = []
    for row in record["results"]:
        source = results_dir / "per_image" / record_name(row["arm"], row["seed"])
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no per-image records for arm {row['arm']!r} seed {row['seed']}")
        target = arm_dir(run_dir, Arm(row["arm"])) / f"seed{row['seed']}"
        if (target / "metrics.json").is_file():
            raise FileExistsError(f"{target}/metrics.json exists: restore into a new run directory")
        target.mkdir(parents=True)
        (target / "results.jsonl").write_bytes(gzip.decompress(source.read_bytes()))
        scores = {key: value for key, value in row.items() if key not in ROW_LABELS}
        (target / "metrics.json").write_text(json.dumps({**scores, "restored_from": str(source)}, indent=1),
                                             encoding="utf-8")
        restored.append(target)
    return restored


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    for path in restore(Path(sys.argv[1]), Path(sys.argv[2])):
        print(f"restored {path}")
