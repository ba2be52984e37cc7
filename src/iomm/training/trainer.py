"""Training: stage 1 (image-only, mix_ratio = 1) and stage 2 (mixed) share one loop.

Every source of randomness of a sample (its data, mask, dropout, timestep, noise) is seeded from
(seed, step, micro-step, its index in the global batch), never from the rank, so a global batch is the same at
any world size and a resumed run continues exactly: only weights, EMA, optimizer and LR schedule
are state, and they live in the checkpoint. Every stop is collective across ranks (see distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from iomm.checkpointing import checkpoint as ckpt
from iomm.checkpointing.manager import CONFIG_FILE, CheckpointManager, run_state
from iomm.checkpointing.weights import build_model, load_trainable
from iomm.config import Config, save_config
from iomm.config_checks import load_config
from iomm.data.images import DataReport, TooMuchBadData
from iomm.data.mixed_batches import Batch, DataPosition, MixedBatches, batch_loader, build_sources
from iomm.ema import EMA
from iomm.image_tensors import image_grid
from iomm.model import IOMM
from iomm.per_sample_rng import sample_generators
from iomm.profiling import PhaseTimer
from iomm.training.distributed import Distributed
from iomm.training.held_out import held_out_loss
from iomm.training.optimizers import build_optimizers, build_schedulers
from iomm.training.parallel import SHARDED, distribute, gathered, gradient_sync, local_value, shard_groups
from iomm.training.precision import autocast, describe_precision, store_frozen_in_bf16
from iomm.training.resume import config_changes
from iomm.training.run_log import RunLog, plot_loss_curve, read_metrics, step_line
from iomm.training.stopping import StopSignal, TrainingInterrupted, TrainingStopped
from iomm.training.throughput import ThroughputMeter, plot_throughput
from iomm.typed_config import ConfigError

MIN_SAMPLES_FOR_BAD_CHECK = 64
PANEL_SIZE = 8  # held-out images in each sample grid
SIGNAL = "signal"  # how a stop reason from SIGTERM / Ctrl-C begins

# What the trainer calls every `train.sample_every` steps, under the EMA weights, with the run's held-out
# images: rows of (B, 3, H, W) images for the sample grid and scalar metrics for the log
# (iomm.evaluation.sample_grid.sample_grid).
SampleFn = Callable[[IOMM, Config, torch.Tensor], tuple[list[torch.Tensor], dict[str, float]]]


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    finite: bool


@dataclass
class Trainer:
    cfg: Config
    run_dir: Path
    init: Path | None = None
    progress: bool = True
    dist: Distributed = field(default_factory=Distributed.from_env)
    sample_fn: SampleFn | None = None
    # Builds the model from the config; a probe can pass a subclass of IOMM (iomm.lab.bench.probes.oracle_arms).
    model_fn: Callable[[Config], IOMM] = IOMM.from_config

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        created_here = self.dist.main and not self.run_dir.exists()
        try:
            self._set_up()
        except BaseException:
            if created_here:  # a run that fails before training leaves no partial folder (e.g. only a data index)
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _set_up(self) -> None:
        """The data sources, the model, its optimizers and EMA, and the batches (nothing is trained yet)."""
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.device = self.dist.device()
        if self.cfg.train.batch_size % self.dist.world:
            raise ConfigError("the launch", "train.batch_size", f"a multiple of the {self.dist.world} ranks",
                              self.cfg.train.batch_size)
        shard_groups(self.cfg.train, self.dist.world, self.dist.local_world)  # a bad train.shard_size fails here
        self.report = DataReport()  # the data first: a source that cannot be read fails before the model is built
        sources = build_sources(self.cfg, self.report, self.run_dir, main=self.dist.main, barrier=self.dist.barrier,
                                held_out=PANEL_SIZE)
        self.held_out, self.held_out_pairs = sources.held_out, sources.held_out_pairs
        start, self.stream = self._continue_from()
        if self.cfg.train.lora.enabled and self.init is not None:  # the model the adapters adapt
            if self.cfg.train.lora.base is not None:
                raise ConfigError("the command line", "--init", "no --init with train.lora.base set (the LoRA base)",
                                  str(self.init))
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(
                self.cfg.train, lora=dataclasses.replace(self.cfg.train.lora, base=str(self.init))))
            self.init = None
        torch.manual_seed(self.cfg.train.seed)  # the same initial weights on every rank and every rerun
        self.model = build_model(self.cfg, self.model_fn).to(self.device)
        self.timer = PhaseTimer()  # off: the throughput meter and `iomm bench train-step` turn it on
        store_frozen_in_bf16(self.model, self.cfg.train.mixed_precision, self.device.type)
        if self.init is not None:
            load_trainable(self.model, ckpt.resolve_checkpoint(self.init), use_ema=False)
        t = self.cfg.train
        self.forward = distribute(self.model, self.model.generator, t, self.dist.world, self.device,
                                  self.dist.local_world)
        self.sharded = self.dist.world > 1 and t.parallel in SHARDED  # every rank takes part in every forward
        self.params = self.model.trainable_parameters()  # after distribute: FSDP2 makes them DTensors
        self.optimizers = build_optimizers(self.params, self.model.generator, t)
        self.schedulers = build_schedulers(self.optimizers, t)
        self.ema = EMA(self.params, t.ema_decay)
        self.batches = MixedBatches(sources.images, sources.pairs, t.batch_size // self.dist.world, t.mix_ratio, t.seed,
                                    self.dist.rank, self.dist.world, start, self.stream)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.pending_stop: str | None = None  # why this rank must stop before the next step
        self.log = RunLog(self.run_dir, enabled=self.dist.main)
        self.checkpoints = CheckpointManager(self.run_dir, self.cfg, self.model, self.ema, self.optimizers,
                                             self.schedulers, self.dist, log=self._print)

    def _continue_from(self) -> tuple[DataPosition, int]:
        """Where the run's data starts, and its random stream. A run started from another run's weights (stage 2:
        `init`, or the LoRA base) goes on where that run stopped: the next positions of the image and pair streams
        (a finite set's unseen items first), and a random stream of its own. With the same seed and stream it would
        replay that run's batches, noise and masks from step 0."""
        t = self.cfg.train
        origin = self.init if self.init is not None else (t.lora.base if t.lora.enabled else None)
        if origin is None:
            return DataPosition(), 0
        before = run_state(ckpt.resolve_checkpoint(origin))
        position = before.get("data_position", {})
        return (DataPosition(0, int(position.get("images", 0)), int(position.get("pairs", 0))),
                int(before.get("stream", 0)) + 1)

    # ---- state -------------------------------------------------------------------------------
    def save(self) -> Path:
        """Every rank saves its shards together (a rank that left early would end the launch)."""
        return self.checkpoints.save(self.step, {
            "nonfinite_total": self.nonfinite_total, "data": self.report.to_dict(), "stream": self.stream,
            "data_position": self.batches.state(self.step * self.cfg.train.grad_accum),
            "world_size": self.dist.world, "parallel": self.cfg.train.parallel})

    def resume(self) -> bool:
        found = self.checkpoints.latest()
        if found is None:
            return False
        changes = config_changes(load_config(found / CONFIG_FILE, check_paths=False), self.cfg, found)
        state = self.checkpoints.load(found)
        self.step, self.nonfinite_total = state["step"], state["nonfinite_total"]
        position = state["data_position"]
        self.batches.resume_from(DataPosition(position["micro_batch"], position["images"], position["pairs"]))
        self._apply_schedule()
        self._print(f"resumed from {found} at step {self.step}")
        for name, old, new in changes:
            self._print(f"  {name}: {old!r} -> {new!r} (applies from step {self.step})")
        return True

    def _apply_schedule(self) -> None:
        """The optimizer's hyper-parameters and LR schedule from this config (a resume may change them)."""
        t = self.cfg.train
        for scheduler in self.schedulers:
            scheduler.base_lrs = [t.lr for _ in scheduler.optimizer.param_groups]
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            for group in scheduler.optimizer.param_groups:
                group.update(initial_lr=t.lr, lr=t.lr * factor, weight_decay=t.weight_decay)
                if "betas" in group:  # AdamW's (Muon has a momentum instead)
                    group["betas"] = tuple(t.betas)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    # ---- one step ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.cfg.train.mixed_precision, self.device.type)

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        """The step's loss; its gradients accumulated over the micro-batches (synchronised at the last)."""
        self.model.train()
        total = 0.0
        for k, batch in enumerate(micro_batches):
            first = self.dist.rank * len(batch.captions)  # this rank's rows of the global micro-batch
            generator = sample_generators(self.cfg.train.seed, self.step, k, range(first, first + len(batch.captions)),
                                          self.stream)
            images = batch.images.to(self.device, non_blocking=True)
            with gradient_sync(self.forward, enabled=k == len(micro_batches) - 1):
                with self._autocast():
                    loss = self.forward(images, batch.captions, generator) / len(micro_batches)
                self.timer.backward(loss)
            total += float(loss.detach())
        return total

    def train_step(self, micro_batches: list[Batch]) -> StepOutcome:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        total = self.forward_backward(micro_batches)
        with self.timer("optimizer_and_ema"):
            grads = [p.grad for p in self.params.values() if p.grad is not None]
            clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
            grad_norm = (float(local_value(torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)))
                         if grads else 0.0)
            finite = math.isfinite(total) and math.isfinite(grad_norm)
            if finite:
                for optimizer in self.optimizers:
                    optimizer.step()
                self.ema.update(self.step)
            for scheduler in self.schedulers:
                scheduler.step()
        return StepOutcome(total, grad_norm, finite)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.cfg.train
        self.resume()
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        if self.step >= t.steps:
            self._print(f"nothing to do: step {self.step} >= train.steps {t.steps}")
            return self.run_dir
        self.log.start(self.step)
        self._print(f"precision: {describe_precision(t.mixed_precision, self.device.type)}")
        self.meter = ThroughputMeter(self)
        accum = t.grad_accum
        batches = iter(batch_loader(self.batches, self.step * accum, t.steps * accum, self.cfg.data.num_workers))
        signals = StopSignal()
        use_bar = self.progress and self.dist.main and sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, disable=not use_bar, dynamic_ncols=True, unit="step")
        started, first_step = time.time(), self.step
        try:
            while self.step < t.steps:
                with self.meter.data_wait():
                    micro = self._next_micro_batches(batches, accum)
                self._stop_if_any_rank_must(signals)
                with self.meter.step(micro):
                    outcome = self.train_step(micro)
                self.step += 1
                self._after_step(outcome, started, first_step, bar, plain=not use_bar)
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save()
            self._stop_if_any_rank_must(signals)
            self.save()
        finally:
            signals.restore()
            bar.close()
            self.log.close()
        self._finish()
        return self.run_dir

    def _next_micro_batches(self, batches: Iterator[Batch], accum: int) -> list[Batch]:
        micro = []
        for _ in range(accum):
            try:
                batch = next(batches)
            except TooMuchBadData as err:
                for where, reason in err.bad:
                    self.report.bad(where, reason)
                self.pending_stop = f"{err}; stopped instead of training on garbage"
                break
            self._count_bad(batch)
            micro.append(batch)
        return micro

    def _stop_if_any_rank_must(self, signals: StopSignal) -> None:
        """Collective: when any rank has a reason to stop, every rank saves (rank 0 writes) and raises."""
        if signals.requested and self.pending_stop is None:
            self.pending_stop = f"{SIGNAL} {signals.requested}"
        stops = self.dist.stop_requested(self.pending_stop)
        if stops is None:
            return
        self.save()
        report = self._merged_report()
        reasons = "; ".join(why if self.dist.world == 1 else f"rank {rank}: {why}" for rank, why in stops)
        if any(why.startswith(f"{SIGNAL} ") for _, why in stops):
            self._print(f"{reasons}: checkpoint saved at step {self.step}")
            raise TrainingInterrupted(f"{reasons}: checkpoint saved at step {self.step} in "
                                      f"{self.run_dir}; rerun the same command to resume")
        raise TrainingStopped(f"{reasons}\n{report.summary()}")

    def _merged_report(self) -> DataReport:
        return DataReport.merged(self.dist.gather(self.report.to_dict()))

    def _after_step(self, outcome: StepOutcome, started: float, first_step: int, bar: tqdm, plain: bool) -> None:
        t = self.cfg.train
        if outcome.finite:
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            self._print(f"warning: non-finite loss or gradient at step {self.step}; step skipped "
                        f"({self.nonfinite_in_row} in a row)")
            if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                self.pending_stop = (f"{self.nonfinite_in_row} non-finite steps in a row at step {self.step}; "
                                     "checkpoint saved. Lower train.lr, check the data, or use mixed_precision: fp32.")
        lr = self.schedulers[0].get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.1e}")
        if self.step % t.log_every == 0 or self.step == t.steps:
            elapsed = time.time() - started
            loss, skipped, nonfinite = self.dist.sum([outcome.loss, float(sum(self.report.skipped.values())),
                                                      float(self.nonfinite_total)])
            loss /= self.dist.world
            throughput = self.meter.read()
            heldout = self._held_out_loss() if self.held_out_pairs is not None else None
            if plain:
                self._print(step_line(self.step, t.steps, loss, lr, self.step - first_step, elapsed, heldout,
                                      throughput))
            scalars = {"loss": loss} | ({"heldout_loss": heldout} if heldout is not None else {})
            self.log.scalars(self.step, scalars | {"grad_norm": outcome.grad_norm, "lr": lr, "elapsed_s": elapsed,
                                                   "skipped_samples": skipped, "nonfinite_steps": nonfinite}
                             | throughput)
        if ((self.dist.main or self.sharded) and self.sample_fn is not None and t.sample_every
                and (self.step % t.sample_every == 0 or self.step == t.steps)):
            self.write_samples()

    def _held_out_loss(self) -> float:
        """The held-out pairs' loss under the live weights (the training loss's, not the EMA's), on every rank;
        `gathered` drops the forward order FSDP2 records for a backward, which none follows here."""
        self.model.eval()  # train_step turns training mode back on
        with gathered(self.model), self._autocast():
            return held_out_loss(self.forward, self.held_out_pairs, self.cfg.train.seed, self.batches.batch_size,
                                 self.device)

    def _count_bad(self, batch: Batch) -> None:
        for where, reason in batch.bad:
            self.report.bad(where, reason)
        for _ in range(len(batch.captions)):
            self.report.ok()
        limit = self.cfg.data.max_bad_fraction
        if self.report.seen >= MIN_SAMPLES_FOR_BAD_CHECK and self.report.exceeds(limit):
            self.pending_stop = (f"{self.report.bad_fraction:.1%} of samples are bad (limit data.max_bad_fraction="
                                 f"{limit:.1%}); stopped instead of training on garbage")

    def write_samples(self) -> None:
        """The sample grid and its metrics; a failure here is reported and never ends the run."""
        try:
            with self.ema.applied(), gathered(self.model), self._autocast():  # every rank, when sharded
                panel, metrics = self.sample_fn(self.model, self.cfg, self.held_out)
            if not panel or not self.dist.main:
                return
            grid = image_grid(panel)
            samples = self.run_dir / "samples"
            samples.mkdir(exist_ok=True)
            grid.save(samples / f"step_{self.step:08d}.png")
        except Exception as err:  # noqa: BLE001 - a broken sample grid must not cost the training run
            self.model.train()
            self._print(f"warning: sample grid at step {self.step} failed ({type(err).__name__}: {err}); "
                        "training goes on")
            return
        self.log.image("samples", self.step, grid)
        self.log.scalars(self.step, metrics)

    def _finish(self) -> None:
        if self.dist.main and (self.run_dir / "metrics.jsonl").is_file():
            rows = read_metrics(self.run_dir / "metrics.jsonl")
            plot_loss_curve(rows, self.run_dir / "loss.png")
            plot_throughput(rows, self.run_dir / "throughput.png")
        summary = self._merged_report().summary()
        self._print(summary)

    def _print(self, text: str) -> None:
        if self.dist.main:
            tqdm.write(text)


def train(cfg: Config, run_dir: str | Path, init: str | Path | None = None, progress: bool = True,
          sample_fn: SampleFn | None = None) -> Path:
    return Trainer(cfg, Path(run_dir), Path(init) if init else None, progress, sample_fn=sample_fn).fit()
