"""Pareto dominance and hypervolume comparison of solution sets (paper §4.1.2, §4.2).

All three objectives (memory, latency, perplexity) are minimised unless ``maximise`` says
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import moocore
import numpy as np

from apreqeld.errors import InputError

NORMALISATION = (
    "each objective x is mapped to (x - ideal) / (ref - ideal), ideal being the per-objective "
    "minimum over baseline and candidates and ref the per-objective maximum over the baseline, "
    "so the reference point is (1, ..., 1) and the box [ideal, ref] has volume 1; an objective "
    "constant over the baseline and never bettered maps points at that value to 1 (on the "
    "reference point, as in the raw objective: no volume) and points worse than ref to 2"
)


@dataclass(frozen=True)
class HypervolumeComparison:
    """Hypervolumes of a baseline set, a candidate set and their union, in normalised units."""

    ideal: tuple[float, ...]
    ref: tuple[float, ...]
    hv_baseline: float
    hv_candidates: float
    hv_union: float
    gain: float | None  # None when the baseline has no volume (the gain is undefined)
    gain_union: float | None
    normalisation: str


def nondominated(points: np.ndarray, /, *, maximise: bool = False) -> np.ndarray:
    """Mask of the points no other point dominates, to find the Pareto front of measured models.

    moocore flags only the first copy of a duplicated non-dominated point by default; here
    ``keep_weakly=True`` is passed so every copy is flagged (duplicates do not dominate each
    other).
    """
    values = _as_points(points)
    if values.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(moocore.is_nondominated(values, maximise=maximise, keep_weakly=True))


def hypervolume(points: np.ndarray, /, ref: np.ndarray, *, maximise: bool = False) -> float:
    """Volume dominated by the points and bounded by ref; points not strictly better add none."""
    values = _as_points(points)
    reference = np.asarray(ref, dtype=np.float64)
    if reference.shape != (values.shape[1],):
        raise InputError(
            f"reference point must have {values.shape[1]} objectives, got {reference.shape}"
        )
    if values.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(values, ref=reference, maximise=maximise))


def compare_sets(baseline: np.ndarray, candidates: np.ndarray, /, *,
                 margin: float = 0.0) -> HypervolumeComparison:
    """Hypervolume gain of candidates over a baseline (minimised objectives, paper protocol).

    The reference point is the worst value of each objective in the baseline; all points are
    normalised as described by ``NORMALISATION``. gain = (hv_candidates - hv_baseline) /
    hv_baseline, and likewise for the union; both are None (undefined) when hv_baseline is 0,
    as when an objective is constant over the baseline and no candidate betters it (the
    paper's definition: every baseline point lies on the reference point there).
    With the paper's reference point a baseline point that is worst in any objective adds no
    volume; `margin` > 0 moves the normalised reference point to (1 + margin, ...), the usual
    remedy, so that extreme points count too.
    """
    if not margin >= 0:
        raise InputError(f"margin must be >= 0, got {margin}")
    base = _as_points(baseline)
    cand = _as_points(candidates)
    if base.shape[0] == 0:
        raise InputError("the baseline set is empty")
    if cand.shape[1] != base.shape[1]:
        raise InputError(
            f"candidates have {cand.shape[1]} objectives, the baseline has {base.shape[1]}"
        )
    ref = base.max(axis=0)
    ideal = np.vstack((base, cand)).min(axis=0)
    one = np.full_like(ref, 1.0 + margin)

    def normalise(points: np.ndarray) -> np.ndarray:
        span = ref - ideal
        flat = span == 0
        scaled = (points - ideal) / np.where(flat, 1.0, span)
        return np.where(flat, np.where(points > ref, 2.0, 1.0), scaled)

    hv_base = hypervolume(normalise(base), ref=one)
    hv_cand = hypervolume(normalise(cand), ref=one)
    hv_union = hypervolume(normalise(np.vstack((base, cand))), ref=one)
    return HypervolumeComparison(
        ideal=tuple(float(v) for v in ideal),
        ref=tuple(float(v) for v in ref),
        hv_baseline=hv_base,
        hv_candidates=hv_cand,
        hv_union=hv_union,
        gain=_relative_gain(hv_cand, hv_base),
        gain_union=_relative_gain(hv_union, hv_base),
        normalisation=NORMALISATION + (
            f"; reference point moved to {1 + margin:g} in every normalised objective"
            if margin else ""),
    )


def _relative_gain(value: float, baseline: float) -> float | None:
    """(value - baseline) / baseline, None (undefined) when the baseline volume is 0."""
    if baseline == 0:
        return None
    return (value - baseline) / baseline


def _as_points(points: np.ndarray) -> np.ndarray:
    """A finite (n, d) float array with d >= 1."""
    values = np.asarray(points, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise InputError(f"points must be a 2-D array (n, objectives), got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError("points must contain only finite values")
    return values
