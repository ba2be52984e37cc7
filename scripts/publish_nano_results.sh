#!/usr/bin/env bash
# Copy a finished nano recipe's artefacts (scores, times, understanding, loss curves, sample grids)
# into a results folder for the docs: bash scripts/publish_nano_results.sh [RUN_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/nano}
out=${2:-docs/results/nano-recipe}
mllm=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['mllm']['nano_dir'])" "$run/recipe.json")
mkdir -p "$out"
cp "$run/recipe.json" "$out/recipe.json"
cp "$run/eval/metrics.json" "$out/geneval_shapes.json"
cp "$mllm/understanding.json" "$out/nano_mllm_understanding.json"
cp "$mllm/nano_mllm.json" "$out/nano_mllm_training.json"
vae=$(.venv/bin/python -c "import json,sys; c=json.load(open(sys.argv[1]))['config']['codec']; print(c['nano_dir'] if c['path'] == 'nano' else '')" "$run/recipe.json")
if [ -n "$vae" ]; then cp "$vae/nano_vae.json" "$out/nano_vae.json"; fi
for stage in pretrain finetune; do
  cp "$run/$stage/loss.png" "$out/${stage}_loss.png"
  for f in "$run/$stage"/samples/*.png; do cp "$f" "$out/${stage}_$(basename "$f")"; done
  grep '"recon_mse_own"' "$run/$stage/metrics.jsonl" > "$out/${stage}_reconstruction.jsonl" || true
done
echo "wrote $(ls "$out" | wc -l) files to $out"
