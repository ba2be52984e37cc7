"""`iomm study pair-budget`: does image-only pre-training save pairs? A learning curve over the number of
text-image pairs N at equal compute (the same stage-1 and stage-2 steps in every arm).

At each N, three arms per seed:

- `pairs-only`: both stages on the N pairs (the `recipes` study's pair+pair);
- `iomm`: the recipe's image-only stage 1, then the stage-2 mix (lambda = 0.5) on the N pairs;
- `image+pairs`: the same stage 1, then stage 2 on the N pairs alone (mix ratio 0); it separates the effect of
  pre-training from that of mixing, and is optional: the results need pairs-only and IOMM at every budget.

The ceiling is unlimited fresh pairs (`data.pairs: world-fresh:1`). A seed draws its own N-pair subset (the
world's pairs are drawn from `train.seed`), which every arm of that seed shares, as it shares the evaluation
prompts and noise; the image-only stage 1 does not depend on N, so it is trained once per seed and shared by
the image arms at every N. Comparisons are decided at the level of training runs (`seed_bootstrap`), on the
held-out compositions: the GenEval-tag prompts of this tiny world can be training captions word for word, so
their `overall` score rewards memorising a small N (`caption_overlap` measures how often), while no caption at
any N states a held-out composition.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iomm.evaluation.paired import NOT_DECIDED, OVERALL, t_interval
from iomm.lab.studies import FT, IMAGE, PAIR, Arm, Study, arm_configs, arm_dir, has_runs, provenance, run_arms
from iomm.lab.study_comparisons import compare_runs, format_interval, format_per_seed, verdict_words
from iomm.lab.study_report import CATEGORIES, wall_time
from iomm.nano.registration import FRESH_WORLD, WORLD
from iomm.nano.world import COMPOSITIONS, GENEVAL_TAGS

BUDGETS = (128, 512, 2048)
FRESH = "fresh"
# The score that decides the finding: compositions no training caption states, so a small N cannot memorise them.
DECIDING = COMPOSITIONS
PAIRS_ONLY, IOMM, IMAGE_PAIRS = "pairs-only", "iomm", "image+pairs"
METHODS = (PAIRS_ONLY, IOMM, IMAGE_PAIRS)
FINDING_LABELS = {"b_better": "reproduced", "a_better": "contradicted", "inconclusive": "inconclusive",
                  NOT_DECIDED: NOT_DECIDED}
DESCRIPTION = ("learning curve over the number of text-image pairs N at equal compute: pairs-only (both stages on "
               "the N pairs) vs IOMM (image-only stage 1, stage-2 mix at lambda 0.5 on the N pairs) vs image+pairs "
               "(image-only stage 1, stage 2 on the N pairs alone); the ceiling is unlimited fresh pairs")


def budget_label(n: int | None) -> str:
    """None: unlimited fresh pairs."""
    return FRESH if n is None else f"N={n}"


def budget_arms(budgets: tuple[int, ...]) -> dict[str, dict[str, Arm]]:
    """{budget label: {method: arm}}; the image arms of every budget share one stage-1 setting."""
    out = {}
    for n in [*budgets, None]:
        label = budget_label(n)
        pairs = f"data.pairs={FRESH_WORLD}:1" if n is None else f"data.pairs={WORLD}:{n}"
        out[label] = {PAIRS_ONLY: Arm(f"{PAIRS_ONLY}@{label}", (PAIR, pairs), FT["pair"]),
                      IOMM: Arm(f"{IOMM}@{label}", (IMAGE,), (pairs, *FT["mix"])),
                      IMAGE_PAIRS: Arm(f"{IMAGE_PAIRS}@{label}", (IMAGE,), (pairs, *FT["pair"]))}
    return out


def pair_budget_study(budgets: tuple[int, ...]) -> Study:
    arms = [arm for methods in budget_arms(budgets).values() for arm in methods.values()]
    return Study("pair-budget", arms, DESCRIPTION, reference=arms[0].name)


def budget_steps(budgets: tuple[int, ...], config: str, common: list[str]) -> dict[str, int]:
    """The compute every arm gets, as the configs say it."""
    study = pair_budget_study(budgets)
    stage1, stage2 = arm_configs(study, study.arms[0], config, common)
    assert stage2 is not None  # every arm of this study fine-tunes
    return {"stage1": stage1.train.steps, "stage2": stage2.train.steps,
            "total": stage1.train.steps + stage2.train.steps, "batch_size": stage1.train.batch_size}


def score_summary(values: list[float]) -> dict[str, Any]:
    """An arm's score over seeds: mean, standard deviation, 95% t-interval of the mean (None for one seed)."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "ci95": t_interval(values), "per_seed": values}


