"""Recalibration of the additive predictor (core.targeting.Predictor) from measured members.

A metric's prediction of a recipe r is sum over tensors t of w_t x f[r(t)]: linear in the
per-type figures f. Given measured members (recipe r_i, value y_i), the figures are refitted by
least squares on relative errors, pulled towards the prior figures (those that reproduce the
uniform models) by a ridge term:

    minimize  sum_i ((A f - y)_i / y_i)^2 + ridge x sum_q ((f_q - f0_q) / s_q)^2

with A[i, q] = sum of w_t over the tensors r_i gives type q, and s_q = max(|f0_q|, 1e-3 x
max|f0|). For an accuracy metric the tensor weights are also recalibrated through one factor
g_p per tensor part (attn_v, ffn_down, ...): w'_t = w_t g_p(t) / sum_t w_t g_p(t), the factors
fitted the same way with the figures fixed (ridge towards 1), alternating with the figures a
fixed number of times and ending on a figures fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from apreqeld.core.targeting import Predictor
from apreqeld.errors import PlanError

RIDGE = 0.05  # a figure moved by 10 % of its prior costs as a member mispredicted by 2.2 %
ROUNDS = 3  # alternations of the part factors and the figures
FACTOR_RANGE = (0.05, 20.0)  # a part's weight is never scaled beyond this


@dataclass(frozen=True)
class Observation:
    """One measured member: its recipe (tensor -> written type) and metric -> measured value."""

    recipe: Mapping[str, str]
    measured: Mapping[str, float]


@dataclass(frozen=True)
class Calibration:
    """The recalibrated predictor and what the fit did."""

    predictor: Predictor
    figures: dict[str, dict[str, float]]  # metric -> type -> figure
    part_scale: dict[str, dict[str, float]]  # metric -> part -> factor (accuracy metrics)
    residual: dict[str, dict[str, float]]  # metric -> {"before", "after"}: median |rel error|
    observations: int


def design(recipes: Sequence[Mapping[str, str]], weights: Mapping[str, float],
           types: Sequence[str], /) -> np.ndarray:
    """(n, T): A[i, q] = sum of the weights of the tensors recipe i gives type types[q]."""
    col = {q: j for j, q in enumerate(types)}
    a = np.zeros((len(recipes), len(types)))
    for i, r in enumerate(recipes):
        for t, w in weights.items():
            q = r.get(t)
            if q not in col:
                raise PlanError(f"no figure for {q} (tensor {t})")
            a[i, col[q]] += w
    return a


def ridge_fit(a: np.ndarray, y: np.ndarray, prior: np.ndarray, /, *,
              ridge: float = RIDGE) -> np.ndarray:
    """argmin_f sum ((a f - y) / y)^2 + ridge sum ((f - prior) / s)^2 (s: see module doc)."""
    a, y, prior = (np.asarray(v, dtype=np.float64) for v in (a, y, prior))
    if np.any(y == 0) or not np.all(np.isfinite(y)):
        raise PlanError("a measured value is zero or not finite: relative errors are undefined")
    s = np.maximum(np.abs(prior), 1e-3 * max(float(np.abs(prior).max()), 1e-300))
    lhs = np.vstack([a / np.abs(y)[:, None], np.sqrt(ridge) * np.diag(1 / s)])
    rhs = np.concatenate([y / np.abs(y), np.sqrt(ridge) * prior / s])
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def median_error(a: np.ndarray, f: np.ndarray, y: np.ndarray, /) -> float:
    """Median |predicted / measured - 1|."""
    return float(np.median(np.abs(a @ f / y - 1))) if len(y) else 0.0


def recalibrate(prior: Predictor, observations: Sequence[Observation], /, *,
                parts: Mapping[str, str] | None = None, scale_parts: Sequence[str] = (),
                ridge: float = RIDGE, rounds: int = ROUNDS) -> Calibration:
    """The predictor refitted to `observations` (module doc): figures of every metric the
    observations measure; for the metrics in `scale_parts` also one factor per tensor part
    (`parts`: tensor -> part). Metrics no observation measures keep their prior."""
    weights = {m: dict(w) for m, w in prior.weights.items()}
    figures = {m: dict(f) for m, f in prior.figures.items()}
    scales: dict[str, dict[str, float]] = {}
    residual: dict[str, dict[str, float]] = {}
    for metric in prior.figures:
        seen = [o for o in observations if metric in o.measured]
        if not seen:
            continue
        types = sorted(prior.figures[metric])
        y = np.array([float(o.measured[metric]) for o in seen])
        recipes = [o.recipe for o in seen]
        f0 = np.array([prior.figures[metric][q] for q in types])
        w = dict(prior.weights[metric])
        before = median_error(design(recipes, w, types), f0, y)
        f = ridge_fit(design(recipes, w, types), y, f0, ridge=ridge)
        if metric in scale_parts:
            of = {t: (parts or {}).get(t, "") for t in w}
            names = sorted(set(of.values()))
            g = np.ones(len(names))
            for _ in range(rounds):
                by_part = [{t: x for t, x in w.items() if of[t] == p} for p in names]
                fig = dict(zip(types, f, strict=True))
                b = np.array([[sum(x * fig[r[t]] for t, x in bp.items()) for bp in by_part]
                              for r in recipes])
                g = np.clip(g * ridge_fit(b, y, np.ones(len(names)), ridge=ridge),
                            *FACTOR_RANGE)
                w = {t: x * g[names.index(of[t])] for t, x in prior.weights[metric].items()}
                total = sum(w.values())
                w = {t: x / total for t, x in w.items()}
                g = g / total
                f = ridge_fit(design(recipes, w, types), y, f0, ridge=ridge)
            scales[metric] = {p: float(x) for p, x in zip(names, g, strict=True) if p}
        weights[metric] = w
        figures[metric] = {q: float(x) for q, x in zip(types, f, strict=True)}
        residual[metric] = {"before": round(before, 6),
                            "after": round(median_error(design(recipes, w, types), f, y), 6)}
    fitted = Predictor(weights=weights, figures=figures, bytes_of=prior.bytes_of,
                       fixed_bytes=prior.fixed_bytes)
    return Calibration(fitted, figures, scales, residual, len(observations))


def scaled_weights(weights: Mapping[str, float], parts: Mapping[str, str],
                   scale: Mapping[str, float], /) -> dict[str, float]:
    """Weights scaled by their part's factor (1 where none), renormalized to sum 1: what
    `recalibrate` gives, rebuilt from its recorded factors."""
    w = {t: x * scale.get(parts.get(t, ""), 1.0) for t, x in weights.items()}
    total = sum(w.values())
    return {t: x / total for t, x in w.items()}
