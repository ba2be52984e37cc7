"""Resuming with changed settings: compare the new config with the one the checkpoint was trained with.

Changes to the schedule and to how the run is operated (LR, steps, warm-up, logging, checkpointing, ...)
apply from the resumed step on, and are reported. So does the mix ratio: a checkpoint holds how many samples each
stream has given (`data_position`), so the streams go on from there and only which one the next samples come from
changes. Any other change (the model, the data, the batch, the seed: what the weights and the data stream were made
from) is refused before anything is loaded, naming every differing field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iomm.config import Config
from iomm.typed_config import ConfigError

# Fields that may change when a run resumes: everything else must match the checkpoint.
APPLIED_ON_RESUME = frozenset({
    "train.steps", "train.lr", "train.warmup_steps", "train.decay_fraction", "train.betas", "train.weight_decay",
    "train.grad_clip", "train.ema_decay", "train.mixed_precision", "train.threads", "train.log_every",
    "train.sample_every", "train.checkpoint_every", "train.keep_last", "train.keep_every",
    "train.max_nonfinite_in_row", "train.parallel", "train.activation_checkpointing", "train.compile",
    "train.fused_optimizer", "train.mix_ratio", "train.shard_size",
    "data.num_workers", "data.max_bad_fraction", "data.holdout_pairs",
    "flow.sample_steps", "flow.guidance_scale", "flow.reconstruct_guidance_scale",
    "mllm.gradient_checkpointing", "mllm.prefix_cache",
    # stage-2 settings only act when a fine-tuning config is made; a run's own stage is in `train`. Each one
    # replaces its `train` counterpart, which may change too: a refusal never names a field the user did not set.
    "finetune.steps", "finetune.mix_ratio", "finetune.lr",
})


class ResumeConflict(ConfigError):
    """The run directory holds a run trained with settings that cannot change on resume."""

    def __init__(self, checkpoint: Path, differences: list[tuple[str, Any, Any]]):
        self.differences = differences
        lines = "\n".join(f"  {name}: checkpoint has {old!r}, now {new!r}" for name, old, new in differences)
        ValueError.__init__(self, f"{checkpoint}: cannot resume with a different model or data:\n{lines}\n"
                                  "Use a new --out directory, or resume with the run's settings "
                                  f"({checkpoint / 'config.yaml'}).")
        self.source, self.field_path = str(checkpoint / "config.yaml"), ", ".join(n for n, _, _ in differences)
        self.expected, self.got = [old for _, old, _ in differences], [new for _, _, new in differences]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(saved: Config, new: Config, checkpoint: Path) -> list[tuple[str, Any, Any]]:
    """The (field, old, new) changes that apply on resume; raises ResumeConflict for any other change."""
    old, now = flatten(saved.to_dict()), flatten(new.to_dict())
    changed = [(name, old.get(name), now.get(name)) for name in sorted(set(old) | set(now))
               if old.get(name) != now.get(name)]
    refused = [change for change in changed if change[0] not in APPLIED_ON_RESUME]
    if refused:
        raise ResumeConflict(checkpoint, refused)
    return changed
