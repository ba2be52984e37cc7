#!/usr/bin/env bash
# Copy a finished nano recipe's artefacts (scores, times, understanding, loss curves, sample grids)
# into a results folder for the docs, and draw the README's figure:
#   bash scripts/publish_nano_results.sh [RUN_DIR] [OUT_DIR] [FIGURE]   (FIGURE: docs/images/nano_reconstructions.png)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/nano}
out=${2:-docs/results/nano-recipe}
figure=${3:-docs/images/nano_reconstructions.png}
mllm=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['mllm']['nano_dir'])" "$run/recipe.json")
mkdir -p "$out"
cp "$run/recipe.json" "$out/recipe.json"
cp "$run/eval/metrics.json" "$out/geneval_shapes.json"
cp "$mllm/understanding.json" "$out/nano_mllm_understanding.json"
cp "$mllm/nano_mllm.json" "$out/nano_mllm_training.json"
vae=$(.venv/bin/python -c "import json,sys; c=json.load(open(sys.argv[1]))['config']['codec']; print(c['nano_dir'] if c['path'] == 'nano' else '')" "$run/recipe.json")
if [ -n "$vae" ]; then cp "$vae/nano_vae.json" "$out/nano_vae.json"; fi
rm -f "$out"/*_step_*.png  # grids of an earlier run (other step numbers) would otherwise stay behind
for stage in pretrain finetune; do
  cp "$run/$stage/loss.png" "$out/${stage}_loss.png"
  for f in "$run/$stage"/samples/*.png; do cp "$f" "$out/${stage}_$(basename "$f")"; done
  grep '"recon_mse_own"' "$run/$stage/metrics.jsonl" > "$out/${stage}_reconstruction.jsonl" || true
done
echo "wrote $(ls "$out" | wc -l) files to $out"
# The README's figure: the stage-1 and stage-2 sample grids stacked, 2x, each with its title.
.venv/bin/python - "$out" "$figure" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
src = Path(sys.argv[1])
grids = sorted(src.glob("pretrain_step_*.png")) + sorted(src.glob("finetune_step_*.png"))[-1:]
panels = []
for path in grids:
    stage, step = "stage 1" if path.name.startswith("pretrain") else "stage 2", path.stem.split("_")[-1]
    grid = Image.open(path).convert("RGB")
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    title = f"{stage}, step {int(step)}" + (" (3rd row: fixed text prompts)" if stage == "stage 2" else "")
    panel = Image.new("RGB", (grid.width, grid.height + 24), "white")
    ImageDraw.Draw(panel).text((4, 4), title, fill="black")
    panel.paste(grid, (0, 24))
    panels.append(panel)
figure = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
y = 0
for panel in panels:
    figure.paste(panel, (0, y))
    y += panel.height
figure.save(sys.argv[2])
print(f"wrote {sys.argv[2]}")
PY