def pairs_to_match(curve: list[tuple[int, float]], ceiling: float, target: float) -> tuple[float | None, str]:
    """How many pairs pairs-only needs to score `target`: linear in log N between the budgets that bracket it
    (the first crossing); a bound where the curve does not bracket it (none where even unlimited fresh pairs
    score below it)."""
    if target <= curve[0][1]:
        return None, f"at most {curve[0][0]} pairs"
    for (n_low, low), (n_high, high) in zip(curve, curve[1:]):
        if low < target <= high:
            fraction = (target - low) / (high - low)
            pairs = math.exp(math.log(n_low) + fraction * (math.log(n_high) - math.log(n_low)))
            return pairs, f"about {pairs:.0f} pairs"
    if target <= ceiling:
        return None, f"more than {curve[-1][0]} pairs"
    return None, f"more pairs than exist (unlimited fresh pairs give it {ceiling:.3f})"


def pairs_only_curve(scores: dict, budgets: tuple[int, ...],
                     value: Callable[[dict], float]) -> tuple[list[tuple[int, float]], float]:
    """Pairs-only's deciding score at each budget, and its ceiling with fresh pairs, as `value` reads each from an
    arm's score summary (the mean over seeds, or one seed's score)."""
    pairs_only = scores[PAIRS_ONLY]
    return [(n, value(pairs_only[budget_label(n)][DECIDING])) for n in budgets], value(pairs_only[FRESH][DECIDING])


def pair_efficiency(scores: dict, budgets: tuple[int, ...], n: int) -> dict[str, Any]:
    """The pair-efficiency ratio at N: per seed, the pairs that pairs-only needs on its own curve to match that
    seed's IOMM at N (`pairs_to_match`), divided by N; their geometric mean and the 95% t-interval of the log
    ratios over seeds. While any seed's curve gives only a bound, the ratio is None and `bounds` says why."""
    matched = [pairs_to_match(*pairs_only_curve(scores, budgets, lambda summary: summary["per_seed"][seed]), target)
               for seed, target in enumerate(scores[IOMM][budget_label(n)][DECIDING]["per_seed"])]
    if any(pairs is None for pairs, _ in matched):
        return {"ratio": None, "ci95": None, "per_seed": None, "bounds": [phrase for _, phrase in matched]}
    logs = [math.log(pairs / n) for pairs, _ in matched]
    interval = t_interval(logs)
    return {"ratio": math.exp(statistics.fmean(logs)), "ci95": [math.exp(x) for x in interval] if interval else None,
            "per_seed": [math.exp(x) for x in logs], "bounds": None}


def caption_overlap(study: Study, arms: dict[str, dict[str, Arm]], budgets: tuple[int, ...], config: str,
                    common: list[str], seeds: int, per_category: int) -> dict[str, list[float]]:
    """{budget label: per seed, the share of the GenEval-tag evaluation prompts that one of the seed's N training
    captions states word for word}. Those prompts reward memorising a small caption set; the held-out compositions
    are stated by no caption at any N (tested), which is why the finding is decided on them."""
    from iomm.nano.prompts import eval_prompts
    from iomm.registry import split_pairs_spec

    tagged = [p["prompt"] for p in eval_prompts(per_category, seed=0) if p["tag"] in GENEVAL_TAGS]
    out = {}
    for n in budgets:
        label, shares = budget_label(n), []
        for seed in range(seeds):
            stage2 = arm_configs(study, arms[label][PAIRS_ONLY], config, [*common, f"train.seed={seed}"])[1]
            assert stage2 is not None  # every arm of this study fine-tunes
            source, count = split_pairs_spec(stage2.data.pairs)
            captions = {caption for _, caption in source.pairs(stage2, int(count)).pairs}
            shares.append(sum(prompt in captions for prompt in tagged) / len(tagged))
        out[label] = shares
    return out


