"""Composed members (#18): the most accurate per-tensor recipe the additive predictor expects
to fit a memory limit and a latency level now, over the types whose shards are at hand, and
the rules that keep composition honest: it is worth serving only when it is predicted better
than every member that fits by more than the predictor's recorded error, its footprint is
planned with that error added, and once served it is kept only while it measures within it.
Pure: a predictor, options and numbers in; a recipe and figures out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from apreqeld.core.targeting import (
    Options,
    Predictor,
    allocate,
    improve,
    option_tables,
    recipe_of,
)

# Measurement noise the recorded error does not cover: RSS moves by a few pages and a busy
# machine's served ms/token by tens of percent (the brief's 20-30 % drift); a composed member
# is dropped only beyond the larger of this floor and the predictor's largest recorded error.
NOISE_FLOOR = {"footprint_bytes": 0.02, "latency_ms": 0.25}


@dataclass(frozen=True)
class Composition:
    """A recipe (every quantizable tensor -> type) and what the predictor expects of it."""

    recipe: Mapping[str, str]
    predicted: Mapping[str, float]  # memory_bytes, footprint_bytes, latency_ms, kld, ppl


@dataclass(frozen=True)
class RecordedError:
    """The predictor's relative error on the plan set's own members, per metric."""

    median: Mapping[str, float]
    max: Mapping[str, float]

    def tolerance(self, metric: str, /) -> float:
        """How much worse than predicted a served composed member may measure."""
        return max(self.max.get(metric, 0.0), NOISE_FLOOR.get(metric, 0.0))


def recorded_error(record: Mapping, /) -> RecordedError | None:
    """From a manifest's `prediction_error` ({metric: {median, max}}), None when absent."""
    if not record:
        return None
    return RecordedError({m: float(v["median"]) for m, v in record.items()},
                         {m: float(v["max"]) for m, v in record.items()})


def available_options(options: Options, available: Mapping[str, Collection[str]], /
                      ) -> Options | None:
    """`options` restricted to the types `available` holds for each tensor (the shards in the
    store); None when some tensor has none left."""
    rows = []
    for choices in options.choices:
        kept = tuple(c for c in choices if all(q in available.get(t, ()) for t, q in c.items()))
        if not kept:
            return None
        rows.append(kept)
    return Options(options.sublayers, tuple(rows))


def compose(predictor: Predictor, options: Options, outside: Mapping[str, str], /, *,
            accuracy: str, max_footprint_bytes: float | None, max_latency_ms: float | None,
            error: RecordedError, tables: Mapping[str, np.ndarray] | None = None,
            ) -> Composition | None:
    """The recipe with the least predicted `accuracy` whose predicted footprint plus the
    largest recorded footprint error fits `max_footprint_bytes`, and whose predicted latency
    plus its error fits `max_latency_ms` (ms/token as measured; the caller divides by the live
    scale); None when no recipe does. Unlimited axes are not constrained."""
    tables = tables if tables is not None else option_tables(predictor, options)
    limits = {}
    if max_footprint_bytes is not None:
        limits["footprint_bytes"] = max_footprint_bytes / (1 + error.max.get("footprint_bytes",
                                                                             0.0))
    if max_latency_ms is not None:
        limits["latency_ms"] = max_latency_ms / (1 + error.max.get("latency_ms", 0.0))
    fixed = _outside_contribution(predictor, outside)
    if limits:
        costs = [tables[m] for m in limits]
        room = [limits[m] - fixed[m] for m in limits]
        pick = allocate(tables[accuracy], costs, room)
        if pick is None and len(limits) == 2:
            # the multiplier grid can miss a thin feasible region of two limits: start from
            # the fastest recipe within the footprint, then spend what is left on accuracy
            start = allocate(tables["latency_ms"], costs[:1], room[:1])
            rows = np.arange(len(costs[1]))
            if start is not None and costs[1][rows, start].sum() <= room[1]:
                pick = improve(start, tables[accuracy], costs, room)
        if pick is None:
            return None
    else:
        pick = np.argmin(tables[accuracy], axis=1)
    recipe = recipe_of(options, pick) | dict(outside)
    predicted = predictor.predict(recipe)
    if any(predicted[m] > limits[m] * (1 + 1e-9) for m in limits):
        return None
    return Composition(recipe, predicted)


def _outside_contribution(predictor: Predictor, outside: Mapping[str, str]) -> dict[str, float]:
    """What the tensors outside the options add to each metric (footprint: their exact bytes
    and the tensors llama.cpp does not quantize)."""
    out = {m: sum(w * predictor.figures[m][outside[t]] for t, w in ws.items() if t in outside)
           for m, ws in predictor.weights.items()}
    out["footprint_bytes"] = predictor.fixed_bytes + sum(
        predictor.bytes_of[t][q] for t, q in outside.items()) + out.get("overhead_bytes", 0.0)
    return out


def worth_serving(composed: float, best_fitting: float | None, error: RecordedError, /, *,
                  accuracy: str) -> bool:
    """Whether a composed member predicted at `composed` is better than the best member that
    fits (`best_fitting`, predicted the same way; None: none fits) by more than the
    predictor's median recorded accuracy error."""
    if best_fitting is None:
        return True
    return composed < best_fitting * (1 - error.median.get(accuracy, 0.0))


def measured_worse(predicted: float, measured: float, tolerance: float, /) -> float | None:
    """The relative excess of `measured` over `predicted` when beyond `tolerance`, else None."""
    excess = measured / predicted - 1
    return excess if excess > tolerance else None
