"""Layer contribution (paper §3.1): reward/penalty scores from per-token cosine similarities.

A sublayer that turns its input hidden state into something dissimilar (cosine below gamma)
changes the information and earns a reward; one that leaves it almost unchanged earns a penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apreqeld.core.allocation import rank_order
from apreqeld.errors import InputError

DEFAULT_GAMMA = 0.9


@dataclass(frozen=True)
class Contribution:
    """Per-sublayer statistics, index-aligned with the model's sublayers."""

    reward: np.ndarray  # tokens whose cosine is below gamma
    penalty: np.ndarray  # tokens whose cosine is at or above gamma
    mean_cosine: np.ndarray
    gamma: float

    @property
    def score(self) -> np.ndarray:
        return self.reward - self.penalty

    def order(self) -> np.ndarray:
        """Sublayer indices from most to least important: score descending, then mean cosine
        ascending (a larger change is more important), then index (deterministic)."""
        return rank_order(self.score, tiebreak=self.mean_cosine)

    def ranks(self) -> np.ndarray:
        """Rank of each sublayer (0 = most important)."""
        ranks = np.empty(len(self.reward), dtype=np.int64)
        ranks[self.order()] = np.arange(len(self.reward))
        return ranks


def cosine_rows(a: np.ndarray, b: np.ndarray, /) -> np.ndarray:
    """Cosine similarity of matching rows of two (tokens, hidden) arrays, in float64."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    dot = np.einsum("ij,ij->i", a64, b64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.divide(dot, norms, out=np.ones_like(dot), where=norms > 0)


def score_cosines(cosines: np.ndarray, /, *, gamma: float = DEFAULT_GAMMA) -> Contribution:
    """Score a (sublayers, tokens) array of cosines with the reward/penalty rule at `gamma`."""
    cos = np.asarray(cosines, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[1] == 0:
        raise InputError("cosines must be a non-empty (sublayers, tokens) array")
    if not -1.0 <= gamma <= 1.0:
        raise InputError(f"gamma {gamma} is outside [-1, 1]")
    below = cos < gamma
    reward = below.sum(axis=1).astype(np.int64)
    return Contribution(reward=reward, penalty=cos.shape[1] - reward,
                        mean_cosine=cos.mean(axis=1), gamma=gamma)
