#!/usr/bin/env bash
# A cold run of the main command: a fresh clone of HEAD (no .venv, no .cache, no runs), `bash scripts/nano.sh`
# timed as a whole (setup included), its artefacts published with scripts/publish_nano_results.sh, and
# cold_run.json naming the command, the commit, the wall time and the machine.
#   bash scripts/cold_run.sh [OUT_DIR]      (default docs/results/nano-recipe)
# Run it alone: another job on the same cores changes the time, not the model.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out=$(realpath -m "${1:-docs/results/nano-recipe}")
work=$(mktemp -d /tmp/iomm-cold.XXXXXX)
git clone -q . "$work/iomm"
commit=$(git rev-parse --short HEAD)
start=$(date +%s)
(cd "$work/iomm" && bash scripts/nano.sh --no-progress) 2>&1 | tee "$work/log.txt"
wall=$(( $(date +%s) - start ))
# the figure goes to this checkout, not to the temporary clone
(cd "$work/iomm" && bash scripts/publish_nano_results.sh runs/nano "$out" "$repo/docs/images/nano_reconstructions.png")
cp "$work/log.txt" "$out/cold_run.log"
"$work/iomm/.venv/bin/python" - "$out" "$wall" "$commit" <<'PY'
import json, sys
from pathlib import Path
from iomm.training.hardware import machine_facts
out, wall, commit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
recipe = json.loads((out / "recipe.json").read_text())
record = {
    "command": "bash scripts/cold_run.sh (a fresh clone of HEAD, then: bash scripts/nano.sh --no-progress)",
    "what": "one uninterrupted run from a fresh clone with empty caches (no .venv, .cache or runs; pip's download "
            "cache as the machine has it), timed as a whole: setup.sh, nano MLLM, nano VAE, stage 1, stage 2, "
            "evaluation, stage-1 fidelity",
    "wall_s": wall, "recipe_total_s": round(recipe["times"]["total_s"], 1), "code": f"git commit {commit}",
    "precision": recipe["precision"], "machine": machine_facts(),
    "builtin_steps": {name: record.get("steps") for name, record in recipe["builtins"].items()},
}
(out / "cold_run.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
print(f"cold run: {wall / 60:.1f} min; wrote {out / 'cold_run.json'}")
PY
