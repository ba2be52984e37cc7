"""The JSON a probe writes: its own command line first, then its results."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any


def command_line(probe: str, argv: list[str] | None = None) -> str:
    """`python -m iomm.lab.bench.probes.PROBE ARGS...`, the arguments `argv` (default: this process's)."""
    return shlex.join(["python", "-m", f"iomm.lab.bench.probes.{probe}", *(argv if argv is not None else sys.argv[1:])])


def write_report(path: Path, probe: str, argv: list[str] | None, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command_line(probe, argv), **payload}, indent=2) + "\n", encoding="utf-8")
