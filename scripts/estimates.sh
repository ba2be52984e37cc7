#!/usr/bin/env bash
# Time and cost of the paper-scale configs before the first GPU hour: `iomm describe --estimate` for iomm-b,
# iomm-l, iomm-xl (pre-training and fine-tuning) and qwen-image-mix-lora (fine-tuning only: it runs as
# `iomm finetune --init none`) on GPUS x GPU at an assumed MFU, each next to its memory plan, gathered with the
# MFU that the paper's IOMM-B figure implies into OUT/estimates.json. Meta device, no weights, no downloads:
# seconds a config on a CPU.
#
#   bash scripts/estimates.sh [--gpus N] [--gpu KIND] [--mfu M] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=8 GPU=h800 MFU=0.35 OUT=docs/results/estimate ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=$2; shift 2 ;;
    --gpu) GPU=$2; shift 2 ;;
    --mfu) MFU=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "estimates.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# config, the parallelism it trains with (its train.parallel), the stages it runs
for row in "iomm-b ddp both" "iomm-l ddp both" "iomm-xl fsdp both" "qwen-image-mix-lora fsdp finetune"; do
  read -r name parallel stage <<<"$row"
  .venv/bin/iomm describe --config "configs/$name.yaml" --gpus "$GPUS" --parallel "$parallel" --gpu "$GPU" \
    --estimate --mfu "$MFU" --stage "$stage" --json >"$SCRATCH/$name.json"
  echo "[estimates] $name"
done
.venv/bin/python - "$OUT" "$SCRATCH" "${ARGS[@]}" <<'PY'
import json, sys
from pathlib import Path

from iomm.estimate import paper_implied_mfu

out = Path(sys.argv[1])
configs = {path.stem: json.loads(path.read_text()) for path in sorted(Path(sys.argv[2]).glob("*.json"))}
b = configs["iomm-b"]["estimate"]["stages"]["pretrain"]["flops_per_sample"]["total"]
result = {"command": " ".join(["bash scripts/estimates.sh", *sys.argv[3:]]),
          "machine": "iomm describe on the meta device: no weights, no GPU",
          "paper_iomm_b_pretraining": paper_implied_mfu(b),
          "configs": {name: {"command": c["command"], **c["estimate"], "memory_gib_per_gpu": c["memory_gib"]}
                      for name, c in configs.items()}}
(out / "estimates.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
print(f"{'config':>20s}  {'stage':>9s}  {'TFLOP/sample':>12s}  {'images/s/GPU':>12s}  {'GPU-hours':>9s}  {'wall h':>7s}")
for name, c in result["configs"].items():
    for stage, s in c["stages"].items():
        print(f"{name:>20s}  {stage:>9s}  {s['flops_per_sample']['total'] / 1e12:12.2f}  "
              f"{s['images_per_s_per_gpu']:12.2f}  {s['gpu_hours']:9,.0f}  {s['wall_hours']:7,.1f}")
for row in result["paper_iomm_b_pretraining"]["figures"]:
    print(f"paper: IOMM-B in {row['gpu_hours']:,.0f} H800 GPU-hours = {row['images_per_s_per_gpu']:.1f} images/s a GPU"
          f" = MFU {row['implied_mfu']:.1%} under our FLOP count")
print(f"wrote {out / 'estimates.json'}")
PY
