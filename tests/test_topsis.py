import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymcdm.methods import TOPSIS
from pymcdm.normalizations import vector_normalization

from apreqeld.core.candidates import exact_memory, iter_distributions, proportional_metrics
from apreqeld.core.topsis import TIE_TOLERANCE, Ranking, rank_distributions, topsis
from apreqeld.errors import InputError

# Made-up uniform-type measurements, types from least to most aggressive:
# memory (GB), latency (ms/token), accuracy cost (perplexity).
COSTS = np.array(
    [
        [8.5, 30.0, 6.10],  # q8_0: most accurate
        [6.6, 26.0, 6.15],  # q6_K
        [5.7, 21.0, 6.30],  # q5_K: fastest
        [4.9, 24.0, 6.60],  # q4_K
        [3.9, 28.0, 7.40],  # q3_K: smallest
    ]
)


@pytest.mark.filterwarnings("ignore:Alternatives with indices:UserWarning")
@pytest.mark.parametrize(("n_rows", "n_criteria"), [(2, 1), (5, 3), (30, 4), (200, 6)])
@pytest.mark.parametrize("seed", range(5))
def test_matches_pymcdm_topsis_with_vector_normalisation(n_rows, n_criteria, seed):
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(0.1, 100, (n_rows, n_criteria))
    weights = rng.dirichlet(np.ones(n_criteria))
    benefit = rng.random(n_criteria) < 0.5
    types = np.where(benefit, 1, -1)
    expected = TOPSIS(normalization_function=vector_normalization)(matrix, weights, types)
    np.testing.assert_allclose(topsis(matrix, weights, benefit=benefit), expected, atol=1e-12)
    costs_only = TOPSIS(normalization_function=vector_normalization)(
        matrix, weights, -np.ones(n_criteria)
    )
    np.testing.assert_allclose(topsis(matrix, weights), costs_only, atol=1e-12)


def test_scores_are_in_unit_interval_and_scale_free_in_weights():
    rng = np.random.default_rng(7)
    matrix = rng.uniform(1, 5, (50, 3))
    scores = topsis(matrix, [0.2, 0.3, 0.5])
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(topsis(matrix, [2, 3, 5]), scores)


def test_zero_norm_column_and_all_equal_rows():
    matrix = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    np.testing.assert_allclose(topsis(matrix, [0.5, 0.5]), [1.0, 0.5, 0.0])
    assert topsis(np.ones((4, 3)), [0.2, 0.3, 0.5]).tolist() == [1.0] * 4
    assert topsis(matrix, [0, 0]).tolist() == [1.0] * 3


def test_topsis_rejects_bad_input():
    with pytest.raises(InputError, match="expected 2 weights"):
        topsis(np.ones((3, 2)), [1, 1, 1])
    with pytest.raises(InputError, match="finite and non-negative"):
        topsis(np.ones((3, 2)), [1, -1])
    with pytest.raises(InputError, match="only finite values"):
        topsis(np.array([[1.0, np.nan]]), [1, 1])
    with pytest.raises(InputError, match="benefit must hold 2 booleans"):
        topsis(np.ones((3, 2)), [1, 1], benefit=[True])


def full_matrix_winner(n_sublayers, costs, weights, memory_column=None):
    table = np.concatenate(list(iter_distributions(n_sublayers, costs.shape[0])))
    x = proportional_metrics(table, costs)
    if memory_column is not None:
        x[:, 0] = memory_column(table)
    scores = topsis(x, weights)
    first = int(np.flatnonzero(scores >= scores.max() - TIE_TOLERANCE)[0])
    return table, x, scores, first


@settings(max_examples=40, deadline=None)
@given(
    n_sublayers=st.integers(1, 12),
    n_types=st.integers(1, 5),
    n_metrics=st.integers(1, 3),
    chunk_size=st.sampled_from([1, 7, 64, 262_144]),
    seed=st.integers(0, 2**32 - 1),
)
def test_streaming_ranking_agrees_with_full_matrix_topsis(
    n_sublayers, n_types, n_metrics, chunk_size, seed
):
    rng = np.random.default_rng(seed)
    costs = rng.uniform(0.5, 10, (n_types, n_metrics))
    weights = rng.dirichlet(np.ones(n_metrics))
    ranking = rank_distributions(n_sublayers, costs, weights, chunk_size=chunk_size)
    table, x, scores, first = full_matrix_winner(n_sublayers, costs, weights)
    assert ranking.distribution == tuple(table[first].tolist())
    assert ranking.score == pytest.approx(scores.max(), abs=1e-12)
    assert ranking.n_candidates == table.shape[0]
    np.testing.assert_allclose(ranking.metrics, x[first])
    np.testing.assert_allclose(ranking.ideal, x.min(axis=0))
    np.testing.assert_allclose(ranking.anti_ideal, x.max(axis=0))


def test_streaming_ranking_with_exact_memory_column_agrees_with_full_matrix():
    rng = np.random.default_rng(3)
    n_sublayers, n_types = 9, 4
    costs = COSTS[:n_types]
    by_rank = rng.uniform(1, 3, (n_sublayers, n_types)) * np.array([4.0, 3.0, 2.0, 1.0])

    def memory(z):
        return exact_memory(z, by_rank, outside_bytes=5.0)

    weights = (0.5, 0.3, 0.2)
    ranking = rank_distributions(n_sublayers, costs, weights, memory_column=memory, chunk_size=10)
    table, x, scores, first = full_matrix_winner(n_sublayers, costs, weights, memory)
    assert ranking.distribution == tuple(table[first].tolist())
    np.testing.assert_allclose(ranking.metrics, x[first])
    assert ranking.metrics[0] == pytest.approx(memory(table[first : first + 1])[0])


def test_single_metric_weights_pick_the_uniform_extremes():
    memory_only = rank_distributions(16, COSTS, (1, 0, 0))
    assert memory_only.distribution == (0, 0, 0, 0, 16)  # q3_K everywhere: least memory
    assert memory_only.score == pytest.approx(1.0)
    accuracy_only = rank_distributions(16, COSTS, (0, 0, 1))
    assert accuracy_only.distribution == (16, 0, 0, 0, 0)  # q8_0 everywhere: lowest perplexity
    latency_only = rank_distributions(16, COSTS, (0, 1, 0))
    assert latency_only.distribution == (0, 0, 16, 0, 0)
    np.testing.assert_allclose(latency_only.metrics, COSTS[2])


def test_balanced_weights_can_mix_types():
    ranking = rank_distributions(64, COSTS, (0.5, 0.5, 0.0))
    assert isinstance(ranking, Ranking)
    assert sum(ranking.distribution) == 64
    assert ranking.n_candidates == 814_385
    assert ranking.ideal == pytest.approx((3.9, 21.0, 6.10))
    assert ranking.anti_ideal == pytest.approx((8.5, 30.0, 7.40))


def test_ties_prefer_less_aggressive_types():
    costs = np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])  # types 0 and 1 are identical
    ranking = rank_distributions(4, costs, (0.5, 0.5), chunk_size=3)
    assert ranking.distribution == (4, 0, 0)
    all_equal = rank_distributions(5, np.ones((3, 2)), (0.5, 0.5))
    assert all_equal.distribution == (5, 0, 0)
    assert all_equal.score == 1.0
    zero_weights = rank_distributions(5, COSTS[:3], (0, 0, 0))
    assert zero_weights.distribution == (5, 0, 0)


def test_bad_memory_column_is_reported():
    with pytest.raises(InputError, match="memory estimator must return"):
        rank_distributions(4, COSTS, (1, 1, 1), memory_column=lambda z: np.zeros(1))
