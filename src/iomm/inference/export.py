"""`iomm export`: a training checkpoint (written at any world size, sharded or not) consolidated offline into the
inference layout that is shared: the generator in diffusers format, `conditioner.safetensors`, the config.

    OUT/generator/                 the diffusers class's save_pretrained: loads with its own from_pretrained
    OUT/conditioner.safetensors    adapter, connector (and token head)
    OUT/config.yaml                the run's config (the frozen MLLM and codec it names are not copied)
    OUT/export.json                the checkpoint it came from, its step, which weights (EMA or raw)
    OUT/manifest.json              size and sha256 of each file, as in a checkpoint

The EMA weights are exported unless asked otherwise. `IOMMPipeline.from_pretrained(OUT)` loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from iomm.checkpointing.checkpoint import CheckpointError, resolve_checkpoint, write_manifest
from iomm.checkpointing.weights import WEIGHTS_DIR, save_export
from iomm.config import save_config
from iomm.inference.pipeline import load_model

EXPORT_FILE = "export.json"


def export(model_path: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    checkpoint = resolve_checkpoint(model_path)
    if not (checkpoint / WEIGHTS_DIR).is_dir():
        raise CheckpointError(f"{checkpoint}: already an export (no {WEIGHTS_DIR}/ of training state to consolidate)")
    model = load_model(checkpoint, use_ema=use_ema)
    out = Path(out)
    if out.exists():
        if not (out / EXPORT_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not an iomm export: choose a new --out directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_export(model, out)
    save_config(model.cfg, out / "config.yaml")
    step = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["step"]
    record = {"checkpoint": str(checkpoint.resolve()), "step": step, "weights": "ema" if use_ema else "raw"}
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    write_manifest(out)
    return out
