"""DIR/report.md (one table per task, backbone x protocol, mean +- std and p, best per column in bold),
DIR/summary.csv and the figures: per task a bar chart with error bars and single runs as points; per backbone
the label-efficiency curve (metric vs label fraction, log x)."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .stats import Summary

METRIC_NAMES = {"roc_auc": "ROC AUC", "dice": "Dice", "accuracy": "accuracy"}


def format_p(value: float | None) -> str:
    """A p-value as the report shows it: NaN (undefined t-test) as n/a, never as a small number."""
    if value is None:
        return "baseline"
    if math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _csv_value(value: Any) -> Any:
    return "n/a" if isinstance(value, float) and math.isnan(value) else value


def write_summary_csv(summaries: list[Summary], out: Path) -> Path:
    path = out / "summary.csv"
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=[f.name for f in dataclasses.fields(Summary)])
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in dataclasses.asdict(s).items()} for s in summaries)
    return path


def write_report(summaries: list[Summary], baseline: str, out: Path) -> Path:
    lines = ["# Transfer evaluation", "",
             (f"Mean +- sample standard deviation (ddof 1) over runs on each task's test split; p: two-sample "
             f"Student's t-test against the baseline `{baseline}` (Welch's and Holm-corrected p in summary.csv). "
             "Best mean per column in bold. p is n/a where the t-test is undefined (fewer than two runs in an arm, "
             "or no spread in both); \"identical runs\" marks a cell whose runs all gave one value (a deterministic "
             "protocol such as the linear probe on all labels: effectively one run, its std is 0 by construction)."),
             ""]
    for task in sorted({s.task for s in summaries}):
        rows = [s for s in summaries if s.task == task]
        columns = sorted({(s.protocol, s.fraction) for s in rows})
        metric = METRIC_NAMES.get(rows[0].metric, rows[0].metric)
        lines += [f"## {task} ({metric})", "",
                  "| backbone | " + " | ".join(f"{p} @ {f:g} labels" for p, f in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        best = {c: max(s.mean for s in rows if (s.protocol, s.fraction) == c) for c in columns}
        for backbone in sorted({s.backbone for s in rows}):
            cells = []
            for column in columns:
                match = [s for s in rows if s.backbone == backbone and (s.protocol, s.fraction) == column]
                if not match:
                    cells.append("")
                    continue
                s = match[0]
                runs = f"n={s.runs}, identical runs" if s.identical else f"n={s.runs}"
                text = f"{s.mean:.3f} +- {s.std:.3f} ({runs}, p {format_p(s.p_student)})"
                cells.append(f"**{text}**" if s.mean == best[column] else text)
            lines.append(f"| {backbone} | " + " | ".join(cells) + " |")
        lines += ["", f"![{task}](task_{task}.png)", ""]
    for backbone in sorted({s.backbone for s in summaries}):
        if len({s.fraction for s in summaries if s.backbone == backbone}) > 1:
            lines += [f"![{backbone} label efficiency](label_efficiency_{backbone}.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def task_figure(task: str, summaries: list[Summary], rows: list[dict[str, Any]], out: Path) -> Path:
    figure = task_plot(task, summaries, rows)
    path = out / f"task_{task}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def task_plot(task: str, summaries: list[Summary], rows: list[dict[str, Any]]) -> plt.Figure:
    """Bars: mean per backbone, grouped by protocol (all label fractions side by side), sample std error bars,
    single runs as points."""
    cells = [s for s in summaries if s.task == task]
    groups = sorted({(s.protocol, s.fraction) for s in cells})
    backbones = sorted({s.backbone for s in cells})
    width = 0.8 / len(backbones)
    figure, axes = plt.subplots(figsize=(max(5, 2.2 * len(groups)), 4))
    for b, backbone in enumerate(backbones):
        xs, means, stds = [], [], []
        for g, group in enumerate(groups):
            match = [s for s in cells if s.backbone == backbone and (s.protocol, s.fraction) == group]
            if not match:
                continue
            x = g + (b - (len(backbones) - 1) / 2) * width
            xs.append(x)
            means.append(match[0].mean)
            stds.append(0.0 if match[0].std != match[0].std else match[0].std)
            runs = [r["metrics"].get(match[0].metric) for r in rows if r["task"] == task and r["backbone"] == backbone
                    and (r["protocol"], float(r["fraction"])) == group]
            axes.scatter([x] * len(runs), runs, color="black", s=10, zorder=3)
        axes.bar(xs, means, width, yerr=stds, capsize=3, label=backbone)
    metric = METRIC_NAMES.get(cells[0].metric, cells[0].metric)
    axes.set_xticks(range(len(groups)), [f"{p}\n{f:g} of labels" for p, f in groups])
    axes.set_ylabel(f"test {metric}")
    axes.set_title(f"{task}: mean +- sample std over runs\n(points: single runs)")
    axes.legend(title="backbone")
    figure.tight_layout()
    return figure


def efficiency_figure(backbone: str, summaries: list[Summary], out: Path) -> Path:
    """Metric vs label fraction (log x), one line per task and protocol, sample std error bars."""
    cells = [s for s in summaries if s.backbone == backbone]
    figure, axes = plt.subplots(figsize=(5, 4))
    for task, protocol in sorted({(s.task, s.protocol) for s in cells}):
        line = sorted((s for s in cells if (s.task, s.protocol) == (task, protocol)), key=lambda s: s.fraction)
        axes.errorbar([s.fraction for s in line], [s.mean for s in line], yerr=[s.std for s in line], marker="o",
                      capsize=3, label=f"{task} / {protocol}")
    axes.set_xscale("log")
    axes.set_xlabel("fraction of training labels (log scale)")
    axes.set_ylabel("test metric (ROC AUC or Dice)")
    axes.set_title(f"{backbone}: label efficiency")
    axes.legend()
    figure.tight_layout()
    path = out / f"label_efficiency_{backbone}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_all(summaries: list[Summary], rows: list[dict[str, Any]], baseline: str, out: Path) -> list[Path]:
    paths = [write_report(summaries, baseline, out), write_summary_csv(summaries, out)]
    paths += [task_figure(task, summaries, rows, out) for task in sorted({s.task for s in summaries})]
    for backbone in sorted({s.backbone for s in summaries}):
        if len({s.fraction for s in summaries if s.backbone == backbone}) > 1:
            paths.append(efficiency_figure(backbone, summaries, out))
    return paths

