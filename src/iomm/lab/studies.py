"""The paper's findings at nano scale: arms of equal compute, several seeds, scored on held-out prompts.

Each arm is one pre-train + fine-tune run (or a pre-train only, for editing) of the nano recipe with
its own overrides. Arms run as separate processes, `--parallel` at a time with one thread each
(on a 2-core CPU two 1-thread jobs give more throughput than one 2-thread job).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iomm.lab.study_comparisons import SHAPES_RESULTS, compare_to_reference, finding
from iomm.lab.study_report import (
    markdown_summary,
    mean_curve,
    plot_curves,
    plot_summary,
    reconstruction_curve,
    summarize,
)
from iomm.nano.edits import CASES_PER_KIND

if TYPE_CHECKING:
    from iomm.config import Config


@dataclass(frozen=True)
class Arm:
    name: str
    pretrain: tuple[str, ...] = ()  # overrides for stage 1 (None-stage arms skip it)
    finetune: tuple[str, ...] | None = ()  # overrides for stage 2; None: no fine-tuning
    skip_pretrain: bool = False
    edit: bool = False


@dataclass
class Study:
    name: str
    arms: list[Arm]
    description: str
    reference: str  # the paper's best arm: every other arm is compared with it, pair by pair
    common: list[str] = field(default_factory=list)  # overrides for every arm, before the command line's
    curves: bool = False  # also record stage-1 regeneration error against training steps


IMAGE, PAIR = "train.mix_ratio=1.0", "train.mix_ratio=0.0"
NO_QUERY_LOSS = ("adapter.token_loss=0",)
# configs/nano.yaml's options that make stage 1 carry the layout, turned off: the paper's conditioning path
PAPER_PATH = ("adapter.key_positions=false", "adapter.query_scale=1", *NO_QUERY_LOSS,
              "connector.token_positions=false", "flow.logit_mean=0")
FT = {"image": ("finetune.mix_ratio=1.0",), "pair": ("finetune.mix_ratio=0.0",), "mix": ("finetune.mix_ratio=0.5",)}


def studies() -> dict[str, Study]:
    return {
        "recipes": Study("recipes", [
            Arm(f"{pre}+{ft}", (IMAGE if pre == "image" else PAIR,), FT[ft])
            for pre in ("image", "pair") for ft in ("image", "pair", "mix")],
            "pre-train on images or pairs x fine-tune on images, pairs or the mix (lambda = 0.5)", "image+mix"),
        "mask-ratio": Study("mask-ratio", [
            Arm(f"r={r}", (f"masking.ratio={r}",), FT["mix"]) for r in (0.0, 0.25, 0.45, 0.65, 0.85, 0.95)],
            "stage-1 mask ratio r, then the same mix fine-tuning", "r=0.45",
            common=["train.sample_every=100"], curves=True),
        "mix-ratio": Study("mix-ratio", [
            Arm(f"lambda={lam}", (), (f"finetune.mix_ratio={lam}",)) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)],
            "fraction of image-only samples in fine-tuning batches", "lambda=0.5"),
        "adapter": Study("adapter", [
            Arm(kind, (f"adapter.kind={kind}", *NO_QUERY_LOSS * (kind == "raw")), FT["mix"])
            for kind in ("raw", "free_queries", "rqa")],
            "no adapter vs MetaQuery-style free queries vs the Residual Query Adapter (raw has no queries for "
            "adapter.token_loss to read: it trains without it)", "rqa",
            common=["train.sample_every=100"], curves=True),
        "lora-mix": Study("lora-mix", [
            *(Arm(f"lora-{ft}", (PAIR,), ("train.lora.enabled=true", *FT[ft])) for ft in ("mix", "pair", "image")),
            Arm("existing", (PAIR,), None)],
            "LoRA fine-tuning (rank 64, alpha 64, the generator's attention) of a model pre-trained on pairs only, the "
            "'existing model': on the mix, on pairs only, or on images only, at equal steps; and the existing model "
            "itself", "lora-mix"),
        "condition-path": Study("condition-path", [
            Arm("nano", (), FT["mix"]), Arm("paper-path", PAPER_PATH, FT["mix"])],
            "configs/nano.yaml's conditioning path (positions on the adapter's keys and the condition tokens, queries "
            "at the image tokens' scale, the token loss, high-noise draws) against the paper's, through both stages "
            "and the mix fine-tuning: does a stage 1 that carries the image carry over to text-to-image? (Not a "
            "paper finding: 'reproduced' means the nano path is better.)", "nano"),
        "editing": Study("editing", [
            Arm(f"{pre}-pretrain", (IMAGE if pre == "image" else PAIR,), None, edit=True) for pre in ("image", "pair")],
            "zero-shot editing after image-only vs pair pre-training (no editing data), compared per case on the mean "
            "of target (the instructed change happened) and kept (nothing else changed)", "image-pretrain"),
    }


def arm_configs(study: Study, arm: Arm, config: str, overrides: list[str]) -> tuple[Config, Config | None]:
    """The stage-1 and stage-2 configs an arm runs with (stage 2: None for an arm without fine-tuning)."""
    from iomm.config import config_source
    from iomm.config_checks import finetune_config, load_config

    sets = [*study.common, *overrides, *arm.pretrain]
    stage1 = load_config(config, sets, check_paths=False)
    if arm.finetune is None:
        return stage1, None
    sets = [*sets, *arm.finetune]
    return stage1, finetune_config(load_config(config, sets, check_paths=False), config_source(config, sets))


def check_arms(study: Study, config: str, overrides: list[str]) -> None:
    """Every arm's stage-1 and stage-2 config is valid: a clash fails before any compute, not mid-study."""
    for arm in study.arms:
        arm_configs(study, arm, config, overrides)


