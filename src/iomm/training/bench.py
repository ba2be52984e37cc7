"""Timing of one training step, split by component (`iomm bench train-step`)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from iomm.checkpointing.weights import step_seed
from iomm.config import Config
from iomm.data.mixed_batches import MixedBatches, build_sources
from iomm.model import IOMM, Condition
from iomm.training.ema import EMA
from iomm.training.precision import autocast as precision_autocast
from iomm.training.precision import resolve_precision


class _Clock:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.totals[name] += time.perf_counter() - start


def bench_train_step(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Seconds per step for: conditioning forward+backward (MLLM + adapter + connector), generator
    forward+backward, codec encode, optimizer + EMA; and images/s of the whole step."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = IOMM.from_config(cfg).train()
    params = {f"{n}.{k}": p for n, m in model.trainable().items() for k, p in m.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    ema = EMA(params, cfg.train.ema_decay)
    images_src, pairs_src = build_sources(cfg)
    batches = MixedBatches(images_src, pairs_src, cfg.train.batch_size, cfg.train.mix_ratio, cfg.train.seed)
    autocast = precision_autocast(cfg.train.mixed_precision)
    clock = _Clock()
    for step in range(warmup + steps):
        if step == warmup:
            clock.totals.clear()
        batch = batches[step]
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step))
        optimizer.zero_grad(set_to_none=True)
        with clock("step"):
            with clock("conditioning_forward"), autocast:
                cond = model.condition_batch(batch.images, batch.captions, g, cfg.train.cond_dropout)
            with clock("codec_encode"):
                latents = model.codec.encode(batch.images, g)
            tokens = cond.tokens.detach().requires_grad_(True)
            pooled = cond.pooled.detach().requires_grad_(True)
            with clock("generator_forward"), autocast:
                loss = model.flow_loss(latents, Condition(tokens, pooled), g)
            with clock("generator_backward"):
                loss.backward()
            with clock("conditioning_backward"):
                # a U-Net generator ignores the pooled condition, which then has no gradient
                outputs, grads = zip(*[(out, inp.grad) for out, inp in ((cond.tokens, tokens), (cond.pooled, pooled))
                                       if inp.grad is not None])
                torch.autograd.backward(list(outputs), list(grads))
            with clock("optimizer_and_ema"):
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.grad_clip or float("inf"))
                optimizer.step()
                ema.update(step)
    per_step = {k: v / steps for k, v in clock.totals.items()}
    return {
        "images_per_s": cfg.train.batch_size / per_step["step"],
        "seconds_per_step": per_step,
        "batch_size": cfg.train.batch_size,
        "threads": torch.get_num_threads(),
        "mixed_precision": resolve_precision(cfg.train.mixed_precision),
        "masking_mode": cfg.masking.mode,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in model.trainable().items()},
    }
