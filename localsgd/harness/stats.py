"""Statistics over seeds: mean and standard deviation, and paired comparisons with a baseline
(per-seed differences and a 95% interval of their mean, Student's t)."""

from __future__ import annotations

import math
import statistics
from typing import Any

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (1.96 beyond).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation over seeds (0 for one seed; None for none)."""
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(differences: list[float]) -> dict[str, Any]:
    """The mean of per-seed differences, their standard deviation and the 95% interval of the mean
    (None for one seed), and whether the interval excludes zero."""
    n, mean = len(differences), statistics.mean(differences)
    std = statistics.stdev(differences) if n > 1 else None
    half = None if std is None else (T95[n - 2] if n - 1 <= len(T95) else 1.96) * std / math.sqrt(n)
    return {
        "mean": mean,
        "std": std,
        "ci95": None if half is None else [mean - half, mean + half],
        "ci_excludes_zero": None if half is None else abs(mean) > half,
    }


def compare(
    rows: list[dict[str, Any]],
    baseline: str | None,
    compared: tuple[str, ...],
    versus: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every method's ``rows`` entry against ``baseline``'s (or the method ``versus`` names for
    it), paired by seed (the same seed gives the same initial model and, with the same K, the same
    data order): per metric in ``compared``, the per-seed differences and ``paired`` of them. A row
    holds ``method`` and ``runs`` (one record per finished seed, with ``seed`` and the metrics)."""
    by_method = {r["method"]: r for r in rows}
    out = []
    for row in rows:
        against = (versus or {}).get(row["method"], baseline)
        if against is None or against not in by_method or row["method"] == against:
            continue
        for key in compared:
            base = {d["seed"]: d[key] for d in by_method[against]["runs"] if d.get(key) is not None}
            runs = sorted(
                (d for d in row["runs"] if d.get(key) is not None and d["seed"] in base),
                key=lambda d: d["seed"],
            )
            diffs = [d[key] - base[d["seed"]] for d in runs]
            if diffs:
                head = {"method": row["method"], "baseline": against, "metric": key}
                out.append(head | {"seeds": [d["seed"] for d in runs], "differences": diffs} | paired(diffs))
    return out
