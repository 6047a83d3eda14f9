"""Pure plan choice: which plan-set member fits the machine now (DESIGN.md "Policy", step 4).

Feasible = fits the memory budget and the user's service levels; among the feasible members
TOPSIS with the user's weights over (footprint, latency x scale, accuracy), all minimised.
Hysteresis: switch at once when the current member no longer fits, otherwise only when the
winner beats it by `margin` in closeness and the dwell time has passed. When nothing fits,
the smallest footprint is chosen (downgrade first, never out of memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from apreqeld.core.topsis import TIE_TOLERANCE, topsis
from apreqeld.core.weights import normalise_weights, parse_weights
from apreqeld.errors import InputError

PRESETS: dict[str, tuple[float, float, float]] = {
    "memory": (0.8, 0.1, 0.1),
    "latency": (0.1, 0.8, 0.1),
    "accuracy": (0.1, 0.1, 0.8),
    "balanced": (1 / 3, 1 / 3, 1 / 3),
}

_GIB = 1024**3


@dataclass(frozen=True)
class Candidate:
    """One member as the policy sees it; accuracy is KLD (or PPL): lower is better."""

    id: str
    footprint_bytes: float
    latency_ms: float
    accuracy: float


@dataclass(frozen=True)
class ServiceLevels:
    """Upper limits the user accepts; None means no limit."""

    max_latency_ms: float | None = None
    max_accuracy: float | None = None
    max_memory_bytes: float | None = None


@dataclass(frozen=True)
class Priority:
    """Normalised (memory, latency, accuracy) weights and service levels."""

    weights: tuple[float, float, float]
    levels: ServiceLevels = field(default_factory=ServiceLevels)
    name: str | None = None


@dataclass(frozen=True)
class Decision:
    """The member to serve, whether that is a switch, and why."""

    choice: str | None
    switch: bool
    reason: str
    feasible: tuple[str, ...]
    closeness: dict[str, float]
    budget_bytes: float | None


def priority_from(
    spec: str | Sequence[float], /, *, levels: ServiceLevels | None = None
) -> Priority:
    """A preset name, three weights, or "0.2,0.3,0.5" -> a Priority with normalised weights."""
    name: str | None = None
    if isinstance(spec, str):
        text = spec.strip()
        key = text.lower()
        if key in PRESETS:
            name, weights = key, normalise_weights(PRESETS[key])
        elif "," in text or "=" in text:
            weights = parse_weights(text)
        else:
            known = ", ".join(PRESETS)
            raise InputError(f"unknown priority '{text}' (presets: {known}; or three weights)")
    else:
        weights = normalise_weights(spec)
    levels = levels if levels is not None else ServiceLevels()
    _check_levels(levels)
    return Priority(weights, levels, name)


def feasibility(
    candidate: Candidate,
    levels: ServiceLevels,
    /,
    *,
    budget_bytes: float | None = None,
    latency_scale: float = 1.0,
) -> str | None:
    """None when the candidate fits; else a short phrase saying what it exceeds."""
    found = _misfit(candidate, levels, budget_bytes, latency_scale)
    return None if found is None else found[1]


def _misfit(
    c: Candidate, levels: ServiceLevels, budget: float | None, scale: float
) -> tuple[str, str] | None:
    """(limit name, phrase) of the first limit the candidate exceeds, or None."""
    gib = c.footprint_bytes / _GIB
    if budget is not None and c.footprint_bytes > budget:
        return "budget", f"footprint {gib:.2f} GiB exceeds the budget {budget / _GIB:.2f} GiB"
    if levels.max_memory_bytes is not None and c.footprint_bytes > levels.max_memory_bytes:
        limit = levels.max_memory_bytes / _GIB
        return "max memory", f"footprint {gib:.2f} GiB exceeds max memory {limit:.2f} GiB"
    latency = c.latency_ms * scale
    if levels.max_latency_ms is not None and latency > levels.max_latency_ms:
        return "max latency", (
            f"latency {latency:.1f} ms/token exceeds max latency {levels.max_latency_ms:g}"
        )
    if levels.max_accuracy is not None and c.accuracy > levels.max_accuracy:
        return "max accuracy", (
            f"accuracy {c.accuracy:.4g} exceeds max accuracy {levels.max_accuracy:g}"
        )
    return None


def closeness(
    candidates: Sequence[Candidate],
    weights: Sequence[float],
    /,
    *,
    latency_scale: float = 1.0,
) -> dict[str, float]:
    """TOPSIS closeness (higher is better) of each candidate over its three cost columns."""
    if not candidates:
        return {}
    matrix = np.array(
        [[c.footprint_bytes, c.latency_ms * latency_scale, c.accuracy] for c in candidates],
        dtype=np.float64,
    )
    scores = topsis(matrix, weights)
    return {c.id: float(s) for c, s in zip(candidates, scores, strict=True)}


def choose(
    candidates: Sequence[Candidate],
    priority: Priority,
    /,
    *,
    current: str | None = None,
    budget_bytes: float | None = None,
    latency_scale: float = 1.0,
    margin: float = 0.05,
    dwell_elapsed: bool = True,
    slack_bytes: float = 0.0,
) -> Decision:
    """Pick the member to serve now, with hysteresis around the current one.

    A member other than the current one must fit the budget with `slack_bytes` to spare, so
    noise on the budget around a footprint does not make the choice flap.
    """
    _check_candidates(candidates)
    if not np.isfinite(latency_scale) or latency_scale <= 0:
        raise InputError(f"latency scale must be positive and finite, got {latency_scale}")
    if margin < 0:
        raise InputError(f"margin must not be negative, got {margin}")
    if not candidates:
        return Decision(None, False, "no candidates", (), {}, budget_bytes)

    if not np.isfinite(slack_bytes) or slack_bytes < 0:
        raise InputError(f"slack must be a non-negative number of bytes, got {slack_bytes}")
    tight = None if budget_bytes is None else budget_bytes - slack_bytes
    misfit = {
        c.id: _misfit(c, priority.levels, budget_bytes if c.id == current else tight,
                      latency_scale)
        for c in candidates
    }
    feasible = [c for c in candidates if misfit[c.id] is None]
    ids = tuple(c.id for c in feasible)
    scores = closeness(feasible, priority.weights, latency_scale=latency_scale)

    def decide(choice: str, reason: str) -> Decision:
        return Decision(choice, choice != current, reason, ids, scores, budget_bytes)

    if not feasible:
        smallest = min(candidates, key=lambda c: (c.footprint_bytes, c.id))
        why = _nothing_fits_why(misfit)
        return decide(smallest.id, f"nothing fits ({why}); smallest footprint {smallest.id}")

    winner = _best(feasible, scores)
    known = {c.id for c in candidates}
    if current is None:
        return decide(winner, f"start with {winner} (closeness {scores[winner]:.3f})")
    if current not in known:
        return decide(winner, f"current {current} is not in the plan set; switch to {winner}")
    if current not in scores:
        return decide(winner, f"{current} no longer fits: {misfit[current][1]}; switch to {winner}")
    if winner == current:
        return decide(current, f"{current} is still the best (closeness {scores[current]:.3f})")
    gain = scores[winner] - scores[current]
    if gain < margin:
        return decide(
            current,
            f"keep {current}: {winner} is better by {gain:.3f}, within the margin {margin:g}",
        )
    if not dwell_elapsed:
        return decide(current, f"keep {current}: {winner} is better by {gain:.3f} but the "
                               "dwell time has not passed")
    return decide(winner, f"switch to {winner}: closeness {scores[winner]:.3f} beats "
                          f"{current}'s {scores[current]:.3f} by more than {margin:g}")


def _best(feasible: Sequence[Candidate], scores: dict[str, float]) -> str:
    """Highest closeness; ties (within TIE_TOLERANCE) go to the smaller footprint, then id."""
    top = max(scores.values())
    tied = [c for c in feasible if scores[c.id] >= top - TIE_TOLERANCE]
    return min(tied, key=lambda c: (c.footprint_bytes, c.id)).id


def _nothing_fits_why(misfit: dict[str, tuple[str, str] | None]) -> str:
    """Which limits excluded every member, e.g. 'the budget' or 'max latency or the budget'."""
    kinds = sorted({found[0] for found in misfit.values() if found})
    if kinds == ["budget"]:
        return "the memory budget excludes every plan"
    return "every plan exceeds " + " or ".join(k if k != "budget" else "the budget" for k in kinds)


def _check_candidates(candidates: Sequence[Candidate]) -> None:
    """Finite non-negative metrics and unique ids."""
    seen: set[str] = set()
    for c in candidates:
        if c.id in seen:
            raise InputError(f"candidate id {c.id} appears twice")
        seen.add(c.id)
        values = (c.footprint_bytes, c.latency_ms, c.accuracy)
        if not all(np.isfinite(v) and v >= 0 for v in values):
            raise InputError(f"candidate {c.id} has a negative or non-finite metric {values}")


def _check_levels(levels: ServiceLevels) -> None:
    """Every given service level must be a positive finite number."""
    for name in ("max_latency_ms", "max_accuracy", "max_memory_bytes"):
        value = getattr(levels, name)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(f"service level {name} must be positive, got {value}")
