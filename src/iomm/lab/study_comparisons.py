"""Paired comparisons of a study's arms against its reference arm, and the verdict on the paper's finding.

Every arm is evaluated on the same held-out prompts (or edit cases) with the same noise, and every arm of a
seed shares that seed's training draw, so arm and reference are compared run by run: arm seed s against
reference seed s (`iomm.evaluation.paired.seed_bootstrap`: a hierarchical bootstrap over seeds, then prompts,
then images, and a t-interval over the per-seed differences). The unit of replication is the training run:
one seed decides nothing. The reference arm is the paper's best setting; the finding is

- **one training run: not decided** with a single seed;
- **reproduced** when the reference beats every other arm (each seed-level interval of arm - reference below 0);
- **contradicted** when some arm beats the reference (an interval above 0);
- **inconclusive** otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iomm.evaluation.paired import NOT_DECIDED, OVERALL, PairedItem, pair_records, seed_bootstrap
from iomm.evaluation.prompt_images import read_jsonl
from iomm.nano.world import COMPOSITIONS

SHAPES_RESULTS = "results.jsonl"  # per image, written by `iomm eval shapes --results`
EDITS_RESULTS = Path("metrics_edits") / "edits.jsonl"  # per edit case, written by `iomm eval edits`


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the per-item results of an arm are missing (rerun the study command)")
    return [record for _, record in read_jsonl(path)]


def _items(rows_ref: list[dict], rows_arm: list[dict], edit: bool, where: Path) -> list[PairedItem]:
    """Edit cases pair by case (each its own cluster) on their attribute-level `score` (the mean of target changed
    and the rest kept: an exact match is too rare to tell arms apart); GenEval images by prompt."""
    fields = ("score", "kind", None) if edit else ("correct", "tag", "prompt")
    try:
        return pair_records(rows_ref, rows_arm, *fields)
    except ValueError as error:
        raise ValueError(f"{where} against the reference arm: {error}") from None


def compare_to_reference(arm_dirs: dict[str, Path], reference: str, seeds: int, edit: bool,
                         n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """{arm: paired result of arm (b) against the reference (a)} for every arm but the reference."""
    if reference not in arm_dirs:
        raise ValueError(f"reference arm {reference!r} is not among the arms {sorted(arm_dirs)}")
    return {arm: compare_runs(arm_dirs[reference], directory, seeds, edit, n_boot)
            for arm, directory in arm_dirs.items() if arm != reference}


def compare_runs(reference_dir: Path, arm_dir: Path, seeds: int, edit: bool, n_boot: int = 2000) -> dict[str, Any]:
    """The seed-level paired result of the arm in `arm_dir` (b) against the one in `reference_dir` (a), each holding
    one `seed{s}` run per seed."""
    name = EDITS_RESULTS if edit else Path(SHAPES_RESULTS)
    runs = {f"seed{seed}": _items(_read(reference_dir / f"seed{seed}" / name), _read(arm_dir / f"seed{seed}" / name),
                                  edit, arm_dir / f"seed{seed}")
            for seed in range(seeds)}
    return seed_bootstrap(runs, n_boot=n_boot, outside_overall=(COMPOSITIONS,))


def finding(paired: dict[str, dict[str, Any]]) -> str:
    """reproduced / contradicted / inconclusive from each arm's overall verdict against the reference; not decided
    when a comparison rests on one training run."""
    verdicts = [result[OVERALL]["verdict"] for result in paired.values()]
    if any(v == NOT_DECIDED for v in verdicts):
        return NOT_DECIDED
    if any(v == "b_better" for v in verdicts):
        return "contradicted"
    if verdicts and all(v == "a_better" for v in verdicts):
        return "reproduced"
    return "inconclusive"


def markdown_table(paired: dict[str, dict[str, Any]], reference: str) -> list[str]:
    """The overall comparisons; seed-level results (`seed_bootstrap`) add their per-seed differences and t-interval."""
    lines = [f"Paired against `{reference}` (same prompts and noise, arm seed s against reference seed s): overall, "
             "arm - reference, with 95% intervals from a bootstrap over seeds, prompts and images and a t-interval "
             f"over seeds. Finding: **{finding(paired)}**.", "",
             "| arm | reference | arm | arm - reference | per seed | 95% interval | t over seeds | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, result in paired.items():
        s = result[OVERALL]
        lines.append(f"| {arm} | {s['a']:.3f} | {s['b']:.3f} | {s['diff']:+.3f} | {format_per_seed(s)} | "
                     f"{format_interval(s['ci95'])} | {format_interval(s.get('t_ci95'))} | {verdict_words(s)} |")
    return lines


def verdict_words(summary: dict[str, Any], reference: str = "reference", arm: str = "arm") -> str:
    """A comparison's verdict as a reader says it: which side is better, or why neither is."""
    return {"a_better": f"{reference} better", "b_better": f"{arm} better"}.get(summary["verdict"], summary["verdict"])


def format_per_seed(summary: dict[str, Any]) -> str:
    """Each training run's difference, in seed order; "-" for a comparison without seeds."""
    return " ".join(f"{d:+.3f}" for d in summary.get("per_seed", {}).values()) or "-"


def format_interval(interval: list[float] | None) -> str:
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "-"
