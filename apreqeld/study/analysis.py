"""Post-study analysis (paper Table 2 and Figure 5): pure functions over measured configurations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from apreqeld.core.metrics import LATENCY, MEMORY

CATEGORIES: tuple[str, ...] = ("Fairness", "Memory", "Latency", "Accuracy")
"""The paper's four configuration categories, in report order."""

PRIORITY: dict[str, str] = {
    "memory_bytes": "Memory",
    "latency_ms": "Latency",
    "ppl": "Accuracy",
    "kld": "Accuracy",
}
"""Category whose weights prioritise each measured metric (used by the best-model check)."""


def _value(model: Mapping[str, Any], metric: str) -> float | None:
    """Measured value of one metric, or None when missing, null or not a finite number."""
    measured = model.get("measured")
    if not isinstance(measured, Mapping):
        return None
    v = measured.get(metric)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _tied(a: float, b: float) -> bool:
    """Whether two measured values count as the same best (exact up to float rounding)."""
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def robustness_table(
    models: Sequence[Mapping[str, Any]],
    /,
    *,
    metrics: Sequence[str] = (MEMORY, LATENCY, "ppl"),
    categories: Sequence[str] = CATEGORIES,
) -> dict[str, Any]:
    """Paper Table 2: per category, mean distance to the best measured model, plus the best check.

    Every model counts, ``same_as`` duplicates included (they are separate configurations);
    a model without a finite measured value of a metric is left out of that metric only.
    Returns a JSON-able dict::

        {"metrics": [m, ...], "categories": [c, ...],
         "rows": [{"category": c, "n_models": int,
                   "diff": {m: float|None},      # mean(measured m - best m), in m's unit
                   "rel": {m: float|None}}, ...], # that mean divided by best m (a fraction)
         "best": {m: {"value": float|None, "name": str|None, "category": str|None,
                      "tied": [{"name": str, "category": str}, ...],
                      "expected": str, "ok": bool}},
         "all_ok": bool}

    ``best[m]["ok"]`` is true when some model tied for the best value of ``m`` belongs to
    the category that prioritises ``m`` (``PRIORITY``); a Fairness best is never ok.
    ``name``/``category`` name the first tied best model, preferring one of the expected
    category. ``rows`` lists ``categories`` in order; a category without models has
    ``n_models`` 0 and null differences.
    """
    unknown = [m for m in metrics if m not in PRIORITY]
    if unknown:
        raise ValueError(f"no prioritising category known for metric(s) {unknown}")
    best: dict[str, dict[str, Any]] = {}
    for m in metrics:
        expected = PRIORITY[m]
        valued = [(v, mod) for mod in models if (v := _value(mod, m)) is not None]
        if not valued:
            best[m] = {"value": None, "name": None, "category": None, "tied": [],
                       "expected": expected, "ok": False}
            continue
        low = min(v for v, _ in valued)
        tied = [
            {"name": str(mod.get("name")), "category": str(mod.get("category"))}
            for v, mod in valued
            if _tied(v, low)
        ]
        right = [t for t in tied if t["category"] == expected]
        first = right[0] if right else tied[0]
        best[m] = {"value": low, "name": first["name"], "category": first["category"],
                   "tied": tied, "expected": expected, "ok": bool(right)}
    rows: list[dict[str, Any]] = []
    for cat in categories:
        members = [mod for mod in models if mod.get("category") == cat]
        diff: dict[str, float | None] = {}
        rel: dict[str, float | None] = {}
        for m in metrics:
            low = best[m]["value"]
            values = [v for mod in members if (v := _value(mod, m)) is not None]
            if low is None or not values:
                diff[m] = rel[m] = None
                continue
            d = sum(v - low for v in values) / len(values)
            diff[m] = d
            rel[m] = d / abs(low) if low != 0 else None
        rows.append({"category": cat, "n_models": len(members), "diff": diff, "rel": rel})
    return {
        "metrics": list(metrics),
        "categories": list(categories),
        "rows": rows,
        "best": best,
        "all_ok": all(b["ok"] for b in best.values()),
    }


def average_bpw_by_category(models: Sequence[Mapping[str, Any]], /) -> dict[str, dict[str, Any]]:
    """Figure 5 data: per category, mean/min/max and all bits-per-weight of its configurations.

    Returns ``{category: {"n": int, "mean": float, "min": float, "max": float,
    "values": [float, ...]}}`` for categories having at least one finite ``bpw``; the paper's
    categories come first in their usual order, any other category after, in first-seen order.
    """
    values: dict[str, list[float]] = {}
    for mod in models:
        bpw = mod.get("bpw")
        if isinstance(bpw, bool) or not isinstance(bpw, int | float) or not math.isfinite(bpw):
            continue
        values.setdefault(str(mod.get("category")), []).append(float(bpw))
    order = [c for c in CATEGORIES if c in values] + [c for c in values if c not in CATEGORIES]
    return {
        c: {
            "n": len(values[c]),
            "mean": sum(values[c]) / len(values[c]),
            "min": min(values[c]),
            "max": max(values[c]),
            "values": values[c],
        }
        for c in order
    }
