"""`iomm export`: a training checkpoint (written at any world size, sharded or not) consolidated offline into a
diffusers pipeline directory, the form that is shared:

    OUT/model_index.json    IOMMPipeline and its components
    OUT/generator/          the diffusers model class's save_pretrained: it loads with that class's from_pretrained
    OUT/vae/, OUT/scheduler/, OUT/mllm/, OUT/tokenizer/, OUT/conditioner/   each saved by its own library
    OUT/README.md           the model card: config, data, steps, scores with the commands that produced them
    OUT/pipeline.py         the module diffusers' generic loader imports IOMMPipeline from
    OUT/export.json         the checkpoint it came from (`RUN/checkpoints/step_X`: no local path), its step, which
                            weights (EMA or raw)

The EMA weights are exported unless asked otherwise. `IOMMPipeline.from_pretrained(OUT)` loads it through
diffusers, and so does `DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` with iomm installed.
A checkpoint directory stays what resumes training; an export is what people use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from iomm.checkpointing.checkpoint import CheckpointError, resolve_checkpoint, run_relative_name
from iomm.checkpointing.weights import WEIGHTS_DIR
from iomm.config import Config
from iomm.generator.lora import lora_state, save_lora
from iomm.inference.pipeline import IOMMPipeline, load_model

EXPORT_FILE = "export.json"


def export(model_path: str | Path, out: str | Path, *, use_ema: bool = True,
           scores: list[str | Path] | None = None, lora: bool = False) -> Path:
    """With `lora`, also `OUT/pytorch_lora_weights.safetensors` (a LoRA run's adapters, diffusers' format); the
    exported generator of a LoRA run has them fused in."""
    checkpoint = resolve_checkpoint(model_path)
    if not (checkpoint / WEIGHTS_DIR).is_dir():
        raise CheckpointError(f"{checkpoint}: not a training checkpoint (no {WEIGHTS_DIR}/ to consolidate)")
    score_files = [_read_scores(Path(p)) for p in scores or []]  # a bad scores file fails before the model loads
    out = Path(out)
    if out.exists():
        if not (out / EXPORT_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not an iomm export: choose a new --out directory")
        shutil.rmtree(out)
    model = load_model(checkpoint, use_ema=use_ema)
    if lora and not model.cfg.train.lora.enabled:
        raise CheckpointError(f"{checkpoint}: --lora: not a LoRA run (train.lora.enabled is false)")
    adapters = lora_state(model.generator) if model.cfg.train.lora.enabled else None
    if adapters is not None:
        model.generator.fuse_lora()
        model.generator.unload_lora()
    IOMMPipeline.from_model(model).save_pretrained(out, safe_serialization=True)
    if lora:
        save_lora(adapters, model.cfg.generator.kind, out)
    step = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["step"]
    record = {"checkpoint": run_relative_name(checkpoint), "step": step, "weights": "ema" if use_ema else "raw"}
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    (out / "README.md").write_text(model_card(model.cfg, record, score_files), encoding="utf-8")
    return out


def _read_scores(path: Path) -> tuple[Path, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--scores {path}: expected a JSON result file, got {err}") from None
    if not isinstance(data, dict):
        raise FileNotFoundError(f"--scores {path}: expected a JSON object, got {type(data).__name__}")
    return path, data


def model_card(cfg: Config, record: dict[str, Any], scores: list[tuple[Path, dict[str, Any]]]) -> str:
    d, t = cfg.data, cfg.train
    stage = "stage 1, image-only pre-training" if t.mix_ratio == 1.0 else f"mixed fine-tuning, lambda = {t.mix_ratio}"
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "tags: [iomm, flow-matching]", "---",
             "# An IOMM model", "",
             f"Trained with iomm ({stage}): {record['step']} steps of {t.steps}, global batch "
             f"{t.batch_size} x {t.grad_accum}, lr {t.lr}; {record['weights']} weights of `{record['checkpoint']}`.",
             "", "## Data", "",
             f"- images: `{d.source}`" + (f" at `{d.path}`" if d.path else "") + f", {d.resolution} px",
             f"- text-image pairs: `{d.pairs}`" if d.pairs else "- text-image pairs: none (image-only)",
             "", "## Scores", ""]
    for path, data in scores:
        summary = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += [f"- `{path.name}` (command: `{data.get('command', 'not recorded')}`): "
                  + ", ".join(f"{k} = {v:.3f}" for k, v in summary.items())]
    if not scores:
        lines.append("None recorded (`iomm export --scores FILE.json` adds an evaluation's result file).")
    lines += ["", "## Use", "", "With iomm installed (`pip install iomm`):", "", "```python", "import torch",
              "from iomm.inference.pipeline import IOMMPipeline", "",
              'pipe = IOMMPipeline.from_pretrained("THIS_DIRECTORY")',
              'image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]', "```", "",
              "diffusers' generic loader reads the pipeline class from `pipeline.py`, which only imports it from "
              "iomm; diffusers runs such a file only when asked to:", "", "```python",
              "from diffusers import DiffusionPipeline", "",
              'pipe = DiffusionPipeline.from_pretrained("THIS_DIRECTORY", trust_remote_code=True)', "```",
              "", "## Config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
