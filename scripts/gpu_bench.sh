#!/usr/bin/env bash
# IOMM-B's training step on one GPU: random weights of the real sizes (InternVL3-2B's layout, the FLUX.1 VAE's,
# the 1.6B MM-DiT; built once in .cache/bench-b-*), bf16, SDPA, without and with torch.compile of the generator
# blocks, at the largest batch that fits (halved from --batch on an out-of-memory error). Prints images/s, MFU
# against the GPU's bf16 dense peak and against a bf16 GEMM measured in the same run, and peak memory. Then a
# short `iomm pretrain` at that batch prints what a real run logs live (images/s, the step's time split, MFU, peak
# memory), to check `iomm describe --estimate --mfu-file OUT/compile_false.json` against a real training step.
# About 5 minutes on an H100-class GPU, most of it building the random MLLM once.
#
#   bash scripts/gpu_bench.sh [--batch N] [--steps N] [--warmup N] [--out DIR] [--config CFG] [--set K=V ...]
#                             [--no-compile] [--cpu]
#
# --cpu runs without a GPU (to check the script: tests/test_commands.py does so at a tiny size).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
BATCH=32 STEPS=5 WARMUP=3 OUT=runs/gpu-bench CONFIG=configs/iomm-b.yaml COMPILE=(false true) CPU=0 SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) BATCH=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --set) SETS+=("--set=$2"); shift 2 ;;
    --no-compile) COMPILE=(false); shift ;;
    --cpu) CPU=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
whole() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || { echo "gpu_bench.sh: $1 expects a whole number >= $3, got '$2'" >&2; exit 2; }; }
whole --batch "$BATCH" 1; whole --steps "$STEPS" 1; whole --warmup "$WARMUP" 0
[ -x .venv/bin/iomm ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [ "$CPU" = 0 ]; then
  .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu_bench.sh: no CUDA device (torch.cuda.is_available() is False); --cpu runs it on the CPU" >&2; exit 2; }
fi
mkdir -p "$OUT"
MODELS=(--set=mllm.path=bench-b --set=mllm.nano_dir=.cache/bench-b-mllm --set=mllm.gradient_checkpointing=false
        --set=codec.path=bench-b --set=codec.nano_dir=.cache/bench-b-vae --set=data.source=world
        --set=train.mixed_precision=auto)
for compile in "${COMPILE[@]}"; do
  batch=$BATCH
  while :; do
    log="$OUT/compile_$compile.log"
    if .venv/bin/iomm bench train-step --config "$CONFIG" "${MODELS[@]}" "${SETS[@]}" \
        --set=train.batch_size="$batch" --set=train.compile="$compile" --steps="$STEPS" --warmup="$WARMUP" \
        --out="$OUT/compile_$compile.json" >"$log" 2>&1; then
      break
    fi
    if grep -q "out of memory" "$log" && [ "$batch" -gt 1 ]; then
      batch=$(( batch / 2 )); echo "[gpu_bench] out of memory: batch $batch"
    else
      cat "$log" >&2; exit 1
    fi
  done
done
# the live check: the same step in a real (uncompiled) training run, one log line at its end
live_steps=$(( WARMUP + STEPS ))
rm -rf "$OUT/live"
.venv/bin/iomm pretrain --config "$CONFIG" "${MODELS[@]}" "${SETS[@]}" --set=train.batch_size="$batch" \
  --set=train.compile=false --set=train.steps="$live_steps" --set=train.log_every="$live_steps" \
  --set=train.sample_every=0 --set=train.checkpoint_every="$live_steps" --out "$OUT/live" --no-progress \
  >"$OUT/live.log" 2>&1 || { cat "$OUT/live.log" >&2; exit 1; }
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

from iomm.estimate import device_peak

out = Path(sys.argv[1])
for path in sorted(out.glob("compile_*.json")):
    record = json.loads(path.read_text())
    run, machine = record["run"], record["machine"]
    found = device_peak(machine)
    peak = found[1] * 1e12 if found else None
    achieved = run["flops_per_step"]["step"] / run["seconds_per_step"]["step"]
    nominal = f"{achieved / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 dense peak" if peak else "no peak known"
    print(f"{path.stem}: batch {run['batch_size']}, {run['images_per_s']:.1f} images/s, "
          f"{run['seconds_per_step']['step'] * 1000:.0f} ms a step (warm-up {run['warmup_s']:.0f} s), "
          f"MFU {nominal}; {run['mfu']['step']:.1%} of the measured GEMM peak "
          f"({run['matmul_peak_flops'] / 1e9:,.0f} GFLOP/s), generator {run['mfu']['generator']:.1%}; "
          f"peak memory {run['peak_memory_mib'] / 1024:.1f} GiB  [{machine}]")
rows = [json.loads(line) for line in (out / "live/metrics.jsonl").read_text().splitlines()]
live = next(row for row in reversed(rows) if "images_per_s" in row)
split = ", ".join(f"{key.removesuffix('_s')} {live[key] * 1000:.0f}" for key in live
                  if key.endswith("_s") and not key.endswith("per_s") and key not in ("step_s", "elapsed_s"))
print(f"live (iomm pretrain, step {live['step']}): {live['images_per_s']:.1f} images/s, "
      f"{live['condition_tokens_per_s']:,.0f} condition tokens/s, {live['step_s'] * 1000:.0f} ms a step ({split} ms), "
      f"{live['tflop_per_s_per_device']:.1f} TFLOP/s, MFU {live['mfu']:.1%}, "
      f"peak memory {live['peak_memory_gib']:.1f} GiB")
PY
