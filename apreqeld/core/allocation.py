"""Layer-wise quantization allocation (paper §3.3, Algorithm 1).

Sublayers are ranked by contribution score, highest first; equal scores are ordered by the
tie-break value ascending (the mean cosine similarity: lower means the sublayer changes the
hidden state more, so it is more important), then by sublayer index ascending. The first z_0
ranked sublayers get type 0 (least aggressive), the next z_1 type 1, and so on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apreqeld.errors import PlanError


def rank_order(
    scores: Sequence[float], /, *, tiebreak: Sequence[float] | None = None
) -> np.ndarray:
    """Sublayer indices from most to least important, the order Algorithm 1 fills types in."""
    values = _as_vector(scores, "scores")
    index = np.arange(values.shape[0])
    if tiebreak is None:
        return np.lexsort((index, -values))
    ties = _as_vector(tiebreak, "tiebreak")
    if ties.shape != values.shape:
        raise PlanError(f"tiebreak has {ties.shape[0]} values for {values.shape[0]} sublayers")
    return np.lexsort((index, ties, -values))


def allocate(
    scores: Sequence[float],
    distribution: Sequence[int],
    /,
    *,
    tiebreak: Sequence[float] | None = None,
) -> np.ndarray:
    """Type index (0 = least aggressive) of each sublayer: important sublayers get gentle types."""
    counts = np.asarray(distribution)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise PlanError(f"distribution must be a sequence of integer counts, got {counts.tolist()}")
    if np.any(counts < 0):
        raise PlanError(f"distribution {counts.tolist()} has a negative count")
    order = rank_order(scores, tiebreak=tiebreak)
    if int(counts.sum()) != order.shape[0]:
        raise PlanError(
            f"distribution {counts.tolist()} covers {int(counts.sum())} sublayers, "
            f"the model has {order.shape[0]}"
        )
    types = np.empty(order.shape[0], dtype=np.int64)
    types[order] = np.repeat(np.arange(counts.shape[0]), counts)
    return types


def _as_vector(values: Sequence[float], label: str) -> np.ndarray:
    """A 1-D array of finite floats."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise PlanError(f"{label} must be one value per sublayer, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise PlanError(f"{label} must be finite numbers")
    return array
