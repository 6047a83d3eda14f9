"""Aims at a preset with explicit margins, and why none can be made (pure).

An aim asks the predictor for the recipe with the least of one objective among those predicted
below the preset by a margin in every objective: footprint, latency and accuracy. Three aims
per preset, one minimizing each objective, spread the tries over the region that dominates
it. Margins come from the measured error (`error_margins`) and, for latency, the rounds'
spread; when no recipe meets them the margins are relaxed by `LEVELS`, and when none meets
even the last level the predictor's best on each axis, with the other two held, is the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from apreqeld.core.targeting import Options, Predictor, aim

LEVELS = (1.0, 0.5, 0.0)  # share of the margins an aim keeps when the full ones find nothing
STRICT = 0.001  # the least margin: a tie is no domination
QUANTILE = 0.75  # of the measured relative excess over the prediction


def objectives(accuracy: str) -> tuple[str, str, str]:
    return ("footprint_bytes", "latency_ms", accuracy)


def error_margins(predicted: Sequence[Mapping[str, float]],
                  measured: Sequence[Mapping[str, float]], metrics: Sequence[str], /, *,
                  floor: Mapping[str, float] | None = None,
                  quantile: float = QUANTILE) -> dict[str, float]:
    """Per metric, the `quantile` of how far measurements came out above their predictions
    (max(0, measured / predicted - 1)), never below `floor[metric]`: the margin an aim needs
    for its measurement to land where it was aimed."""
    out = {}
    for m in metrics:
        excess = [max(0.0, float(b[m]) / float(a[m]) - 1) for a, b in zip(predicted, measured,
                                                                            strict=True)
                  if a.get(m) and b.get(m) is not None]
        got = float(np.quantile(excess, quantile)) if excess else 0.0
        out[m] = round(max(got, (floor or {}).get(m, 0.0)), 6)
    return out


def aims_at(predictor: Predictor, options: Options, target: Mapping[str, float],
            outside: Mapping[str, str], margins: Mapping[str, float], /, *, accuracy: str,
            tables: Mapping[str, np.ndarray] | None = None, levels: Sequence[float] = LEVELS,
            minimize: Sequence[str] | None = None,
            ) -> tuple[float | None, list[tuple[str, dict[str, str]]]]:
    """The first level of `levels` at which some aim finds a recipe, and (objective minimized,
    recipe) for each aim that does (one per objective, or per objective of `minimize`);
    (None, []) when none does at any level."""
    names = objectives(accuracy)
    for level in levels:
        scaled = {m: max(margins.get(m, 0.0) * level, STRICT) for m in names}
        found = []
        for minimize_ in minimize or names:
            got = aim(predictor, options, target, outside, minimize=minimize_, margins=scaled,
                      tables=tables)
            if got is not None and got not in [r for _, r in found]:
                found.append((minimize_, got))
        if found:
            return level, found
    return None, []


def unbeatable_reason(predictor: Predictor, options: Options, target: Mapping[str, float],
                      outside: Mapping[str, str], /, *, accuracy: str,
                      tables: Mapping[str, np.ndarray] | None = None) -> str:
    """Why the predictor finds no recipe at least as good in every objective: on each axis,
    the best it predicts with the other two no worse than the preset's, or that none is."""
    names = objectives(accuracy)
    unit = {"footprint_bytes": (2.0**20, "MiB"), "latency_ms": (1.0, "ms"), accuracy: (1.0, "")}
    said = []
    for m in names:
        held = {k: 0.0 if k != m else -1e9 for k in names}  # the axis itself: unbounded
        got = aim(predictor, options, target, outside, minimize=m, margins=held, tables=tables)
        label = {"footprint_bytes": "footprint", "latency_ms": "ms/token"}.get(m, m)
        others = " and ".join({"footprint_bytes": "footprint", "latency_ms": "latency"}
                              .get(k, k) for k in names if k != m)
        if got is None:
            said.append(f"no recipe is predicted within its {others}")
            continue
        best = predictor.predict(got)[m]
        scale, u = unit[m]
        said.append(f"within its {others} the least {label} predicted is "
                    f"{best / scale:.4g}{u} ({100 * (best / target[m] - 1):+.1f}% of its "
                    f"{target[m] / scale:.4g}{u})")
    return "predictor: " + "; ".join(said)
