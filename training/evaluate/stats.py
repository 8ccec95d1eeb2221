"""Per (task, protocol, fraction) and backbone: mean, sample standard deviation (ddof 1; the study reported
numpy's population std), 95% t confidence interval, and Student's and Welch's two-sample t-tests against the
baseline with Holm-corrected p-values (Student's, over the comparisons of one cell).

A t-test needs two runs per arm and some spread: with n < 2 in either arm, or both arms constant over their runs
(the linear probe on all labels is deterministic, so its runs repeat one value), its p-value is undefined and
reported as NaN; such cells are flagged `identical` and count as one effective run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass
class Summary:
    task: str
    protocol: str
    fraction: float
    backbone: str
    metric: str
    runs: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_student: float | None
    p_welch: float | None
    p_holm: float | None
    identical: bool


def metric_of(row: dict[str, Any]) -> str:
    return "roc_auc" if "roc_auc" in row["metrics"] else ("dice" if "dice" in row["metrics"] else "accuracy")


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order; NaN (undefined) ones stay NaN and do not count."""
    defined = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(defined, key=lambda i: pvalues[i])
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def t_tests(values: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Student's and Welch's two-sided p-values; NaN where undefined (n < 2 in an arm, or no spread in both)."""
    if len(values) < 2 or len(base) < 2 or (np.ptp(values) == 0 and np.ptp(base) == 0):
        return math.nan, math.nan
    return (float(stats.ttest_ind(values, base).pvalue), float(stats.ttest_ind(values, base, equal_var=False).pvalue))


def summarise(rows: list[dict[str, Any]], baseline: str) -> list[Summary]:
    cells: dict[tuple[str, str, float], dict[str, list[float]]] = {}
    metrics: dict[tuple[str, str, float], str] = {}
    for row in rows:
        cell = (row["task"], row["protocol"], float(row["fraction"]))
        metric = metrics.setdefault(cell, metric_of(row))
        cells.setdefault(cell, {}).setdefault(row["backbone"], []).append(float(row["metrics"].get(metric, math.nan)))
    out = []
    for cell, arms in sorted(cells.items()):
        base = np.asarray(arms.get(baseline, []))
        tests = {}
        for backbone, values in arms.items():
            values = np.asarray(values)
            if backbone != baseline:
                tests[backbone] = t_tests(values, base)
        names = sorted(tests)
        adjusted = dict(zip(names, holm([tests[n][0] for n in names]))) if names else {}
        for backbone, values in sorted(arms.items()):
            values = np.asarray(values)
            n, mean = len(values), float(values.mean())
            std = float(values.std(ddof=1)) if n > 1 else math.nan
            half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
            p = tests.get(backbone, (None, None))
            out.append(
                Summary(
                    *cell,
                    backbone,
                    metrics[cell],
                    n,
                    mean,
                    std,
                    mean - half,
                    mean + half,
                    p[0],
                    p[1],
                    adjusted.get(backbone),
                    n > 1 and np.ptp(values) == 0,
                )
            )
    return out


@dataclass
class PrecisionDifference:
    """`linear-int8` minus `linear` (int8 minus fp32 features) of one backbone, task and label fraction, paired by
    run (the two protocols share each run's seed, so the same subsample and probe seed)."""

    task: str
    fraction: float
    backbone: str
    metric: str
    pairs: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_paired: float
    p_student: float
    p_welch: float


def int8_differences(rows: list[dict[str, Any]]) -> list[PrecisionDifference]:
    """Per backbone x task x fraction that ran both `linear` and `linear-int8`: the mean and sample std of the
    per-run difference with its 95% t interval, the paired t-test (scipy `ttest_rel`) and, beside it, the
    two-sample Student and Welch tests; NaN where undefined (under two pairs, or the differences have no spread)."""
    cells: dict[tuple[str, float, str], dict[str, dict[int, float]]] = {}
    metrics: dict[tuple[str, float, str], str] = {}
    for row in rows:
        if row["protocol"] in ("linear", "linear-int8"):
            cell = (row["task"], float(row["fraction"]), row["backbone"])
            metric = metrics.setdefault(cell, metric_of(row))
            runs = cells.setdefault(cell, {}).setdefault(row["protocol"], {})
            runs[int(row["run"])] = float(row["metrics"].get(metric, math.nan))
    out = []
    for cell, arms in sorted(cells.items()):
        runs = sorted(set(arms.get("linear", {})) & set(arms.get("linear-int8", {})))
        if not runs:
            continue
        int8 = np.asarray([arms["linear-int8"][r] for r in runs])
        fp32 = np.asarray([arms["linear"][r] for r in runs])
        difference = int8 - fp32
        n, mean = len(runs), float(difference.mean())
        std = float(difference.std(ddof=1)) if n > 1 else math.nan
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
        paired = math.nan if n < 2 or np.ptp(difference) == 0 else float(stats.ttest_rel(int8, fp32).pvalue)
        out.append(
            PrecisionDifference(
                cell[0],
                cell[1],
                cell[2],
                metrics[cell],
                n,
                mean,
                std,
                mean - half,
                mean + half,
                paired,
                *t_tests(int8, fp32),
            )
        )
    return out
