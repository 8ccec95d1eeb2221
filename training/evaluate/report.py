"""DIR/report.md (one table per task, backbone x protocol, mean +- std and p, best per column in bold),
DIR/summary.csv and the figures: per task a bar chart with error bars, single runs as points and p above the bars;
per backbone the label-efficiency curves (metric vs label fraction, log x, a panel per task)."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .stats import PrecisionDifference, Summary, int8_differences

METRIC_NAMES = {"roc_auc": "ROC AUC", "dice": "Dice", "accuracy": "accuracy"}


def format_fraction(fraction: float) -> str:
    """A label fraction as a percentage: 1.0 as 100%, 0.025 as 2.5%."""
    return f"{100 * fraction:g}%"


def format_p(value: float | None) -> str:
    """A p-value as the report shows it: NaN (undefined t-test) as n/a, never as a small number."""
    if value is None:
        return "baseline"
    if math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _csv_value(value: Any) -> Any:
    return "n/a" if isinstance(value, float) and math.isnan(value) else value


INT8_PROTOCOL = "linear-int8 - linear"
"""The protocol column of summary.csv's int8 - fp32 difference rows (they add its `p_paired` column)."""


def _difference_row(d: PrecisionDifference) -> dict[str, Any]:
    return {
        "task": d.task,
        "protocol": INT8_PROTOCOL,
        "fraction": d.fraction,
        "backbone": d.backbone,
        "metric": d.metric,
        "runs": d.pairs,
        "mean": d.mean,
        "std": d.std,
        "ci_low": d.ci_low,
        "ci_high": d.ci_high,
        "p_student": d.p_student,
        "p_welch": d.p_welch,
        "p_holm": math.nan,
        "identical": d.pairs > 1 and d.std == 0,
        "p_paired": d.p_paired,
    }


def write_summary_csv(summaries: list[Summary], out: Path, differences: list[PrecisionDifference] = ()) -> Path:
    path = out / "summary.csv"
    rows = [dataclasses.asdict(s) for s in summaries] + [_difference_row(d) for d in differences]
    fields = [f.name for f in dataclasses.fields(Summary)] + (["p_paired"] if differences else [])
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    return path


