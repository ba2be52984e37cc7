"""`iomm study vlm-timing`: when should a VLM see images? Keh et al. 2025 ("Should VLMs be Pre-trained with
Image Data?", arXiv 2503.07603) with the nano MLLM.

Every arm trains the nano MLLM from scratch for the same number of steps: text only (captions, scene
descriptions and questions about them) until `image_start` of pre-training, then image and text sequences,
then a final image phase that every arm has (`NanoMLLMConfig.image_start`, `image_phase`). Each is scored on
held-out questions with the image and on the same questions about the scene in text, and paired against
image_start = 0.8 (the paper's best) answer by answer: the same questions for every arm of a seed. The link
back to IOMM: a short stage-1 run on the best and on the worst arm's MLLM, compared by regeneration fidelity.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from iomm.evaluation.paired import NOT_DECIDED, OVERALL, PairedItem, pair_records, paired_bootstrap, seed_bootstrap
from iomm.evaluation.prompt_images import read_jsonl
from iomm.lab.studies import arm_sets, iomm_argv, run_logged
from iomm.lab.study_comparisons import markdown_table
from iomm.lab.study_report import markdown_summary, plot_summary, summarize
from iomm.nano.understanding import UNDERSTANDING_RECORDS
from iomm.training.hardware import machine_facts

IMAGE_STARTS = (0.0, 0.2, 0.5, 0.8, 1.0)
REFERENCE, FULLY_TEXT_TRAINED = "image_start=0.8", "image_start=1.0"
# every arm: a final fifth of training with images (the only one for image_start = 1), descriptions in half
# the text sequences (so text alone can teach layout)
COMMON = ("image_phase=0.2", "description_prob=0.5")
VISION_KINDS = ("caption", "color", "shape", "count", "relation")
TEXT_KINDS = ("color", "shape", "count", "relation")  # a caption is the text path's context, not a question
DESCRIPTION = ("the nano MLLM trained from scratch at equal steps, images entering at image_start of pre-training "
               "(0: from the start; 1: a fully text-trained LM, images in the final phase only)")


def arm_name(image_start: float) -> str:
    return f"image_start={image_start}"


def mllm_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"seed{seed}"


def train_command(image_start: float, seed: int, steps: int, overrides: list[str], out: Path) -> list[str]:
    sets = [*COMMON, *overrides, f"image_start={image_start}"]
    return [*iomm_argv(), "mllm", "train", "--out", str(out), "--steps", str(steps), "--seed", str(seed),
            "--threads", "1", *[f"--set={s}" for s in sets]]


def train_arm(image_start: float, seed: int, steps: int, overrides: list[str], out: Path) -> dict[str, float]:
    """One MLLM (resumes: returns at once when its evaluation exists) and its accuracies."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "understanding.json").is_file():
        run_logged(train_command(image_start, seed, steps, overrides, out), out.parent / f"seed{seed}.log")
    return arm_metrics(json.loads((out / "understanding.json").read_text(encoding="utf-8")))


def arm_metrics(understanding: dict[str, Any]) -> dict[str, float]:
    vision = {f"vision_{k}": understanding["accuracy"][k] for k in VISION_KINDS}
    text = {f"text_{k}": understanding["text_accuracy"][k] for k in TEXT_KINDS}
    return {**vision, "vision_overall": statistics.fmean(vision.values()),
            **text, "text_overall": statistics.fmean(text.values())}


def paired_items(ref_dir: Path, arm_dir: Path, path: str, kinds: tuple[str, ...],
                 seeds: int) -> dict[str, list[PairedItem]]:
    """{training seed: the answers of two arms' runs of that seed to the same held-out questions}, each question
    its own cluster: the seed is the unit of replication (`seed_bootstrap`)."""
    runs = {}
    for seed in range(seeds):
        rows = []
        for directory in (ref_dir, arm_dir):
            file = directory / f"seed{seed}" / UNDERSTANDING_RECORDS
            if not file.is_file():
                raise FileNotFoundError(f"{file}: an arm's per-answer records are missing (rerun the study)")
            rows.append([r for _, r in read_jsonl(file) if r["path"] == path and r["tag"] in kinds])
        runs[str(seed)] = pair_records(*rows, "correct", "tag", "prompt")
    return runs


