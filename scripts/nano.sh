#!/usr/bin/env bash
# The main job: set up, then the nano recipe end to end (nano MLLM, image-only pre-training,
# mixed fine-tuning, GenEval-shapes evaluation) on the built-in world. Extra arguments go to `iomm recipe nano`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/iomm recipe nano "$@"