def int8_section(differences: list[PrecisionDifference]) -> list[str]:
    """report.md's table of int8 - fp32 linear-probe differences (empty without them)."""
    if not differences:
        return []
    lines = [
        "## int8 vs fp32 (linear probe)",
        "",
        (
            "`linear-int8` minus `linear` per run (the two share each run's seed: same subsample, same probe), "
            "mean +- sample std and 95% t interval; p paired: paired t-test over the runs; p Student: the "
            f"two-sample test beside it (Welch's in summary.csv, protocol `{INT8_PROTOCOL}`). "
            "`linear` embeds with torch fp32, `linear-int8` with the service's gated int8 ONNX graph."
        ),
        "",
        "| task | backbone | labels | metric | pairs | int8 - fp32 | 95% CI | p paired | p Student |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in differences:
        ci = "n/a" if math.isnan(d.ci_low) else f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        lines.append(
            f"| {d.task} | {d.backbone} | {format_fraction(d.fraction)} | {METRIC_NAMES.get(d.metric, d.metric)} | "
            f"{d.pairs} | {d.mean:+.4f} +- {d.std:.4f} | {ci} | {format_p(d.p_paired)} | "
            f"{format_p(d.p_student)} |"
        )
    return lines + [""]


def write_report(
    summaries: list[Summary], baseline: str, out: Path, differences: list[PrecisionDifference] = ()
) -> Path:
    lines = [
        "# Transfer evaluation",
        "",
        (
            f"Mean +- sample standard deviation (ddof 1) over runs on each task's test split; p: two-sample "
            f"Student's t-test against the baseline `{baseline}` (Welch's and Holm-corrected p in summary.csv). "
            "Best mean per column in bold. p is n/a where the t-test is undefined (fewer than two runs in an arm, "
            'or no spread in both); "identical runs" marks a cell whose runs all gave one value (a deterministic '
            "protocol such as the linear probe on all labels: effectively one run, its std is 0 by construction)."
        ),
        "",
    ]
    for task in sorted({s.task for s in summaries}):
        rows = [s for s in summaries if s.task == task]
        columns = sorted({(s.protocol, s.fraction) for s in rows})
        metric = METRIC_NAMES.get(rows[0].metric, rows[0].metric)
        lines += [
            f"## {task} ({metric})",
            "",
            "| backbone | " + " | ".join(f"{p} @ {format_fraction(f)} labels" for p, f in columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
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
    lines += int8_section(list(differences))
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def task_figure(task: str, summaries: list[Summary], rows: list[dict[str, Any]], out: Path) -> Path:
    return _save(task_plot(task, summaries, rows), out / f"task_{task}.png")


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps the legends placed outside the axes
    plt.close(figure)
    return path


def _runs(rows: list[dict[str, Any]], summary: Summary) -> list[float]:
    """The single-run values behind one summary cell."""
    return [
        float(r["metrics"].get(summary.metric, math.nan))
        for r in rows
        if (r["task"], r["backbone"], r["protocol"], float(r["fraction"]))
        == (summary.task, summary.backbone, summary.protocol, summary.fraction)
    ]


def _spread(count: int, width: float) -> np.ndarray:
    """Evenly spaced offsets across `width` for `count` single-run points, so that repeated values stay countable."""
    return np.linspace(-width / 2, width / 2, count) if count > 1 else np.zeros(count)


def _run_counts(cells: list[Summary]) -> str:
    counts = sorted({s.runs for s in cells})
    return f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"


def task_plot(task: str, summaries: list[Summary], rows: list[dict[str, Any]]) -> plt.Figure:
    """Bars: mean per backbone, grouped by protocol and label fraction, sample std error bars, single runs as points
    spread across the bar (identical runs show as a flat row), Student's p against the baseline above each bar,
    chance as a dashed line for ROC AUC; the legend outside the axes."""
    cells = [s for s in summaries if s.task == task]
    groups = sorted({(s.protocol, s.fraction) for s in cells})
    backbones = sorted({s.backbone for s in cells})
    baseline = next((s.backbone for s in cells if s.p_student is None), None)
    width = 0.8 / len(backbones)
    figure, axes = plt.subplots(figsize=(max(5, 2.2 * len(groups)) + 2, 4))
    top = 0.0
    for b, backbone in enumerate(backbones):
        xs, means, stds = [], [], []
        for g, group in enumerate(groups):
            match = [s for s in cells if s.backbone == backbone and (s.protocol, s.fraction) == group]
            if not match:
                continue
            s = match[0]
            x = g + (b - (len(backbones) - 1) / 2) * width
            std = 0.0 if math.isnan(s.std) else s.std
            runs = _runs(rows, s)
            xs.append(x)
            means.append(s.mean)
            stds.append(std)
            axes.scatter(x + _spread(len(runs), 0.6 * width), runs, color="black", s=8, zorder=3)
            height = float(np.nanmax([s.mean + std, *runs]))
            top = max(top, height)
            if s.p_student is not None:
                axes.annotate(
                    f"p {format_p(s.p_student)}",
                    (x, height),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        role = " (baseline)" if backbone == baseline else ""
        label = f"{backbone}{role}, {_run_counts([s for s in cells if s.backbone == backbone])}"
        axes.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    metric = METRIC_NAMES.get(cells[0].metric, cells[0].metric)
    if cells[0].metric == "roc_auc":
        axes.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    axes.set_ylim(0, 1.12 * top if top > 0 else 1)
    axes.set_xticks(range(len(groups)), [f"{p}\n{format_fraction(f)} of labels" for p, f in groups])
    axes.set_ylabel(f"test {metric}")
    axes.set_title(
        f"{task}: test {metric}, mean ± sample std over runs\n"
        f"points: single runs; p: Student's t-test vs {baseline or 'the baseline'}"
    )
    axes.legend(title="backbone", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    figure.tight_layout()
    return figure


def efficiency_figure(backbone: str, summaries: list[Summary], rows: list[dict[str, Any]], out: Path) -> Path:
    return _save(efficiency_plot(backbone, summaries, rows), out / f"label_efficiency_{backbone}.png")


def efficiency_plot(backbone: str, summaries: list[Summary], rows: list[dict[str, Any]]) -> plt.Figure:
    """One panel per task (its own metric): test metric vs label fraction (log x, ticks at the fractions), a line per
    protocol with sample std error bars and the single runs as faint points; protocols are nudged apart along x so
    that their error bars do not overlap."""
    cells = [s for s in summaries if s.backbone == backbone]
    tasks = sorted({s.task for s in cells})
    figure, panels = plt.subplots(1, len(tasks), figsize=(5 * len(tasks) + 1.5, 4), squeeze=False)
    for axes, task in zip(panels[0], tasks):
        in_task = [s for s in cells if s.task == task]
        protocols = sorted({s.protocol for s in in_task})
        for p, protocol in enumerate(protocols):
            line = sorted((s for s in in_task if s.protocol == protocol), key=lambda s: s.fraction)
            nudge = 1.04 ** (p - (len(protocols) - 1) / 2)
            drawn = axes.errorbar(
                [s.fraction * nudge for s in line],
                [s.mean for s in line],
                yerr=[0.0 if math.isnan(s.std) else s.std for s in line],
                marker="o",
                capsize=3,
                label=f"{protocol}, {_run_counts(line)}",
            )
            for s in line:
                runs = _runs(rows, s)
                axes.scatter([s.fraction * nudge] * len(runs), runs, color=drawn[0].get_color(), s=8, alpha=0.35)
        fractions = sorted({s.fraction for s in in_task})
        axes.set_xscale("log")
        axes.set_xticks(fractions, [format_fraction(f) for f in fractions])
        axes.minorticks_off()
        axes.set_xlabel("share of the training labels (log scale)")
        axes.set_ylabel(f"test {METRIC_NAMES.get(in_task[0].metric, in_task[0].metric)}")
        axes.set_title(task)
        axes.legend(title="protocol", fontsize=8)
    figure.suptitle(f"{backbone}: label efficiency, mean ± sample std over runs (points: single runs)")
    figure.tight_layout()
    return figure


def write_all(summaries: list[Summary], rows: list[dict[str, Any]], baseline: str, out: Path) -> list[Path]:
    differences = int8_differences(rows)
    paths = [write_report(summaries, baseline, out, differences), write_summary_csv(summaries, out, differences)]
    paths += [task_figure(task, summaries, rows, out) for task in sorted({s.task for s in summaries})]
    for backbone in sorted({s.backbone for s in summaries}):
        if len({s.fraction for s in summaries if s.backbone == backbone}) > 1:
            paths.append(efficiency_figure(backbone, summaries, rows, out))
    return paths
