import itertools
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apreqeld.core.allocation import allocate, rank_order
from apreqeld.core.candidates import (
    count_distributions,
    exact_memory,
    iter_distributions,
    proportional_metrics,
)
from apreqeld.errors import InputError


def enumerate_all(n_sublayers, n_types, chunk_size=262_144):
    return np.concatenate(list(iter_distributions(n_sublayers, n_types, chunk_size=chunk_size)))


@pytest.mark.parametrize(
    ("n_sublayers", "n_types"), [(1, 1), (5, 1), (1, 4), (10, 3), (12, 4), (64, 5)]
)
def test_count_is_binomial_and_rows_are_valid_and_unique(n_sublayers, n_types):
    expected = comb(n_sublayers + n_types - 1, n_types - 1)
    assert count_distributions(n_sublayers, n_types) == expected
    table = enumerate_all(n_sublayers, n_types)
    assert table.shape == (expected, n_types)
    assert np.issubdtype(table.dtype, np.integer)
    assert (table >= 0).all()
    assert (table.sum(axis=1) == n_sublayers).all()
    assert np.unique(table, axis=0).shape[0] == expected


@pytest.mark.parametrize(
    ("n_sublayers", "n_types", "chunk_size"),
    [(3, 2, 1), (10, 3, 7), (12, 4, 13), (7, 6, 5), (6, 7, 3), (9, 5, 11), (12, 4, 10_000)],
)
def test_order_is_lexicographically_descending_whatever_the_chunk_size(
    n_sublayers, n_types, chunk_size
):
    chunks = list(iter_distributions(n_sublayers, n_types, chunk_size=chunk_size))
    assert all(chunk.shape[0] == chunk_size for chunk in chunks[:-1])
    assert 0 < chunks[-1].shape[0] <= chunk_size
    rows = [tuple(row) for row in np.concatenate(chunks).tolist()]
    brute = [c for c in itertools.product(range(n_sublayers + 1), repeat=n_types)]
    assert rows == sorted((c for c in brute if sum(c) == n_sublayers), reverse=True)


def test_first_and_last_rows_are_the_uniform_extremes():
    table = enumerate_all(8, 4)
    assert table[0].tolist() == [8, 0, 0, 0]
    assert table[-1].tolist() == [0, 0, 0, 8]


@pytest.mark.parametrize(("n_sublayers", "n_types"), [(0, 3), (3, 0), (-1, 2), (2.0, 2)])
def test_bad_sizes_are_rejected(n_sublayers, n_types):
    with pytest.raises(InputError, match="must be a positive integer"):
        count_distributions(n_sublayers, n_types)
    with pytest.raises(InputError, match="must be a positive integer"):
        next(iter_distributions(n_sublayers, n_types))


def test_bad_chunk_size_is_rejected():
    with pytest.raises(InputError, match="chunk size must be a positive integer, got 0"):
        next(iter_distributions(3, 2, chunk_size=0))


def test_proportional_metrics_follows_the_paper_formula():
    costs = np.array([[10.0, 1.0], [4.0, 3.0], [2.0, 7.0]])
    z = np.array([[4, 0, 0], [2, 1, 1], [0, 0, 4]])
    x = proportional_metrics(z, costs)
    expected = [
        [sum(z[k, i] / 4 * costs[i, j] for i in range(3)) for j in range(2)] for k in range(3)
    ]
    np.testing.assert_allclose(x, expected)
    np.testing.assert_allclose(x[0], costs[0])
    np.testing.assert_allclose(x[2], costs[2])


def test_proportional_metrics_rejects_mismatched_costs():
    with pytest.raises(InputError, match="cost matrix must have shape"):
        proportional_metrics(np.array([[1, 1]]), np.ones((3, 2)))


def brute_force_memory(z, scores, sizes, outside):
    """Sum each sublayer's size at the type Algorithm 1 gives it."""
    types = allocate(scores, z)
    return outside + sum(sizes[layer, types[layer]] for layer in range(len(scores)))


@settings(max_examples=60, deadline=None)
@given(
    n_sublayers=st.integers(1, 7),
    n_types=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_memory_matches_allocating_each_distribution(n_sublayers, n_types, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, n_sublayers).astype(float)
    sizes = rng.integers(1, 1000, (n_sublayers, n_types))  # by sublayer index
    order = rank_order(scores)
    by_rank = sizes[order]
    table = enumerate_all(n_sublayers, n_types)
    got = exact_memory(table, by_rank, outside_bytes=123)
    expected = [brute_force_memory(z, scores, sizes, 123) for z in table]
    np.testing.assert_array_equal(got, expected)


def test_exact_memory_rejects_wrong_shapes():
    with pytest.raises(InputError, match="bytes_by_rank must have shape"):
        exact_memory(np.array([[1, 1]]), np.ones((2, 3)))
    with pytest.raises(InputError, match="every distribution must sum to L=3"):
        exact_memory(np.array([[1, 1]]), np.ones((3, 2)))
