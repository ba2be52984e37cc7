#!/usr/bin/env bash
# The pair-budget study, then the five nano studies, at 10x the nano recipe's compute on one GPU, with paired intervals
# (iomm study: 64 prompts per category x 4 images, every arm against the paper's best arm).
#
#   bash scripts/gpu_studies.sh [OUT]        # default OUT: runs/gpu-studies
#
# 10x budget: batch 320 instead of 32 (same steps, same schedule), so each stage sees ten times the
# images; arms run as parallel one-thread processes sharing the GPU (PARALLEL, default 8).
# The nano MLLM and VAE are built on first use (1,250 and 600 steps): carry a
# .cache with both (e.g. from this machine's nano recipe) so the GPU time goes to the studies.
# SEEDS (default 3), PARALLEL and BATCH override the defaults from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-studies}
SEEDS=${SEEDS:-3}
PARALLEL=${PARALLEL:-8}
BATCH=${BATCH:-320}
[ -x .venv/bin/iomm ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_studies.sh: no CUDA device (torch.cuda.is_available() is False); on a CPU use "
                     "iomm study NAME (docs/results/README.md)")
print(f"GPU: {torch.cuda.get_device_name(0)}")
PY
for cache in .cache/nano-mllm .cache/nano-vae; do
  [ -d "$cache" ] || echo "note: $cache is missing: it is built first (minutes of GPU time)"
done
mkdir -p "$OUT"
start=$(date +%s)
for study in pair-budget recipes mask-ratio mix-ratio adapter editing; do
  .venv/bin/iomm study "$study" --seeds "$SEEDS" --parallel "$PARALLEL" --per-category 64 --samples 4 \
    --set train.batch_size="$BATCH" --set train.mixed_precision=auto --out "$OUT/$study"
  echo "[$study] done at $(( $(date +%s) - start )) s"
done
.venv/bin/python - "$OUT" "$start" <<'PY'
import json, sys, time
from pathlib import Path
out, start = Path(sys.argv[1]), float(sys.argv[2])
findings = {p.parent.name: json.loads(p.read_text())["finding"] for p in sorted(out.glob("*/results.json"))}
record = {"command": "bash scripts/gpu_studies.sh " + str(out), "wall_s": round(time.time() - start, 1),
          "findings": findings}
(out / "gpu_studies.json").write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
PY
