"""The files a study writes: the mean +- standard deviation over seeds of every arm's scores, `results.md`, the
bar chart of the scores and the stage-1 regeneration curves."""

from __future__ import annotations

import statistics
from pathlib import Path

from iomm.lab.study_comparisons import markdown_table
from iomm.nano.world import COMPOSITIONS, GENEVAL_TAGS
from iomm.training.run_log import read_metrics

# GenEval's tags, their mean, and the held-out compositions (scored apart from `overall`)
CATEGORIES = (*GENEVAL_TAGS, "overall", COMPOSITIONS)


def spread(values: list[float]) -> float:
    """Standard deviation over seeds; 0 for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


CURVE_KEYS = ("recon_mse_own", "recon_mse_other")


def reconstruction_curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """Step -> MSE of the stage-1 regenerations against their own originals and against other images,
    as logged with each sample grid: the gap between the two is how much the condition is followed."""
    curve = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if all(k in row for k in CURVE_KEYS):  # a resumed run logs a step again: keep the last
            curve[int(row["step"])] = tuple(float(row[k]) for k in CURVE_KEYS)
    return curve


def mean_curve(curves: list[dict[int, tuple[float, float]]]) -> dict[str, list[float]]:
    """Mean and spread over seeds at the steps every seed logged."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    out: dict[str, list[float]] = {"step": steps}
    for i, key in enumerate(CURVE_KEYS):
        values = [[c[step][i] for c in curves] for step in steps]
        out[key] = [statistics.fmean(v) for v in values]
        out[f"{key}_std"] = [spread(v) for v in values]
    return out


def summarize(results: list[dict]) -> dict[str, dict[str, list[float]]]:
    """arm -> metric -> [mean, std over seeds]."""
    arms: dict[str, dict[str, list[float]]] = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        rows = [r for r in results if r["arm"] == arm]
        metrics = [k for k in rows[0] if k not in ("arm", "seed") and all(k in r for r in rows)]
        arms[arm] = {k: [statistics.fmean(r[k] for r in rows),
                         spread([r[k] for r in rows])] for k in metrics}
    return arms


def headline_metrics(summary: dict) -> list[str]:
    """The GenEval categories when every arm has them (edit metrics otherwise), never the wall time."""
    arms = list(summary)
    return [m for m in CATEGORIES if all(m in summary[a] for a in arms)] or \
        sorted({m for a in arms for m in summary[a] if m != "wall_s"})


def wall_time(record: dict) -> str:
    """The wall time of the invocation that wrote `record`, saying so when it resumed earlier work."""
    return f"{record['wall_s'] / 60:.1f} min" + (" (this invocation; it resumed earlier work)"
                                                  if record.get("resumed") else "")


def markdown_summary(record: dict) -> str:
    """results.md: the study's mean +- standard deviation table, as the docs quote it."""
    summary, metrics = record["summary"], headline_metrics(record["summary"])
    wall = wall_time(record)
    lines = [f"# Study `{record['study']}`: {record['description']}", "",
             f"{record['seeds']} seeds, mean ± standard deviation over seeds. Wall time: {wall}.",
             f"Config: `{record['config']}`, overrides: `{' '.join(record['common']) or 'none'}`.", "",
             "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [f"| {arm} | " + " | ".join(f"{values[m][0]:.3f} ± {values[m][1]:.3f}" for m in metrics) + " |"
              for arm, values in summary.items()]
    if record.get("paired"):
        lines += ["", *markdown_table(record["paired"], record["reference"])]
    if record.get("curves"):
        lines += ["", "Stage-1 regenerations: MSE against their own originals and against other images "
                  "(the gap is how much they follow their condition), by stage-1 step.", "",
                  "| arm | step | own | other | other - own |", "|---|---|---|---|---|"]
        lines += [f"| {arm} | {step} | {own:.4f} ± {own_std:.4f} | {other:.4f} ± {other_std:.4f} | {other - own:+.4f} |"
                  for arm, c in record["curves"].items()
                  for step, own, own_std, other, other_std in zip(c["step"], c["recon_mse_own"], c["recon_mse_own_std"],
                                                                  c["recon_mse_other"], c["recon_mse_other_std"])]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms, metrics = list(summary), headline_metrics(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * len(arms) / 3), 3.8))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        means = [summary[arm][m][0] for m in metrics]
        stds = [summary[arm][m][1] for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width, means, width, yerr=stds, label=arm, capsize=2)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(arms) - 1) / 2, metrics, rotation=20)
    ax.set_ylim(0, 1), ax.set_title(title), ax.legend(fontsize=7), ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict[str, dict[str, list[float]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm, curve in curves.items():
        line = ax.errorbar(curve["step"], curve["recon_mse_own"], yerr=curve["recon_mse_own_std"], label=arm,
                           capsize=2)
        ax.plot(curve["step"], curve["recon_mse_other"], linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.set_xlabel("stage-1 step"), ax.set_ylabel("regeneration MSE")
    ax.set_title(f"{title}: against the own image (solid) and another (dashed)", fontsize=10)
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
