"""Training of the nano MLLM on world questions: task batches, the selection loss, and train-on-first-use."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from iomm.conditioning.mllm_families import family_for
from iomm.evaluation.prompt_images import write_jsonl
from iomm.image_tensors import to_tensor
from iomm.nano.mllm import (
    DEFAULT_STEPS,
    UNDERSTANDING_TARGETS,
    NanoMLLMConfig,
    _write_json,
    build_nano_mllm,
    preprocessing_config,
    save_nano_mllm,
    tiny_config,
)
from iomm.nano.questions import (
    COLOR_FREE_TYPES,
    DESCRIPTION_WEIGHTS,
    IMAGE_WEIGHTS,
    TEXT_WEIGHTS,
    Batch,
    SequenceBuilder,
    collate,
    patch_labels,
    sample_turns,
    scene_description,
    selected_patches,
)
from iomm.nano.tokenizer import AUX_PROMPT
from iomm.nano.understanding import UNDERSTANDING_RECORDS, evaluate_understanding
from iomm.nano.world import (
    COLORS,
    SHAPES,
    World,
    WorldConfig,
)
from iomm.registry import BuiltinBelowTarget
from iomm.training.hardware import machine_facts
from iomm.training.precision import autocast, describe_precision
from iomm.training.run_log import Progress


class DenseHead(nn.Module):
    """Training-only linear probe on the vision tower's patch tokens: shape and colour class per patch."""

    def __init__(self, model: InternVLForConditionalGeneration) -> None:
        super().__init__()
        self.proj = nn.Linear(model.config.vision_config.hidden_size, 1 + len(SHAPES) + 1 + len(COLORS))
        self.features: Tensor | None = None
        self.hook = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.features = output.last_hidden_state[:, 1:]  # without the CLS token

    def loss(self, labels: Tensor) -> Tensor:
        logits = self.proj(self.features).float()
        shape_logits, color_logits = logits.split([1 + len(SHAPES), 1 + len(COLORS)], dim=-1)
        return (F.cross_entropy(shape_logits.flatten(0, 1), labels[..., 0].flatten())
                + F.cross_entropy(color_logits.flatten(0, 1), labels[..., 1].flatten()))


