"""Layer contribution (paper §3.1): reward/penalty scoring of hand-made cosines."""

from __future__ import annotations

import numpy as np
import pytest

from apreqeld.core.contribution import DEFAULT_GAMMA, cosine_rows, score_cosines
from apreqeld.errors import InputError


def test_reward_below_gamma_penalty_at_or_above() -> None:
    cosines = np.array([
        [0.10, 0.50, 0.95, 0.99],   # 2 rewards, 2 penalties
        [0.91, 0.92, 0.93, 1.00],   # 0 rewards, 4 penalties
        [-0.5, 0.00, 0.20, 0.89],   # 4 rewards
    ])
    c = score_cosines(cosines)
    assert c.gamma == DEFAULT_GAMMA == 0.9
    assert c.reward.tolist() == [2, 0, 4]
    assert c.penalty.tolist() == [2, 4, 0]
    assert c.score.tolist() == [0, -4, 4]
    assert c.mean_cosine == pytest.approx(cosines.mean(axis=1))


def test_a_cosine_exactly_gamma_is_a_penalty() -> None:
    c = score_cosines(np.array([[0.9, 0.9, 0.8999999]]), gamma=0.9)
    assert (c.reward.tolist(), c.penalty.tolist()) == ([1], [2])


def test_gamma_moves_the_threshold() -> None:
    cosines = np.array([[0.5, 0.7, 0.95]])
    assert score_cosines(cosines, gamma=0.6).score.tolist() == [1 - 2]
    assert score_cosines(cosines, gamma=0.99).score.tolist() == [3]
    assert score_cosines(cosines, gamma=-1.0).score.tolist() == [-3]


def test_ranks_order_by_score_then_lower_mean_cosine_then_index() -> None:
    cosines = np.array([
        [0.95, 0.95],   # score -2
        [0.10, 0.95],   # score 0, mean 0.525
        [0.50, 0.93],   # score 0, mean 0.715
        [0.20, 0.30],   # score 2
        [0.10, 0.95],   # score 0, mean 0.525: ties with sublayer 1, later index
    ])
    c = score_cosines(cosines)
    assert c.order().tolist() == [3, 1, 4, 2, 0]
    assert c.ranks().tolist() == [4, 1, 3, 0, 2]


@pytest.mark.parametrize("bad", [np.zeros((3, 0)), np.zeros(4), np.zeros((2, 2, 2))])
def test_cosines_must_be_a_non_empty_matrix(bad: np.ndarray) -> None:
    with pytest.raises(InputError, match=r"^cosines must be a non-empty \(sublayers, tokens\)"):
        score_cosines(bad)


@pytest.mark.parametrize("gamma", [1.5, -1.01])
def test_gamma_outside_the_cosine_range_is_refused(gamma: float) -> None:
    with pytest.raises(InputError, match=rf"^gamma {gamma} is outside \[-1, 1\]$"):
        score_cosines(np.ones((1, 1)), gamma=gamma)


def test_cosine_rows_against_hand_values() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 2.0]], dtype=np.float32)
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0], [2.0, -1.0]], dtype=np.float32)
    assert cosine_rows(a, b) == pytest.approx([0.0, 1.0, -1.0, 0.0], abs=1e-12)


def test_cosine_rows_of_a_zero_row_is_one() -> None:
    """A zero vector has no direction: the sublayer counts as leaving it unchanged."""
    assert cosine_rows(np.zeros((1, 3)), np.ones((1, 3))).tolist() == [1.0]


def test_cosine_rows_is_scale_invariant_and_float64() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 64)).astype(np.float32)
    b = rng.normal(size=(16, 64)).astype(np.float32)
    direct = [float(np.dot(x.astype(np.float64), y) / np.linalg.norm(x.astype(np.float64))
                    / np.linalg.norm(y.astype(np.float64))) for x, y in zip(a, b, strict=True)]
    got = cosine_rows(a, 7.0 * b)
    assert got.dtype == np.float64
    assert got == pytest.approx(direct, rel=1e-6, abs=1e-9)
