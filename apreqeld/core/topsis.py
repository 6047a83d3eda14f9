"""TOPSIS ranking (paper §3.2.2) of a decision matrix and of every candidate distribution.

Vector normalisation per column (y = x / ||x||, a column of norm 0 stays 0), weights multiplied,
ideal / anti-ideal per column (min / max for costs, swapped for benefits), closeness score
``d- / (d- + d+)``, 1.0 when both distances are 0. Scores do not change when all weights are
multiplied by the same positive factor.

Tie-break in :func:`rank_distributions`: the best score wins; every candidate whose score is
within 1e-12 of the best counts as tied, and among those the distribution that is
lexicographically largest read from the least to the most aggressive type wins (it prefers
less aggressive types). Since candidates are enumerated in lexicographically descending order,
that is the first tied candidate met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from apreqeld.core.candidates import DEFAULT_CHUNK_SIZE, count_distributions, iter_distributions
from apreqeld.errors import InputError

TIE_TOLERANCE = 1e-12
_BLOCK_ROWS = 32_768  # rows scored at once: small enough for the temporaries to stay in cache

MemoryColumn = Callable[[np.ndarray], np.ndarray]
Feasible = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Ranking:
    """The best distribution of a TOPSIS ranking over all candidate distributions."""

    distribution: tuple[int, ...]
    score: float
    metrics: tuple[float, ...]
    n_candidates: int
    ideal: tuple[float, ...]
    anti_ideal: tuple[float, ...]
    n_feasible: int = 0  # candidates that satisfied `feasible` (all of them when none given)


def topsis(
    matrix: np.ndarray,
    /,
    weights: Sequence[float],
    *,
    benefit: Sequence[bool] | None = None,
) -> np.ndarray:
    """Closeness scores in [0, 1] of the rows of a (K, J) matrix; the highest is the best."""
    values = _as_matrix(matrix)
    w = _as_weights(weights, values.shape[1])
    is_benefit = _as_benefit(benefit, values.shape[1])
    if values.shape[0] == 0:
        return np.zeros(0)
    norms = np.sqrt(np.square(values).sum(axis=0))
    scale = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    weighted_t = np.ascontiguousarray((values * scale).T)
    ideal, anti = _ideal_points(weighted_t.min(axis=1), weighted_t.max(axis=1), is_benefit)
    return _closeness(weighted_t, ideal, anti)


def rank_distributions(
    n_sublayers: int,
    costs: np.ndarray,
    /,
    weights: Sequence[float],
    *,
    memory_column: MemoryColumn | None = None,
    feasible: Feasible | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Ranking:
    """Rank every distribution of L sublayers over the M types of `costs` by TOPSIS.

    `costs` is the (M, J) matrix of uniform-type measurements, all cost criteria (lower is
    better), types ordered least to most aggressive; `weights` has one entry per column.
    Metrics are estimated proportionally; `memory_column`, called with any block of
    distributions (int array (k, M)), returns their k exact memory sizes, which replace column
    0. Two streaming passes over chunks keep memory bounded by chunk_size.
    """
    c = _as_matrix(costs)
    n_types, n_metrics = c.shape
    w = _as_weights(weights, n_metrics)
    is_benefit = np.zeros(n_metrics, dtype=bool)
    n_candidates = count_distributions(n_sublayers, n_types)
    per_sublayer_t = np.ascontiguousarray(c.T / n_sublayers)

    def estimate(z: np.ndarray) -> np.ndarray:
        """Estimated metrics of a block of distributions, one row per metric: shape (J, k)."""
        # einsum, not matmul: BLAS threads cost more than they save on (J, M) x (M, k) products
        x = np.einsum("jm,mk->jk", per_sublayer_t, np.array(z.T, dtype=np.float64, order="C"))
        if memory_column is not None:
            x[0] = _memory_values(memory_column, z)
        return x

    def blocks() -> Iterator[np.ndarray]:
        """All distributions in enumeration order, in cache-sized blocks."""
        for chunk in iter_distributions(n_sublayers, n_types, chunk_size=chunk_size):
            for start in range(0, chunk.shape[0], _BLOCK_ROWS):
                yield chunk[start : start + _BLOCK_ROWS]

    def allowed(z: np.ndarray) -> np.ndarray | None:
        return None if feasible is None else np.asarray(feasible(z), dtype=bool)

    sum_squares = np.zeros(n_metrics)
    low = np.full(n_metrics, np.inf)
    high = np.full(n_metrics, -np.inf)
    n_feasible = 0
    for z in blocks():
        ok = allowed(z)
        if ok is not None:
            z = z[ok]
        if z.shape[0] == 0:
            continue
        n_feasible += z.shape[0]
        x = estimate(z)
        sum_squares += np.einsum("jk,jk->j", x, x)
        np.minimum(low, x.min(axis=1), out=low)
        np.maximum(high, x.max(axis=1), out=high)
    if n_feasible == 0:
        raise InputError("no distribution of the types meets the given limits")

    norms = np.sqrt(sum_squares)
    scale = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
    ideal, anti = _ideal_points(low * scale, high * scale, is_benefit)
    raw_ideal, raw_anti = _ideal_points(low, high, is_benefit)

    best = _FirstBest()
    for z in blocks():
        ok = allowed(z)
        if ok is not None:
            z = z[ok]
        best.update(_closeness(estimate(z) * scale[:, np.newaxis], ideal, anti), z)

    winner = best.distribution()
    return Ranking(
        distribution=tuple(int(v) for v in winner),
        score=best.score(),
        metrics=tuple(float(v) for v in estimate(winner[np.newaxis, :])[:, 0]),
        n_candidates=n_candidates,
        ideal=tuple(float(v) for v in raw_ideal),
        anti_ideal=tuple(float(v) for v in raw_anti),
        n_feasible=n_feasible,
    )


class _FirstBest:
    """Streaming search for the first row whose score is within TIE_TOLERANCE of the maximum.

    Keeps the prefix-maximum records (rows scoring above every earlier row) that are still
    within the tolerance of the running maximum: the first row within tolerance of the final
    maximum is always such a record.
    """

    def __init__(self) -> None:
        self._scores: list[float] = []
        self._rows: list[np.ndarray] = []

    def update(self, scores: np.ndarray, rows: np.ndarray) -> None:
        """Take in the scores of the next rows in enumeration order."""
        if scores.shape[0] == 0:
            return
        previous = self._scores[-1] if self._scores else -np.inf
        running = np.maximum.accumulate(scores)
        before = np.concatenate(([previous], np.maximum(running[:-1], previous)))
        floor = max(previous, float(running[-1])) - TIE_TOLERANCE
        for index in np.flatnonzero((scores > before) & (scores >= floor)):
            self._scores.append(float(scores[index]))
            self._rows.append(rows[index].copy())
        keep = next(i for i, s in enumerate(self._scores) if s >= floor)
        del self._scores[:keep], self._rows[:keep]

    def distribution(self) -> np.ndarray:
        """The winning row."""
        return self._rows[0]

    def score(self) -> float:
        """The maximum score (that of the last record)."""
        return self._scores[-1]


def _memory_values(memory_column: MemoryColumn, z: np.ndarray) -> np.ndarray:
    """Call the exact-memory hook and check it returns one finite value per distribution."""
    values = np.asarray(memory_column(z), dtype=np.float64)
    if values.shape != (z.shape[0],) or not np.all(np.isfinite(values)):
        raise InputError(
            f"memory estimator must return {z.shape[0]} finite values, got shape {values.shape}"
        )
    return values


def _closeness(weighted_t: np.ndarray, ideal: np.ndarray, anti: np.ndarray) -> np.ndarray:
    """Closeness d- / (d- + d+) of weighted normalised values given as (J, K); 1.0 if both 0."""
    to_ideal = np.zeros(weighted_t.shape[1])
    to_anti = np.zeros(weighted_t.shape[1])
    for row, best, worst in zip(weighted_t, ideal, anti, strict=True):
        to_ideal += np.square(row - best)
        to_anti += np.square(row - worst)
    np.sqrt(to_ideal, out=to_ideal)
    np.sqrt(to_anti, out=to_anti)
    total = to_ideal + to_anti
    return np.divide(to_anti, total, out=np.ones_like(total), where=total > 0)


def _ideal_points(
    low: np.ndarray, high: np.ndarray, is_benefit: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ideal and anti-ideal from per-column min and max: min is best for costs."""
    return np.where(is_benefit, high, low), np.where(is_benefit, low, high)


def _as_matrix(matrix: np.ndarray) -> np.ndarray:
    """A finite 2-D float matrix with at least one column."""
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise InputError(f"decision matrix must be 2-D with columns, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError("decision matrix must contain only finite values")
    return values


def _as_weights(weights: Sequence[float], n_criteria: int) -> np.ndarray:
    """One finite non-negative weight per criterion."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_criteria,):
        raise InputError(f"expected {n_criteria} weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError(f"weights must be finite and non-negative, got {w.tolist()}")
    return w


def _as_benefit(benefit: Sequence[bool] | None, n_criteria: int) -> np.ndarray:
    """Boolean benefit flags, all False (costs) by default."""
    if benefit is None:
        return np.zeros(n_criteria, dtype=bool)
    flags = np.asarray(benefit)
    if flags.shape != (n_criteria,) or flags.dtype != bool:
        raise InputError(f"benefit must hold {n_criteria} booleans, got {flags.tolist()}")
    return flags
