import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from apreqeld.core.allocation import allocate, rank_order
from apreqeld.errors import PlanError


def test_algorithm_1_on_distinct_scores():
    scores = [3.0, -1.0, 5.0, 0.0, 2.0]
    assert rank_order(scores).tolist() == [2, 0, 4, 3, 1]
    # two most important -> type 0, next two -> type 1, last -> type 2
    assert allocate(scores, (2, 2, 1)).tolist() == [0, 2, 0, 1, 1]


def test_zero_counts_skip_types():
    scores = [1.0, 4.0, 2.0, 3.0]
    assert allocate(scores, (0, 3, 0, 1)).tolist() == [3, 1, 1, 1]
    assert allocate(scores, (4,)).tolist() == [0, 0, 0, 0]


def test_ties_without_tiebreak_keep_sublayer_index_order():
    scores = [2, 5, 2, 2, 5]
    assert rank_order(scores).tolist() == [1, 4, 0, 2, 3]
    assert allocate(scores, (1, 2, 2)).tolist() == [1, 0, 2, 2, 1]


def test_ties_with_tiebreak_lower_similarity_first_then_index():
    scores = [2, 5, 2, 2, 5]
    similarity = [0.9, 0.8, 0.7, 0.9, 0.95]
    assert rank_order(scores, tiebreak=similarity).tolist() == [1, 4, 2, 0, 3]
    assert allocate(scores, (1, 2, 2), tiebreak=similarity).tolist() == [2, 0, 1, 2, 1]


def test_tiebreak_does_not_override_scores():
    assert rank_order([1, 2], tiebreak=[0.0, 1.0]).tolist() == [1, 0]


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.data())
def test_allocation_respects_counts_and_importance(scores, data):
    n_types = data.draw(st.integers(1, 5))
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(scores)), min_size=n_types - 1, max_size=n_types - 1))
    )
    counts = np.diff([0, *cuts, len(scores)])
    types = allocate(scores, counts)
    assert np.bincount(types, minlength=n_types).tolist() == counts.tolist()
    # a more important sublayer never gets a more aggressive type
    for a in range(len(scores)):
        for b in range(len(scores)):
            if scores[a] > scores[b]:
                assert types[a] <= types[b]
    order = rank_order(scores)
    assert sorted(order.tolist()) == list(range(len(scores)))
    assert (np.diff(types[order]) >= 0).all()


def test_distribution_must_cover_every_sublayer():
    with pytest.raises(
        PlanError, match=r"distribution \[2, 2\] covers 4 sublayers, the model has 5"
    ):
        allocate([1, 2, 3, 4, 5], (2, 2))


def test_negative_counts_are_rejected():
    with pytest.raises(PlanError, match=r"distribution \[3, -1, 3\] has a negative count"):
        allocate([1, 2, 3, 4, 5], (3, -1, 3))


def test_bad_scores_and_tiebreak_are_rejected():
    with pytest.raises(PlanError, match="tiebreak has 2 values for 3 sublayers"):
        rank_order([1, 2, 3], tiebreak=[0.1, 0.2])
    with pytest.raises(PlanError, match="scores must be finite numbers"):
        rank_order([1, float("nan")])
    with pytest.raises(PlanError, match="integer counts"):
        allocate([1, 2], (1.0, 1.0))
