#!/usr/bin/env bash
# The tests: set up, then the whole suite (offline, tiny models of real architectures). The demo's browser test
# drives the system's Chromium: it is installed here (Debian's `chromium`) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo"; else
    echo "scripts/test.sh: the browser test needs Chromium: install it (apt-get install chromium), then rerun" >&2
    exit 1
  fi
  echo "installing Chromium (apt-get install chromium) for the browser test"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium > /dev/null
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers (pytest-xdist): the suite's processes are single-threaded, and two beat one on a 2-core machine.
# IOMM_TEST_WORKERS sets another number (0: one process, no workers).
exec .venv/bin/python -m pytest -n "${IOMM_TEST_WORKERS:-2}" "$@"
