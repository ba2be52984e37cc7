#!/usr/bin/env bash
# The tests: set up, then the whole suite (offline, tiny models of real architectures).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