def findings(scores: dict, paired: dict, budgets: tuple[int, ...]) -> list[dict[str, Any]]:
    """One sentence per budget on the held-out compositions, labelled by the seed-level verdict of IOMM against
    pairs-only there; the overall score and its label beside it."""
    pairs_only = scores[PAIRS_ONLY]
    curve, ceiling = pairs_only_curve(scores, budgets, lambda summary: summary["mean"])
    out = []
    for n in budgets:
        label = budget_label(n)
        iomm, base = scores[IOMM][label][DECIDING]["mean"], pairs_only[label][DECIDING]["mean"]
        matched, phrase = pairs_to_match(curve, ceiling, iomm)
        out.append({"pairs": n, "score": DECIDING, "iomm": iomm, "pairs_only": base, "pairs_to_match": matched,
                    "label": FINDING_LABELS[paired[label][IOMM][DECIDING]["verdict"]],
                    OVERALL: {"iomm": scores[IOMM][label][OVERALL]["mean"],
                              "pairs_only": pairs_only[label][OVERALL]["mean"],
                              "label": FINDING_LABELS[paired[label][IOMM][OVERALL]["verdict"]]},
                    "pair_efficiency": pair_efficiency(scores, budgets, n),
                    "sentence": f"At {n} pairs, IOMM scores {iomm:.3f} on held-out compositions against pairs-only's "
                                f"{base:.3f}; pairs-only needs {phrase} to match IOMM at {n}."})
    return out


def run_pair_budget(config: str, budgets: tuple[int, ...], seeds: int, out: Path, parallel: int, per_category: int,
                    common: list[str], samples: int = 4, command: str = "", only: tuple[str, ...] = ()) -> Path:
    """Every arm at every budget and seed, the seed-level comparisons with pairs-only, the results files (returns
    results.json's path). With `only` (arm names), those arms alone, and `partial.json` (`write_partial`) instead
    of the results files: a study too long for one sitting is run a group of arms at a time, in one folder."""
    out.mkdir(parents=True, exist_ok=True)
    arms = budget_arms(budgets)
    study = pair_budget_study(budgets)
    resumed = has_runs(out, study.arms)
    start = time.time()
    selected = [arm for arm in study.arms if not only or arm.name in only]
    rows = run_arms(study.name, selected, config, seeds, out, parallel, per_category, common, samples)
    scored = {arm.name for arm in selected}
    if not required_arms(arms) <= scored:
        return write_partial(out, arms, scored, rows, seeds, {
            "command": command, **provenance(config, common), "study": study.name, "config": config,
            "common": common, "seeds": seeds, "steps": budget_steps(budgets, config, common),
            "per_category": per_category, "samples": samples, "wall_s": time.time() - start, "resumed": resumed})
    method_of = {arm.name: (method, label) for label, methods in arms.items() for method, arm in methods.items()}
    for row in rows:
        row["method"], row["budget"] = method_of[row["arm"]]
    metrics = [m for m in CATEGORIES if all(m in row for row in rows)]
    scores = {method: {label: {m: score_summary([r[m] for r in rows if r["arm"] == arms[label][method].name])
                               for m in metrics} for label in arms if arms[label][method].name in scored}
              for method in METHODS}
    paired = compare_with_pairs_only(out, arms, seeds, scored)
    record = {"command": command, **provenance(config, common), "study": study.name, "description": DESCRIPTION,
              "config": config, "common": common, "seeds": seeds, "budgets": [*budgets, FRESH],
              "steps": budget_steps(budgets, config, common), "per_category": per_category, "samples": samples,
              "wall_s": time.time() - start, "resumed": resumed, "results": rows, "scores": scores,
              "paired": paired, "findings": findings(scores, paired, budgets),
              "caption_overlap": caption_overlap(study, arms, budgets, config, common, seeds, per_category)}
    (out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown_report(record), encoding="utf-8")
    plot_learning_curve(scores, budgets, out / "learning_curve.png", record["steps"], record["seeds"])
    return out / "results.json"