class SelectionLoss:
    """Training-only: teaches one attention head of the language model to look at the asked-about object.

    Recomputes head 0's attention at the answer positions from the layer's own projections (the model's
    attention kernel returns no weights) and takes -log of the attention mass on the object's image tokens.
    """

    def __init__(self, model: InternVLForConditionalGeneration, layer: int) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn
        self.image_token_id = model.config.image_token_id
        self.patches_per_side = round(1 / model.config.downsample_ratio)  # pixel shuffle merges n x n patches
        self.inputs: tuple[Tensor, tuple[Tensor, Tensor]] | None = None
        self.hook = self.attention.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.inputs = (kwargs.get("hidden_states", args[0] if args else None),
                       kwargs.get("position_embeddings", args[1] if len(args) > 1 else None))

    def token_targets(self, patches: Tensor) -> Tensor:
        """(n, patches) object masks -> (n, image tokens): a token is on the object if any of its patches is."""
        n, side, k = patches.shape[0], int(round(patches.shape[1] ** 0.5)), self.patches_per_side
        grouped = patches.reshape(n, side // k, k, side // k, k).permute(0, 1, 3, 2, 4)
        return grouped.reshape(n, (side // k) ** 2, k * k).any(-1)

    def loss(self, batch: Batch) -> Tensor:
        if batch.selections is None or self.inputs is None:
            return torch.zeros(())
        hidden, (cos, sin) = self.inputs
        rows, positions = batch.selections.unbind(1)
        attn, n = self.attention, len(rows)
        hidden = hidden[rows]
        cos, sin = (t.expand(batch.input_ids.shape[0], *t.shape[1:])[rows] for t in (cos, sin))
        query = attn.q_proj(hidden).view(n, hidden.shape[1], -1, attn.head_dim)[:, :, 0]
        key = attn.k_proj(hidden).view(n, hidden.shape[1], -1, attn.head_dim)[:, :, 0]  # head 0's key/value head
        query, key = apply_rotary_pos_emb(query[:, None], key[:, None], cos, sin)
        query = query[torch.arange(n), 0, positions]
        scores = (key[:, 0] @ query.unsqueeze(-1)).squeeze(-1).float() * attn.scaling
        visible = (torch.arange(scores.shape[1])[None] <= positions[:, None]) & batch.attention_mask[rows].bool()
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        target = torch.zeros_like(visible)
        target[batch.input_ids[rows] == self.image_token_id] = self.token_targets(batch.selected_patches).flatten()
        return -(probs * target).sum(-1).clamp(min=1e-6).log().mean()




class TaskSampler:
    """Understanding batches drawn on the fly from the world."""

    def __init__(self, cfg: NanoMLLMConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
        self.cfg = cfg
        self.world = World(WorldConfig(resolution=cfg.resolution, background=cfg.background))
        self.builder = SequenceBuilder(tokenizer, cfg.image_tokens)
        self.aux = self.builder.words(AUX_PROMPT)
        self.pad = tokenizer.pad_token_id
        self.rng = np.random.default_rng([seed, 11])

    def n_turns(self) -> int:
        return int(self.rng.integers(1, self.cfg.max_turns + 1))

    def image_batch(self) -> Batch:
        rows, images, labels, selections, selected = [], [], [], [], []
        for row in range(self.cfg.batch_size):
            scene = self.world.sample_scene(self.rng)
            aux = self.aux if self.rng.random() < self.cfg.aux_prompt_prob else []
            turns = sample_turns(self.world, scene, IMAGE_WEIGHTS, self.n_turns(), self.rng)
            rows.append(self.builder.build(aux + self.builder.image_block, turns))
            images.append(self.world.render(scene))
            labels.append(patch_labels(self.world, scene, self.cfg.patch_size))
            seps = [i for i, token in enumerate(rows[-1][0]) if token == self.builder.sep]  # one per turn
            for (question, _), sep in zip(turns, seps):
                if (mask := selected_patches(question, labels[-1])) is not None:
                    selections.append((row, sep))
                    selected.append(mask)
        batch = collate(rows, self.pad, to_tensor(images), torch.from_numpy(np.stack(labels)))
        if selected:
            batch.selections = torch.tensor(selections, dtype=torch.long)
            batch.selected_patches = torch.from_numpy(np.stack(selected))
        return batch

    def text_batch(self, size: int) -> Batch:
        rows = []
        for _ in range(size):
            scene = self.world.sample_scene(self.rng)
            if self.cfg.description_prob > 0 and self.rng.random() < self.cfg.description_prob:
                context, weights = scene_description(self.world, scene), DESCRIPTION_WEIGHTS
            else:
                with_color = bool(self.rng.random() >= 0.25)
                context = self.world.caption(scene, with_color)
                weights = TEXT_WEIGHTS if with_color else {k: TEXT_WEIGHTS[k] for k in COLOR_FREE_TYPES}
            turns = sample_turns(self.world, scene, weights, self.n_turns(), self.rng)
            rows.append(self.builder.build(self.builder.words(context), turns))
        return collate(rows, self.pad, None)



# ------------------------------------------------------------------------------ training


def lr_factor(progress: float, cfg: NanoMLLMConfig, step: int) -> float:
    """Linear warm-up over `step`s, then cosine decay to `min_lr_ratio` over `progress` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def phase_progress(frac: float, cfg: NanoMLLMConfig) -> tuple[bool, float]:
    """(in the final image phase, progress within the current phase): pre-training and the image phase each
    have their own warm-up and cosine schedule, as a pre-trained LM's fine-tuning stage has in Keh et al."""
    pretraining = 1.0 - cfg.image_phase
    if frac < pretraining:
        return False, frac / pretraining
    return True, (frac - pretraining) / cfg.image_phase


def batch_loss(model: InternVLForConditionalGeneration, batch: Batch, cfg: NanoMLLMConfig) -> Tensor:
    extra = {}
    if batch.images is not None:
        extra = family_for(model.config, preprocessing_config(cfg)).model_inputs(batch.images, batch.input_ids)
    with autocast(cfg.precision):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, **extra)
    return out.loss.float()


def train_loop(
    model: InternVLForConditionalGeneration, sampler: TaskSampler, cfg: NanoMLLMConfig,
    *, steps: int | None, minutes: float | None, progress: bool,
) -> dict[str, Any]:
    """AdamW on answer tokens until `steps` or `minutes` (whichever first); returns run statistics."""
    if steps is None and minutes is None:
        raise ValueError("train_nano_mllm: give steps or minutes")
    dense = DenseHead(model) if cfg.dense_weight > 0 else None
    selection = SelectionLoss(model, cfg.selection_layer) if cfg.selection_weight > 0 else None
    params = list(model.parameters()) + (list(dense.parameters()) if dense is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    model.train()
    log, step, frac, loss, images_seen = Progress(progress, tag="nano-mllm"), 0, 0.0, float("nan"), 0
    phase_start = None  # the step at which the image phase began
    while frac < 1.0:
        final, within = phase_progress(frac, cfg)
        phase_start = step if final and phase_start is None else phase_start
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(within, cfg, step - (phase_start or 0))
        total, text_rows = torch.zeros(()), cfg.text_batch_size
        if final or within >= cfg.image_start:  # images enter at image_start of pre-training
            batch = sampler.image_batch()
            total = total + batch_loss(model, batch, cfg)
            if dense is not None:
                total = total + cfg.dense_weight * dense.loss(batch.patch_labels)
            if selection is not None:
                total = total + cfg.selection_weight * selection.loss(batch)
            images_seen += 1
        else:  # a text-only step: as many sequences, all text
            text_rows += cfg.batch_size
        if text_rows > 0:
            total = total + batch_loss(model, sampler.text_batch(text_rows), cfg)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        loss = total.item()
        frac = max(step / steps if steps else 0.0, log.elapsed() / (60 * minutes) if minutes else 0.0)
        log(step, loss, frac, force=frac >= 1.0)
    for aux in (dense, selection):
        if aux is not None:
            aux.hook.remove()
    model.eval()
    return {"steps": step, "image_steps": images_seen, "train_seconds": round(log.elapsed(), 1),
            "final_loss": round(loss, 4)}


def train_nano_mllm(
    out_dir: str | Path,
    *,
    steps: int | None = DEFAULT_STEPS,
    minutes: float | None = None,
    seed: int = 0,
    random_init: bool = False,
    progress: bool = True,
    tiny: bool = False,
    config: NanoMLLMConfig | None = None,
) -> Path:
    """Train (or, with `random_init`, only initialise) the nano MLLM; save it and understanding.json.

    Stops after `steps` or, where `minutes` is given too, at that wall-clock budget if it comes first.
    """
    out_dir = Path(out_dir)
    cfg = config or (tiny_config() if tiny else NanoMLLMConfig())
    model, tokenizer = build_nano_mllm(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    if progress:
        print(f"[nano-mllm] {'random-init' if random_init else 'training'} nano InternVL: {n_params / 1e6:.2f}M "
              f"params, {cfg.image_tokens} image tokens, vocab {len(tokenizer)}, precision "
              f"{describe_precision(cfg.precision)} -> {out_dir}", flush=True)
    stats: dict[str, Any] = {"steps": 0, "train_seconds": 0.0}
    if not random_init:
        stats = train_loop(model, TaskSampler(cfg, tokenizer, seed), cfg, steps=steps, minutes=minutes,
                           progress=progress)
    meta = {"seed": seed, "random_init": random_init, "parameters": n_params, "threads": torch.get_num_threads(),
            "precision": describe_precision(cfg.precision), "machine": machine_facts(), **stats}
    save_nano_mllm(out_dir, model, tokenizer, cfg, meta)
    records: list[dict[str, Any]] = []
    results = evaluate_understanding(out_dir, n=cfg.eval_n, seed=seed + 1000, records=records)
    _write_json(out_dir / "understanding.json", results)
    write_jsonl(out_dir / UNDERSTANDING_RECORDS, records)
    if progress:
        print(f"[nano-mllm] saved {out_dir}; understanding: " + json.dumps(results["accuracy"]), flush=True)
    return out_dir


def ensure_nano_mllm(path: str | Path, *, progress: bool = True, **train_kwargs: Any) -> Path:
    """Return `path` if it holds a saved nano MLLM; otherwise train one there first (saying so)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        _check_kind(path, bool(train_kwargs.get("random_init", False)))
        return path
    if progress:
        what = "random init" if train_kwargs.get("random_init") else f"{train_kwargs.get('steps', DEFAULT_STEPS)} steps"
        print(f"[nano-mllm] no nano MLLM at {path}: building it now (one-off, {what})", flush=True)
    return train_nano_mllm(path, progress=progress, **train_kwargs)


def _check_kind(path: Path, random_init: bool) -> None:
    meta_path = path / "nano_mllm.json"
    saved = json.loads(meta_path.read_text()).get("random_init") if meta_path.is_file() else None
    if saved is not None and bool(saved) != random_init:
        have, want = ("random-init", "trained") if saved else ("trained", "random-init")
        raise ValueError(f"{path} holds a {have} nano MLLM but a {want} one was asked for: "
                         "use a separate directory for each")


def check_understanding(path: str | Path) -> None:
    """Stop before a generator is conditioned on a nano MLLM that does not understand the world well enough."""
    path = Path(path)
    accuracy = json.loads((path / "understanding.json").read_text())["accuracy"]
    short = {name: accuracy.get(name, 0.0) for name, target in UNDERSTANDING_TARGETS.items()
             if accuracy.get(name, 0.0) < target}
    if not short:
        return
    meta_path = path / "nano_mllm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    numbers = ", ".join(f"{name} {value:.3f} (target {UNDERSTANDING_TARGETS[name]:g})" for name, value in short.items())
    raise BuiltinBelowTarget(
        f"the nano MLLM at {path} answers below its targets: {numbers}. It trained {meta.get('steps', '?')} steps "
        f"(the default is {DEFAULT_STEPS}) in {meta.get('precision', '?')}. Likely cause: too few steps (a --minutes "
        f"budget on a slow machine, or an older build). Delete {path} to rebuild it with the default steps, or "
        f"build it with `iomm mllm train --out {path}`.")