def compare(out: Path, seeds: int, n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """{"image"|"text" (the question's path): {arm: seed-level paired result of arm (b) against the reference (a)}}."""
    arms = [arm_name(s) for s in IMAGE_STARTS if arm_name(s) != REFERENCE]
    return {path: {arm: seed_bootstrap(paired_items(out / REFERENCE, out / arm, path, kinds, seeds), n_boot=n_boot)
                   for arm in arms}
            for path, kinds in (("image", VISION_KINDS), ("text", TEXT_KINDS))}


def timing_finding(paired: dict[str, dict[str, Any]]) -> str:
    """The paper's claim: images at 80% of pre-training beat images added to a fully text-trained LM (vision),
    and text performance is kept. Reproduced when 0.8 is decidedly better on vision and not decidedly worse
    on text; contradicted when it is decidedly worse on vision; inconclusive otherwise."""
    vision = paired["image"][FULLY_TEXT_TRAINED][OVERALL]["verdict"]  # a = reference (0.8), b = 1.0
    text = paired["text"][FULLY_TEXT_TRAINED][OVERALL]["verdict"]
    if vision == NOT_DECIDED:
        return NOT_DECIDED
    if vision == "a_better" and text != "b_better":
        return "reproduced"
    if vision == "b_better":
        return "contradicted"
    return "inconclusive"


def link_run(out: Path, arm: str, config: str, steps: int, n: int, overrides: list[str]) -> dict[str, Any]:
    """A short stage 1 of the nano recipe on seed 0's MLLM of `arm`, scored at ratio 0 (resumes when scored)."""
    run, log = out / "link" / arm, out / "link" / f"{arm}.log"
    if not (run / "fidelity.json").is_file():
        run.parent.mkdir(parents=True, exist_ok=True)
        sets = arm_sets(overrides, 0, (f"mllm.path={mllm_dir(out, arm, 0).resolve()}", f"train.steps={steps}"))
        run_logged([*iomm_argv(), "pretrain", "--config", config, *sets, "--no-progress", "--out", str(run)], log)
        run_logged([*iomm_argv(), "eval", "reconstruct", "--model", str(run), "--ratio", "0", "--n", str(n),
                    "--out", str(run / "fidelity.json"), "--results", str(run / "fidelity.jsonl")], log)
    return {"arm": arm, **json.loads((run / "fidelity.json").read_text(encoding="utf-8"))["ratios"]["0.0"]}


def link_to_iomm(out: Path, config: str, summary: dict, steps: int, n: int, overrides: list[str],
                 parallel: int) -> dict[str, Any]:
    """Stage 1 on the best and on the worst arm's MLLM (by mean vision accuracy), paired best - worst on `exact`."""
    ranked = sorted(summary, key=lambda arm: summary[arm]["vision_overall"][0])
    roles = {"best": ranked[-1], "worst": ranked[0]}
    with ThreadPoolExecutor(max_workers=min(parallel, 2)) as pool:
        futures = {role: pool.submit(link_run, out, arm, config, steps, n, overrides) for role, arm in roles.items()}
        runs = {role: future.result() for role, future in futures.items()}
    rows = [[r for _, r in read_jsonl(out / "link" / roles[role] / "fidelity.jsonl")] for role in ("worst", "best")]
    paired = paired_bootstrap(pair_records(*rows, "exact", "ratio", "scene"))
    return {"stage1_steps": steps, "n": n, **runs, "exact_best_minus_worst": paired[OVERALL]}


def run_vlm_timing(out: Path, config: str, seeds: int, steps: int, parallel: int, overrides: list[str],
                   link_steps: int, link_n: int, command: str, link_overrides: list[str] = ()) -> Path:
    """Every arm x seed (`parallel` 1-thread processes), the paired comparisons, the link runs; the results files."""
    out.mkdir(parents=True, exist_ok=True)
    resumed = any((out / arm_name(s)).is_dir() for s in IMAGE_STARTS)
    start = time.time()
    jobs = [(s, seed) for seed in range(seeds) for s in IMAGE_STARTS]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(train_arm, s, seed, steps, overrides, mllm_dir(out, arm_name(s), seed)): (s, seed)
                   for s, seed in jobs}
        results = []
        for future, (s, seed) in futures.items():
            metrics = future.result()
            print(f"[vlm-timing] {arm_name(s)} seed {seed}: vision {metrics['vision_overall']:.3f}, "
                  f"text {metrics['text_overall']:.3f}", flush=True)
            results.append({"arm": arm_name(s), "seed": seed, **metrics})
    summary = summarize(results)
    paired = compare(out, seeds)
    record = {"command": command, "machine": machine_facts(), "study": "vlm-timing", "description": DESCRIPTION,
              "config": config,
              "common": [*COMMON, *overrides], "steps": steps, "seeds": seeds, "results": results,
              "summary": summary, "reference": REFERENCE, "paired": paired["image"], "paired_text": paired["text"],
              "finding": timing_finding(paired)}
    if link_steps > 0:
        record["link"] = link_to_iomm(out, config, summary, link_steps, link_n, list(link_overrides), parallel)
    record.update(wall_s=time.time() - start, resumed=resumed)
    (out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)
    plot_summary(summary, out / "results.png", "vlm-timing")
    (out / "results.md").write_text(markdown(record), encoding="utf-8")
    return out


def markdown(record: dict[str, Any]) -> str:
    means = markdown_summary({k: v for k, v in record.items() if k != "paired"}).rstrip()
    lines = [means, "", f"The paper's claim (images at 0.8 beat images after a fully text-trained LM, 1.0, on vision, "
             f"and text is kept): **{record['finding']}**.", "",
             f"Vision questions ({', '.join(VISION_KINDS)}), paired against `{record['reference']}`, answer by answer "
             "(95% bootstrap interval over questions and seeds):", "",
             *markdown_table(record["paired"], record["reference"])[2:], "",
             f"The same questions about the scene in text ({', '.join(TEXT_KINDS)}; no image), paired the same way:",
             "", *markdown_table(record["paired_text"], record["reference"])[2:]]
    if "link" in record:
        link, diff = record["link"], record["link"]["exact_best_minus_worst"]
        lines += ["", f"Link to IOMM: {link['stage1_steps']} stage-1 steps on each MLLM, `exact` at ratio 0 "
                  f"({link['n']} scenes): best `{link['best']['arm']}` {link['best']['exact']:.3f}, worst "
                  f"`{link['worst']['arm']}` {link['worst']['exact']:.3f}, best - worst {diff['diff']:+.3f} "
                  f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]."]
    return "\n".join(lines) + "\n"