def required_arms(arms: dict[str, dict[str, Arm]]) -> set[str]:
    """The arms the results files need: pairs-only and IOMM at every budget (image+pairs where the budget allows)."""
    return {methods[method].name for methods in arms.values() for method in (PAIRS_ONLY, IOMM)}


def compare_with_pairs_only(out: Path, arms: dict[str, dict[str, Arm]], seeds: int,
                            scored: set[str]) -> dict[str, dict[str, Any]]:
    """{budget label: {method: seed-level result of that arm against pairs-only}}, at each budget where pairs-only
    is among the `scored` arms, for each other scored arm there."""
    return {label: {method: compare_runs(arm_dir(out, methods[PAIRS_ONLY]), arm_dir(out, methods[method]), seeds,
                                         edit=False)
                    for method in (IOMM, IMAGE_PAIRS) if methods[method].name in scored}
            for label, methods in arms.items() if methods[PAIRS_ONLY].name in scored}


def write_partial(out: Path, arms: dict[str, dict[str, Arm]], names: set[str], rows: list[dict], seeds: int,
                  record: dict[str, Any]) -> Path:
    """`partial.json`: the scored arms' rows and, at each budget where pairs-only is among them, the seed-level
    comparison of each other scored arm (`names`) with it. No finding: that needs pairs-only and IOMM at every
    budget."""
    paired = compare_with_pairs_only(out, arms, seeds, names)
    path = out / "partial.json"
    path.write_text(json.dumps({**record, "arms": sorted(names), "results": rows, "paired": paired}, indent=1),
                    encoding="utf-8")
    total = sum(len(methods) for methods in arms.values())
    report = [f"# Study `pair-budget`, {len(names)} of its {total} arms: {', '.join(sorted(names))}", "",
              f"{seeds} seeds; every arm {record['steps']['stage1']} stage-1 + {record['steps']['stage2']} stage-2 "
              f"steps of batch {record['steps']['batch_size']}. Machine: {record['machine']['cpu']}, "
              f"{record['precision']}.",
              f"Command: `{record['command']}`", "",
              "No finding yet: it needs pairs-only and IOMM at every budget.", "",
              *comparison_table(paired)]
    (out / "partial.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print("\n".join(report))
    return path


def markdown_report(record: dict) -> str:
    steps, budgets = record["steps"], list(record["scores"][PAIRS_ONLY])
    lines = [f"# Study `{record['study']}`: {record['description']}", "",
             f"{record['seeds']} seed{'s' if record['seeds'] > 1 else ''}; every arm {steps['stage1']} stage-1 + "
             f"{steps['stage2']} stage-2 steps of batch {steps['batch_size']}. Machine: {record['machine']['cpu']}, "
             f"{record['precision']}. "
             f"Wall time: {wall_time(record)}.",
             f"Command: `{record['command']}`", "",
             "Decided on the held-out compositions, which no training caption states: a GenEval-tag prompt can be a "
             "training caption word for word, so `overall` rewards memorising a small caption set.", "",
             *(f"- **{f['label']}**: {f['sentence']}" for f in record["findings"]),
             *(f"- pair-efficiency ratio at {f['pairs']} pairs: {efficiency_phrase(f['pair_efficiency'])}"
               for f in record["findings"] if "pair_efficiency" in f),
             *(f"- overall at {f['pairs']} pairs: IOMM {f[OVERALL]['iomm']:.3f}, pairs-only "
               f"{f[OVERALL]['pairs_only']:.3f} ({f[OVERALL]['label']}); GenEval-tag prompts a training caption "
               f"states word for word: {' / '.join(f'{share:.2f}' for share in record['caption_overlap'][label])} "
               f"(per seed)" for f in record["findings"] for label in [budget_label(f["pairs"])])]
    for metric, title in ((COMPOSITIONS, "Held-out compositions (no training caption states them)"),
                          (OVERALL, "Overall score (GenEval's six tags)")):
        if not all(metric in cells for method in METHODS for cells in record["scores"][method].values()):
            continue
        lines += ["", f"{title}, mean ± standard deviation over seeds (—: arm not run):", "",
                  "| arm | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for method in METHODS:
            cells = [record["scores"][method].get(label, {}).get(metric) for label in budgets]
            lines.append(f"| {method} | " + " | ".join(f"{c['mean']:.3f} ± {c['sd']:.3f}" if c else "—"
                                                       for c in cells) + " |")
    return "\n".join([*lines, "", *comparison_table(record["paired"])]) + "\n"


def comparison_table(paired: dict) -> list[str]:
    """The seed-level comparisons with pairs-only, a row per budget, arm and score (Markdown)."""
    return ["Against pairs-only at the same N (arm seed s against pairs-only seed s): difference, each seed's "
            "difference, bootstrap interval over seeds, prompts and images, t-interval over seeds, verdict.", "",
            "| N | arm | score | arm - pairs-only | per seed | 95% interval | t over seeds | verdict |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {label} | {method} | {metric} | {s['diff']:+.3f} | {format_per_seed(s)} | "
              f"{format_interval(s['ci95'])} | {format_interval(s['t_ci95'])} | "
              f"{verdict_words(s, PAIRS_ONLY, method)} |"
              for label, methods in paired.items() for method, result in methods.items()
              for metric in (COMPOSITIONS, OVERALL) if metric in result for s in [result[metric]])]


def efficiency_phrase(efficiency: dict[str, Any]) -> str:
    if efficiency["ratio"] is None:
        return "not measured: per seed, pairs-only needs " + " / ".join(efficiency["bounds"])
    interval = efficiency["ci95"]
    return (f"pairs-only needs {efficiency['ratio']:.2f}x the pairs (geometric mean over seeds"
            + (f"; 95% t-interval [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "") + "; per seed "
            + " / ".join(f"{r:.2f}" for r in efficiency["per_seed"]) + ")")


def plot_learning_curve(scores: dict, budgets: tuple[int, ...], out: Path, steps: dict[str, int],
                        seeds: int) -> None:
    """Score against N (log axis), one line per arm, the seeds' 95% t-intervals as error bars; the fresh-pairs
    ceiling sits right of the largest N. Left: the held-out compositions (the deciding score); right: overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [*budgets, budgets[-1] * 4]
    labels = [*map(budget_label, budgets), FRESH]
    metrics = [m for m in (COMPOSITIONS, OVERALL) if all(m in cells for method in METHODS
                                                           for cells in scores[method].values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for index, method in enumerate(METHODS):
            # side by side, so overlapping bars stay readable; an arm not run at a budget has no point there
            points = [(x * 1.12 ** (index - 1), label) for x, label in zip(xs, labels) if label in scores[method]]
            shifted = np.array([x for x, _ in points])
            ceiling = np.array([label == FRESH for _, label in points])
            summaries = [scores[method][label][metric] for _, label in points]
            means = np.array([s["mean"] for s in summaries])
            errors = np.array([[m - s["ci95"][0] if s["ci95"] else 0.0 for m, s in zip(means, summaries)],
                               [s["ci95"][1] - m if s["ci95"] else 0.0 for m, s in zip(means, summaries)]])
            line = ax.errorbar(shifted[~ceiling], means[~ceiling], yerr=errors[:, ~ceiling], label=method,
                               capsize=3, marker="o")
            ax.errorbar(shifted[ceiling], means[ceiling], yerr=errors[:, ceiling], color=line[0].get_color(),
                        capsize=3, marker="s")
            for x, summary in zip(shifted, summaries):  # each training run, beside the mean
                ax.scatter([x * 1.04] * len(summary["per_seed"]), summary["per_seed"], color=line[0].get_color(),
                           marker="x", s=18, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xticks(xs, [*map(str, budgets), "fresh"])
        ax.minorticks_off()
        ax.set_xlabel("text-image pairs N")
        ax.set_ylabel("overall score" if metric == OVERALL else "held-out compositions")
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
    bars = (f"bars: 95% t-intervals of each arm's mean over {seeds} seeds; crosses: each seed\n"
            "(a comparison is decided on the paired per-seed differences: results.md)") if seeds > 1 else \
        "one seed: no interval"
    fig.suptitle(f"equal compute: {steps['stage1']} + {steps['stage2']} steps; {bars}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
