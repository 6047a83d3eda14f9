"""Plan-set fronts (pure): the weight grid over the simplex, and measured dominance that says
which points dominate each point. Every objective is minimised."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from apreqeld.errors import InputError


def simplex_grid(step: float, /) -> list[tuple[float, float, float]]:
    """Every (memory, latency, accuracy) weight vector on a lattice of `step` summing to 1
    (step 0.1 gives 66 vectors)."""
    if not (isinstance(step, int | float) and math.isfinite(step) and 0 < step <= 1):
        raise InputError(f"grid step must be in (0, 1], got {step}")
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise InputError(f"grid step {step} does not divide 1 (e.g. 0.1, 0.125, 0.25, 0.5)")
    return [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]


def unique_vectors(vectors: Sequence[Sequence[float]], /, *,
                   digits: int = 9) -> list[tuple[float, float, float]]:
    """The vectors in first-seen order, each once (compared after rounding to `digits`)."""
    seen: dict[tuple[float, ...], tuple[float, float, float]] = {}
    for v in vectors:
        key = tuple(round(float(x), digits) for x in v)
        seen.setdefault(key, (float(v[0]), float(v[1]), float(v[2])))
    return list(seen.values())


def dominated_by(points: np.ndarray, /) -> list[list[int]]:
    """For each row of `points` (n, d), the rows that dominate it: no worse in every objective
    and better in one. Equal points do not dominate each other. An empty list: on the front."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise InputError(f"points must be a 2-D array (n, objectives), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InputError("points must contain only finite values")
    no_worse = np.all(p[:, None, :] <= p[None, :, :], axis=2)  # [a, b]: a <= b everywhere
    better = np.any(p[:, None, :] < p[None, :, :], axis=2)
    dominates = no_worse & better
    return [np.flatnonzero(dominates[:, b]).tolist() for b in range(p.shape[0])]


def dominance_gaps(points: np.ndarray, targets: Sequence[int], others: Sequence[int],
                   /) -> list[tuple[list[int], int | None, list[float]]]:
    """For each target row: the rows of `others` (itself excluded) that dominate it, the one
    closest to dominating it (smallest worst relative excess), and that row's relative excess
    `(other - target) / |target|` per objective (<= 0 everywhere when it dominates)."""
    p = np.asarray(points, dtype=np.float64)
    doms = dominated_by(p)
    out = []
    for t in targets:
        pool = [o for o in others if o != t]
        if not pool:
            out.append(([], None, []))
            continue
        scale = np.where(np.abs(p[t]) > 0, np.abs(p[t]), 1.0)
        excess = (p[pool] - p[t]) / scale
        best = int(np.argmin(excess.max(axis=1)))  # first of equals: stable
        out.append(([o for o in doms[t] if o in pool], pool[best],
                    [float(x) for x in excess[best]]))
    return out
