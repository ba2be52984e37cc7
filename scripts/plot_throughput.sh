#!/usr/bin/env bash
# A training run's live throughput as the README shows it: copies RUN_DIR/metrics.jsonl into OUT_DIR, draws
# OUT_DIR/throughput.png (images/s, the step's time split, MFU, peak memory at each log step; every run since
# 0.2.0 draws the same figure into its own folder at its end) and writes OUT_DIR/run.json naming the run, the
# command that trained it and this machine.
#
#   bash scripts/plot_throughput.sh RUN_DIR OUT_DIR "COMMAND THAT TRAINED RUN_DIR"
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
run=$1 out=$2 command=$3
[ -f "$run/metrics.jsonl" ] || { echo "plot_throughput.sh: no $run/metrics.jsonl" >&2; exit 2; }
mkdir -p "$out"
cp "$run/metrics.jsonl" "$out/metrics.jsonl"
.venv/bin/python - "$run" "$out" "$command" <<'PY'
import json, sys
from pathlib import Path

import yaml

from iomm.quiet import quiet_libraries

quiet_libraries(show_progress=False)
from iomm.training.hardware import machine_facts  # noqa: E402 - after the filters of library import notices
from iomm.training.run_log import read_metrics  # noqa: E402
from iomm.training.throughput import plot_throughput  # noqa: E402

run, out, command = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = read_metrics(out / "metrics.jsonl")
plot_throughput(rows, out / "throughput.png")
last = [row for row in rows if "images_per_s" in row][-1]
config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
record = {"run": str(run), "command": command, "machine": machine_facts(),
          "run_threads": config.get("train", {}).get("threads"),  # the run's own (0: torch's default)
          "last_log_step": {k: last[k] for k in last if k != "time"}}
(out / "run.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
print(f"wrote {out / 'throughput.png'} and {out / 'run.json'} (step {last['step']}: "
      f"{last['images_per_s']:.1f} images/s, MFU {last['mfu']:.1%}, peak {last['peak_memory_gib']:.2f} GiB)")
PY
