"""The JSON a bench script writes: its own command line first, then its results."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any


def write_report(path: Path, script: str, argv: list[str] | None, payload: dict[str, Any]) -> None:
    command = shlex.join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, **payload}, indent=2) + "\n", encoding="utf-8")
