"""Paired comparisons of a study's arms against its reference arm, and the verdict on the paper's finding.

Every arm is evaluated on the same held-out prompts (or edit cases) with the same noise, so arm and
reference are compared item by item (`iomm.evaluation.paired`): the items of all seeds are pooled, the
bootstrap resamples prompts and, within each, its images over samples and seeds. The reference arm is
the paper's best setting; the finding is

- **reproduced** when the reference beats every other arm (each 95% interval of arm - reference below 0);
- **contradicted** when some arm beats the reference (an interval above 0);
- **inconclusive** otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iomm.evaluation.paired import OVERALL, PairedItem, pair_records, paired_bootstrap
from iomm.evaluation.prompt_images import read_jsonl

SHAPES_RESULTS = "results.jsonl"  # per image, written by `iomm eval shapes --results`
EDITS_RESULTS = Path("metrics_edits") / "edits.jsonl"  # per edit case, written by `iomm eval edits`


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the per-item results of an arm are missing (rerun the study command)")
    return [record for _, record in read_jsonl(path)]


def _items(rows_ref: list[dict], rows_arm: list[dict], edit: bool, where: Path) -> list[PairedItem]:
    """Edit cases pair by case (each its own cluster); GenEval images by prompt."""
    fields = ("success", "kind", None) if edit else ("correct", "tag", "prompt")
    try:
        return pair_records(rows_ref, rows_arm, *fields)
    except ValueError as error:
        raise ValueError(f"{where} against the reference arm: {error}") from None


def compare_to_reference(arm_dirs: dict[str, Path], reference: str, seeds: int, edit: bool,
                         n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """{arm: paired result of arm (b) against the reference (a)} for every arm but the reference."""
    if reference not in arm_dirs:
        raise ValueError(f"reference arm {reference!r} is not among the arms {sorted(arm_dirs)}")
    name = EDITS_RESULTS if edit else Path(SHAPES_RESULTS)
    out = {}
    for arm, directory in arm_dirs.items():
        if arm == reference:
            continue
        items = []
        for seed in range(seeds):
            rows_ref = _read(arm_dirs[reference] / f"seed{seed}" / name)
            items += _items(rows_ref, _read(directory / f"seed{seed}" / name), edit, directory / f"seed{seed}")
        out[arm] = paired_bootstrap(items, n_boot=n_boot)
    return out


def finding(paired: dict[str, dict[str, Any]]) -> str:
    """reproduced / contradicted / inconclusive, from each arm's overall interval against the reference."""
    verdicts = [result[OVERALL]["verdict"] for result in paired.values()]
    if any(v == "b_better" for v in verdicts):
        return "contradicted"
    if verdicts and all(v == "a_better" for v in verdicts):
        return "reproduced"
    return "inconclusive"


def markdown_table(paired: dict[str, dict[str, Any]], reference: str) -> list[str]:
    lines = [f"Paired against `{reference}` (same prompts and noise; 95% bootstrap interval over prompts, "
             f"samples and seeds): overall, arm - reference. Finding: **{finding(paired)}**.", "",
             "| arm | reference | arm | arm - reference | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for arm, result in paired.items():
        s = result[OVERALL]
        verdict = {"a_better": "reference better", "b_better": "arm better"}.get(s["verdict"], "inconclusive")
        lines.append(f"| {arm} | {s['a']:.3f} | {s['b']:.3f} | {s['diff']:+.3f} | "
                     f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] | {verdict} |")
    return lines