def run_logged(argv: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("a", encoding="utf-8") as f:
        subprocess.run(argv, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)


def iomm_argv() -> list[str]:
    return [sys.executable, "-m", "iomm.cli"]


def arm_sets(common: list[str], seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"--set={s}" for s in [*common, f"train.seed={seed}", "train.threads=1", *extra]]


def pretrain_dir(study_out: Path, arm: Arm, seed: int) -> Path:
    """Arms with the same stage-1 overrides share one pre-training run per seed (recipes: 2, not 6)."""
    return study_out / "pretrain" / ("+".join(arm.pretrain) or "default") / f"seed{seed}"


def arm_dir(study_out: Path, arm: Arm) -> Path:
    return study_out / arm.name.replace("/", "_")


def has_runs(study_out: Path, arms: list[Arm]) -> bool:
    """Whether the folder holds earlier work of these arms (trained, or restored from committed records)."""
    return (study_out / "pretrain").is_dir() or any(arm_dir(study_out, arm).is_dir() for arm in arms)


def pretrain_command(arm: Arm, config: str, common: list[str], seed: int, out: Path) -> list[str]:
    return [*iomm_argv(), "pretrain", "--config", config, *arm_sets(common, seed, arm.pretrain),
            "--out", str(out), "--no-progress"]


def arm_commands(arm: Arm, config: str, common: list[str], seed: int, out: Path, pretrained: Path | None,
                 per_category: int, samples: int = 4) -> list[list[str]]:
    """The iomm commands of one arm and seed after its pre-training, in order (each resumable). An arm without
    fine-tuning or editing scores its pre-trained model itself (`lora-mix`: the existing model)."""
    cmds = []
    if arm.finetune is not None:
        init = "none" if pretrained is None else str(pretrained)
        sets = arm_sets(common, seed, (*arm.pretrain, *arm.finetune))
        cmds.append([*iomm_argv(), "finetune", "--config", config, *sets, "--init", init,
                     "--out", str(out / "finetune"), "--no-progress"])
    if not arm.edit:
        scored = out / "finetune" if arm.finetune is not None else pretrained
        cmds.append([*iomm_argv(), "eval", "shapes", "--model", str(scored), "--out", str(out / "metrics.json"),
                     "--per-category", str(per_category), "--samples", str(samples), "--seed", "0",
                     "--results", str(out / SHAPES_RESULTS)])
    if arm.edit:
        cmds.append([*iomm_argv(), "eval", "edits", "--model", str(pretrained), "--out", str(out / "metrics.json"),
                     "--per-kind", str(CASES_PER_KIND), "--seed", "0"])
    return cmds


def run_pretrain(arm: Arm, config: str, common: list[str], seed: int, out: Path) -> Path:
    """Stage 1 of an arm; resumes an interrupted run and returns at once when it is complete."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "done").is_file():
        run_logged(pretrain_command(arm, config, common, seed, out), out / "log.txt")
        (out / "done").write_text("", encoding="utf-8")
    return out


def run_arm(arm: Arm, config: str, common: list[str], seed: int, out: Path, pretrained: Path | None,
            per_category: int, samples: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    start = time.time()
    for argv in arm_commands(arm, config, common, seed, out, pretrained, per_category, samples):
        run_logged(argv, out / "log.txt")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    metrics["wall_s"] = time.time() - start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def run_arms(label: str, arms: list[Arm], config: str, seeds: int, out: Path, parallel: int, per_category: int,
             common: list[str], samples: int) -> list[dict]:
    """Every arm of every seed, `parallel` 1-thread processes at a time; one row of metrics per arm and seed.

    A pre-training run (one per distinct stage-1 setting and seed) is skipped once every arm that needs it is scored.
    Pre-training runs start first; an arm's stage 2 and evaluation start as soon as its own pre-training is done, so
    no worker idles while another stage 1 runs."""
    jobs = [(arm, seed) for seed in range(seeds) for arm in arms]
    job_dir = {job: arm_dir(out, job[0]) / f"seed{job[1]}" for job in jobs}
    needs = {job: None if job[0].skip_pretrain else pretrain_dir(out, *job) for job in jobs}
    stage1: dict[Path, tuple[Arm, int]] = {}  # pre-training dir -> the first job that needs it
    for job in jobs:
        if needs[job] is not None and not (job_dir[job] / "metrics.json").is_file():
            stage1.setdefault(needs[job], job)
    waiting_stage1, waiting_arms = list(stage1), list(jobs)
    done_stage1: set[Path] = set()
    running: dict[Future, tuple[str, Any]] = {}
    metrics: dict[tuple[Arm, int], dict] = {}
    start = time.time()

    def ready(job: tuple[Arm, int]) -> bool:
        return needs[job] is None or needs[job] not in stage1 or needs[job] in done_stage1

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting_stage1 or waiting_arms or running:
            while len(running) < parallel:
                if waiting_stage1:
                    path = waiting_stage1.pop(0)
                    arm, seed = stage1[path]
                    running[pool.submit(run_pretrain, arm, config, common, seed, path)] = ("stage1", path)
                    continue
                job = next((job for job in waiting_arms if ready(job)), None)
                if job is None:
                    break
                waiting_arms.remove(job)
                running[pool.submit(run_arm, job[0], config, common, job[1], job_dir[job], needs[job], per_category,
                                    samples)] = ("arm", job)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                kind, item = running.pop(future)
                result = future.result()
                if kind == "stage1":
                    done_stage1.add(item)
                    print(f"[{label}] pre-training {item.relative_to(out)} done at {time.time() - start:.0f} s",
                          flush=True)
                    continue
                arm, seed = item
                metrics[item] = result
                headline = "edit_score" if arm.edit else "overall"
                print(f"[{label}] {arm.name} seed {seed}: {headline} {result.get(headline, float('nan')):.3f} "
                      f"at {time.time() - start:.0f} s", flush=True)
    return [{"arm": arm.name, "seed": seed, **numeric(metrics[(arm, seed)])} for arm, seed in jobs]


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """An arm's numbers for the results table: its scores, and the accuracy of each tally (the scorer's split of
    the colour-bearing tags into held-out and seen colour-shape pairs)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "accuracy" in value:
            value = value["accuracy"]
        if isinstance(value, (int, float)):
            out[key] = value
    return out


