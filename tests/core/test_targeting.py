"""The knapsack behind aimed mixes: options per tensor group, feasibility, local optimality
against brute force, and aims that cannot be met."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from apreqeld.core.qtypes import qtype
from apreqeld.core.sensitivity import size_weights, type_figures
from apreqeld.core.targeting import Predictor, aim, allocate, recipe_of, sublayer_options
from apreqeld.gguf.view import ModelView

TYPES = ["q8_0", "q5_0", "q4_0", "q4_K"]
UNIFORM = {"latency_ms": {"q8_0": 7.0, "q5_0": 7.2, "q4_0": 4.5, "q4_K": 6.4},
           "overhead_bytes": {"q8_0": 80e6, "q5_0": 80e6, "q4_0": 80.5e6, "q4_K": 80.5e6},
           "kld": {"q8_0": 0.004, "q5_0": 0.08, "q4_0": 0.28, "q4_K": 0.07}}


def test_k_quants_only_where_every_tensor_of_the_group_takes_them(source_view: ModelView) -> None:
    options = sublayer_options(source_view, TYPES, parts=("ffn_down",))
    ffn = options.choices[1]
    downs = {c["blk.0.ffn_down.weight"] for c in ffn}
    gates = {c["blk.0.ffn_gate.weight"] for c in ffn}
    assert downs == set(TYPES) and gates == {"q8_0", "q5_0", "q4_0"}  # 576-wide rows: no q4_K
    assert len(ffn) == 12 and all(c["blk.0.ffn_up.weight"] == c["blk.0.ffn_gate.weight"]
                                  for c in ffn)
    assert len(options.choices[0]) == 3  # attention: one group, no K-quant


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_allocation_fits_and_no_single_change_improves_it(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s, o = 5, 3
    loss = rng.uniform(0, 1, (s, o))
    costs = [rng.uniform(0, 1, (s, o)), rng.uniform(0, 1, (s, o))]
    budgets = [rng.uniform(1, 4), rng.uniform(1, 4)]
    brute = [p for p in itertools.product(range(o), repeat=s)
             if all(sum(c[i, j] for i, j in enumerate(p)) <= b
                    for c, b in zip(costs, budgets, strict=True))]
    pick = allocate(loss, costs, budgets)
    if pick is None:
        return  # the Lagrangian sweep may miss a narrow feasible set; never a wrong answer
    rows = np.arange(s)
    assert all(c[rows, pick].sum() <= b + 1e-12 for c, b in zip(costs, budgets, strict=True))
    assert tuple(pick) in brute
    best = min(sum(loss[i, j] for i, j in enumerate(p)) for p in brute)
    got = loss[rows, pick].sum()
    for i in range(s):
        for j in range(o):
            q = pick.copy()
            q[i] = j
            if all(c[rows, q].sum() <= b for c, b in zip(costs, budgets, strict=True)):
                assert loss[rows, q].sum() >= got - 1e-12
    assert got <= best + 0.5 * s  # close to the optimum, never below it
    assert got >= best - 1e-12


def test_nothing_fits_gives_none() -> None:
    loss = np.zeros((3, 2))
    assert allocate(loss, [np.ones((3, 2))], [2.0]) is None


def predictor_for(view: ModelView) -> Predictor:
    weights = size_weights(view)
    quantizable = [t for t in view.tensors if t.quantizable]
    return Predictor(
        weights={m: weights for m in UNIFORM},
        figures={m: type_figures(view, u, weights) for m, u in UNIFORM.items()},
        bytes_of={t.name: {n: t.bytes_as(qtype(n)) for n in TYPES} for t in quantizable},
        fixed_bytes=sum(t.n_bytes for t in view.tensors if not t.quantizable))


def test_an_aimed_recipe_beats_its_target_as_predicted(source_view: ModelView) -> None:
    pred = predictor_for(source_view)
    options = sublayer_options(source_view, TYPES, parts=("ffn_down",))
    outside = {t.name: "q8_0" for t in source_view.outside if t.quantizable}
    target = pred.predict({t: "q5_0" for t in pred.bytes_of} | outside)
    margins = {"footprint_bytes": 0.0, "latency_ms": 0.05, "kld": 0.02}
    recipe = aim(pred, options, target, outside, minimize="kld", margins=margins)
    assert recipe is not None
    got = pred.predict(recipe)
    assert got["footprint_bytes"] <= target["footprint_bytes"]
    assert got["latency_ms"] <= 0.95 * target["latency_ms"]
    assert got["kld"] <= 0.98 * target["kld"]
    assert recipe_of(options, [0] * len(options.choices)).keys() <= recipe.keys()


def test_an_aim_below_the_fastest_type_is_none(source_view: ModelView) -> None:
    pred = predictor_for(source_view)
    options = sublayer_options(source_view, TYPES, parts=("ffn_down",))
    outside = {t.name: "q8_0" for t in source_view.outside if t.quantizable}
    target = pred.predict({t: "q4_0" for t in pred.bytes_of} | outside)
    assert aim(pred, options, target, outside, minimize="kld",
               margins={"footprint_bytes": 0.0, "latency_ms": 0.05, "kld": 0.0}) is None
