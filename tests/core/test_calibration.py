"""The predictor's recalibration: a hand computation, an independent solve of the same least
squares on the checked-in plan set's recorded measurements, the part factors recovering a
known truth, and the law that the fit never mispredicts its observations more than the prior."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apreqeld.core.calibration import (
    RIDGE,
    Observation,
    design,
    recalibrate,
    ridge_fit,
    scaled_weights,
)
from apreqeld.core.targeting import Predictor
from apreqeld.errors import PlanError

PLANSET = Path(__file__).resolve().parents[2] / "plans" / "smollm2-135m" / "planset.json"


def two_tensor_prior(f_a: float = 1.0, f_b: float = 2.0) -> Predictor:
    return Predictor(weights={"latency_ms": {"t1": 0.25, "t2": 0.75}},
                     figures={"latency_ms": {"a": f_a, "b": f_b}},
                     bytes_of={"t1": {"a": 1, "b": 2}, "t2": {"a": 3, "b": 6}}, fixed_bytes=0)


def test_figures_fit_as_computed_by_hand() -> None:
    # uniform a measured 1.0, uniform b 2.0, the mix (t1 a, t2 b) 1.9; no ridge. Relative
    # residuals r1 = f_a - 1, r2 = f_b / 2 - 1, r3 = (0.25 f_a + 0.75 f_b) / 1.9 - 1; the normal
    # equations of sum r^2, with c = 1 / 1.9:
    #   f_a (1 + (0.25c)^2) + f_b (0.25c)(0.75c) = 1 + 0.25c * 1
    #   f_a (0.25c)(0.75c) + f_b (1/4 + (0.75c)^2) = 1/2 + 0.75c * 1
    c = 1 / 1.9
    a11, a12, a22 = 1 + (0.25 * c) ** 2, 0.25 * c * 0.75 * c, 0.25 + (0.75 * c) ** 2
    b1, b2 = 1 + 0.25 * c, 0.5 + 0.75 * c
    det = a11 * a22 - a12 * a12
    f_a, f_b = (b1 * a22 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    obs = [Observation({"t1": "a", "t2": "a"}, {"latency_ms": 1.0}),
           Observation({"t1": "b", "t2": "b"}, {"latency_ms": 2.0}),
           Observation({"t1": "a", "t2": "b"}, {"latency_ms": 1.9})]
    got = recalibrate(two_tensor_prior(), obs, ridge=0.0)
    assert got.figures["latency_ms"] == pytest.approx({"a": f_a, "b": f_b}, rel=1e-12)
    assert f_b > 2.0 and f_a > 1.0  # the mix came out slower than its prior 1.75: both move
    middle = sorted([abs(f_a - 1), abs(f_b / 2 - 1), abs((0.25 * f_a + 0.75 * f_b) / 1.9 - 1)])[1]
    # the median |relative error|: the prior fitted two of three exactly
    assert got.residual["latency_ms"] == {"before": 0.0, "after": pytest.approx(middle, abs=1e-6)}
    assert got.predictor.predict({"t1": "a", "t2": "b"})["latency_ms"] == pytest.approx(
        0.25 * f_a + 0.75 * f_b)
    assert got.predictor.predict({"t1": "a", "t2": "b"})["memory_bytes"] == 7.0


def test_the_ridge_pulls_towards_the_prior() -> None:
    obs = [Observation({"t1": "a", "t2": "a"}, {"latency_ms": 1.5})]
    free = recalibrate(two_tensor_prior(), obs, ridge=1e-9).figures["latency_ms"]
    held = recalibrate(two_tensor_prior(), obs, ridge=1e3).figures["latency_ms"]
    assert free["a"] == pytest.approx(1.5, rel=1e-6)
    assert held["a"] == pytest.approx(1.0, abs=1e-3) and held["b"] == pytest.approx(2.0)


def recorded() -> tuple[Predictor, list[Observation]]:
    """The checked-in plan set's members whose recipes use only its five uniform types, as
    (prior by size from the uniform members' latency, observations of their latency)."""
    data = json.loads(PLANSET.read_text())
    uniform = {m["label"]: m for m in data["members"] if m["kind"] == "uniform"}
    types = set(uniform)
    members = [m for m in data["members"] if set(m["recipe"].values()) <= types]
    blocks = sorted({t for m in members for t in m["recipe"] if t.startswith("blk.")})
    weights = {t: 1 / len(blocks) for t in blocks}  # any fixed weights will do for the check
    figures = {n: m["measured"]["latency"]["median_ms"] for n, m in uniform.items()}
    prior = Predictor(weights={"latency_ms": weights}, figures={"latency_ms": figures},
                      bytes_of={}, fixed_bytes=0)
    obs = [Observation(m["recipe"], {"latency_ms": m["measured"]["latency"]["median_ms"]})
           for m in members]
    return prior, obs


def test_recorded_measurements_fit_as_an_independent_solve_finds() -> None:
    prior, obs = recorded()
    assert len(obs) > 20
    types = sorted(prior.figures["latency_ms"])
    f0 = [prior.figures["latency_ms"][q] for q in types]
    # independently: the normal equations (A' W A + ridge S^-2) f = A' W y + ridge S^-2 f0,
    # W = diag(1 / y^2), built with plain loops
    n = len(types)
    lhs = [[0.0] * n for _ in range(n)]
    rhs = [0.0] * n
    for o in obs:
        y = o.measured["latency_ms"]
        row = [sum(w for t, w in prior.weights["latency_ms"].items() if o.recipe[t] == q)
               for q in types]
        for i in range(n):
            rhs[i] += row[i] * y / y**2
            for j in range(n):
                lhs[i][j] += row[i] * row[j] / y**2
    for i in range(n):
        s = max(abs(f0[i]), 1e-3 * max(abs(x) for x in f0))
        lhs[i][i] += RIDGE / s**2
        rhs[i] += RIDGE * f0[i] / s**2
    want = np.linalg.solve(np.array(lhs), np.array(rhs))
    got = recalibrate(prior, obs)
    assert [got.figures["latency_ms"][q] for q in types] == pytest.approx(list(want), rel=1e-9)


def part_view() -> tuple[dict[str, float], dict[str, str]]:
    """Four tensors over two blocks, parts down and up, equal prior weights."""
    w = {f"blk.{b}.ffn_{p}.weight": 0.25 for b in (0, 1) for p in ("down", "up")}
    return w, {t: t.split(".")[2] for t in w}


def test_part_factors_recover_a_part_twice_as_sensitive() -> None:
    w, parts = part_view()
    figures = {"q8_0": 0.004, "q5_0": 0.08, "q4_0": 0.28}
    truth = scaled_weights(w, parts, {"ffn_down": 2.0})
    rng = np.random.default_rng(3)
    obs = []
    for _ in range(30):
        recipe = {t: ["q8_0", "q5_0", "q4_0"][rng.integers(3)] for t in w}
        obs.append(Observation(recipe, {"kld": sum(truth[t] * figures[recipe[t]] for t in w)}))
    obs += [Observation(dict.fromkeys(w, q), {"kld": f}) for q, f in figures.items()]
    prior = Predictor(weights={"kld": w}, figures={"kld": figures}, bytes_of={}, fixed_bytes=0)
    got = recalibrate(prior, obs, parts=parts, scale_parts=("kld",), ridge=1e-6, rounds=8)
    factor = got.part_scale["kld"]
    assert factor["ffn_down"] / factor["ffn_up"] == pytest.approx(2.0, rel=0.02)
    assert got.residual["kld"]["after"] < 0.01 < got.residual["kld"]["before"]
    assert sum(got.predictor.weights["kld"].values()) == pytest.approx(1.0)
    assert got.predictor.weights["kld"] == pytest.approx(
        scaled_weights(w, parts, factor))  # the record rebuilds the weights


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-4, 10.0))
def test_the_fit_never_mispredicts_its_observations_more_than_the_prior(seed: int,
                                                                       ridge: float) -> None:
    rng = np.random.default_rng(seed)
    types = ["a", "b", "c"]
    w = dict(zip(["t1", "t2", "t3", "t4"], rng.dirichlet(np.ones(4)), strict=True))
    prior = Predictor(weights={"m": w}, figures={"m": dict(zip(types, rng.uniform(0.5, 5, 3),
                                                             strict=True))},
                      bytes_of={}, fixed_bytes=0)
    obs = [Observation({t: types[rng.integers(3)] for t in w}, {"m": float(rng.uniform(0.5, 5))})
           for _ in range(int(rng.integers(1, 8)))]
    got = recalibrate(prior, obs, ridge=ridge)

    def sq(p: Predictor) -> float:
        return sum((p.predict(o.recipe)["m"] / o.measured["m"] - 1) ** 2 for o in obs)

    assert sq(got.predictor) <= sq(prior) + 1e-9


def test_bad_observations_are_refused() -> None:
    with pytest.raises(PlanError, match="zero or not finite"):
        ridge_fit(np.ones((1, 1)), np.zeros(1), np.ones(1))
    with pytest.raises(PlanError, match="no figure for q9_9"):
        design([{"t1": "q9_9"}], {"t1": 1.0}, ["a"])