def provenance(config: str, common: list[str]) -> dict[str, Any]:
    """Where a study ran: the machine, the precision its arms train in there (and why), and the built-in models
    its arms share as they were built."""
    from iomm.config_checks import load_config
    from iomm.nano.registration import builtin_records
    from iomm.training.hardware import machine_facts
    from iomm.training.precision import describe_precision

    cfg = load_config(config, common)
    return {"machine": machine_facts(), "precision": describe_precision(cfg.train.mixed_precision),
            "builtins": builtin_records(cfg)}


def run_study(study: Study, config: str, seeds: int, out: Path, parallel: int, per_category: int,
              common: list[str], samples: int = 4, command: str = "") -> Path:
    """Every arm at every seed (`run_arms`), the seed-level comparisons with the reference, the results files."""
    out.mkdir(parents=True, exist_ok=True)
    common = [*study.common, *common]
    resumed = has_runs(out, study.arms)
    start = time.time()
    results = run_arms(study.name, study.arms, config, seeds, out, parallel, per_category, common, samples)
    summary = summarize(results)
    edit = any(arm.edit for arm in study.arms)
    paired = compare_to_reference({arm.name: arm_dir(out, arm) for arm in study.arms}, study.reference, seeds, edit)
    record = {"command": command, **provenance(config, common), "study": study.name,
              "description": study.description, "config": config, "common": common,
              "seeds": seeds, "per_category": per_category, "samples": samples, "wall_s": time.time() - start,
              "resumed": resumed, "results": results, "summary": summary, "reference": study.reference,
              "paired": paired, "finding": finding(paired)}
    if study.curves:
        record["curves"] = {arm.name: mean_curve([reconstruction_curve(pretrain_dir(out, arm, seed))
                                                  for seed in range(seeds)]) for arm in study.arms}
        plot_curves(record["curves"], out / "curves.png", study.name)
    (out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        keys = sorted({k for r in results for k in r})
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    plot_summary(summary, out / "results.png", study.name)
    (out / "results.md").write_text(markdown_summary(record), encoding="utf-8")
    return out
