"""Ranking under limits against an independent TOPSIS (pymcdm) over the feasible candidates."""

from __future__ import annotations

import numpy as np
import pytest
from pymcdm.methods import TOPSIS
from pymcdm.normalizations import vector_normalization

from apreqeld.core.candidates import iter_distributions, proportional_metrics
from apreqeld.core.limits import build_limits, parse_size
from apreqeld.core.topsis import rank_distributions
from apreqeld.errors import InputError


def _all_distributions(n_sublayers: int, n_types: int) -> np.ndarray:
    return np.vstack(list(iter_distributions(n_sublayers, n_types)))


@pytest.mark.filterwarnings("ignore:Alternatives with indices:UserWarning")
@pytest.mark.parametrize("seed", range(8))
def test_feasible_winner_is_pymcdm_best_of_the_feasible_set(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_sublayers, n_types = 6, 4
    costs = np.sort(rng.uniform(1, 10, (n_types, 3)), axis=0)[::-1]  # gentler types cost more
    weights = rng.dirichlet(np.ones(3))
    z_all = _all_distributions(n_sublayers, n_types)
    metrics = proportional_metrics(z_all, costs)
    bound = float(np.quantile(metrics[:, 0], 0.4))  # a memory limit that cuts 60 %
    limits = build_limits(max_size=str(bound))
    ok = metrics[:, 0] <= limits["memory_bytes"]

    ranking = rank_distributions(
        n_sublayers, costs, weights,
        feasible=lambda z: proportional_metrics(z, costs)[:, 0] <= limits["memory_bytes"])

    feasible = metrics[ok]
    scores = TOPSIS(normalization_function=vector_normalization)(
        feasible, weights, -np.ones(3))
    winner = np.flatnonzero((z_all[ok] == np.array(ranking.distribution)).all(axis=1))
    assert ranking.n_feasible == int(ok.sum())
    assert winner.size == 1, "the winner must be one of the feasible distributions"
    assert scores[winner[0]] == pytest.approx(scores.max(), abs=1e-9)
    assert ranking.score == pytest.approx(scores.max(), abs=1e-9)


def test_unreachable_limit_is_refused() -> None:
    costs = np.array([[8.0, 3.0, 1.0], [4.0, 2.0, 2.0]])
    with pytest.raises(InputError, match="no distribution of the types meets the given limits"):
        rank_distributions(3, costs, (1, 1, 1), feasible=lambda z: np.zeros(len(z), bool))


@pytest.mark.parametrize(("text", "expected"), [
    ("90MiB", 90 * 2**20), ("0.5GB", 5e8), ("123456", 123456.0), ("1.5 GiB", 1.5 * 2**30)])
def test_sizes(text: str, expected: float) -> None:
    assert parse_size(text) == pytest.approx(expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_size": "ninety"}, "size 'ninety' is not a size"),
    ({"max_size": "0MiB"}, "must be positive"),
    ({"max_latency": -1.0}, "--max-latency must be a positive number"),
    ({"max_kld": float("nan")}, "--max-kld must be a positive number"),
])
def test_bad_limits_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_limits(**kwargs)
