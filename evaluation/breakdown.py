"""Breakdowns of per-example eval rows: means per ERP module, and percentiles (latency p50/p95).

Pure functions over plain data; evaluation.evaluate.score_model flattens them into metric keys.
"""

from __future__ import annotations

import math
from collections import defaultdict

MODULE_METRICS = ("rouge_l", "exact_match", "keyword_coverage", "language_agreement")
"""Per-example answer metrics that the eval report also gives per ERP module."""


def per_module(rows: list[dict], metrics: list[str]) -> dict[str, dict[str, float]]:
    """Mean of each metric over the rows of each `module`, plus the row count `n`.

    A row without a module is left out; a missing, non-numeric or NaN value (e.g. the perplexity of an
    example with no scored tokens) is left out of its mean; a module with no such value gets NaN.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("module") is not None:
            groups[str(row["module"])].append(row)
    out: dict[str, dict[str, float]] = {}
    for module in sorted(groups):
        members = groups[module]
        stats = {"n": float(len(members))}
        for metric in metrics:
            values = [float(v) for r in members if _finite(v := r.get(metric))]
            stats[metric] = sum(values) / len(values) if values else float("nan")
        out[module] = stats
    return out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 95)) -> dict[str, float]:
    """`p<q>` for each q in percent, numpy's linear interpolation between the closest ranks; NaN when empty."""
    import numpy as np

    if not values:
        return {f"p{q:g}": float("nan") for q in qs}
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(np.asarray(values, dtype=float), qs, method="linear"))}
