"""Per-tensor predictions of a recipe against the paper's per-sublayer formula and exact bytes."""

from __future__ import annotations

import numpy as np
import pytest

from apreqeld.core.candidates import proportional_metrics
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import recipe_prediction, tensor_recipe
from apreqeld.gguf.view import ModelView

UNIFORM = {"q8_0": {"memory_bytes": 9.0, "latency_ms": 8.0, "kld": 0.004, "ppl": 22.5},
           "q5_0": {"memory_bytes": 7.0, "latency_ms": 7.0, "kld": 0.08, "ppl": 23.3},
           "q4_0": {"memory_bytes": 6.0, "latency_ms": 5.0, "kld": 0.28, "ppl": 26.7}}


def test_one_type_per_sublayer_is_the_papers_formula(source_view: ModelView) -> None:
    ladder = ["q8_0", "q5_0", "q4_0"]
    rng = np.random.default_rng(3)
    types = [ladder[i] for i in rng.integers(0, 3, len(source_view.sublayers))]
    recipe = tensor_recipe(source_view, [qtype(t) for t in types], outside=qtype("q8_0"))
    got = recipe_prediction(source_view, recipe, UNIFORM)
    counts = np.array([[types.count(t) for t in ladder]])
    costs = np.array([[UNIFORM[t][k] for k in ("latency_ms", "kld", "ppl")] for t in ladder])
    expected = proportional_metrics(counts, costs)[0]
    assert [got["latency_ms"], got["kld"], got["ppl"]] == pytest.approx(expected.tolist())
    exact = sum(t.bytes_as(qtype(recipe[t.name])) if t.quantizable else t.n_bytes
                for t in source_view.tensors)
    assert got["memory_bytes"] == exact


def test_a_gentler_tensor_moves_the_prediction_by_its_share(source_view: ModelView) -> None:
    recipe = tensor_recipe(source_view, [qtype("q4_0")] * len(source_view.sublayers),
                           outside=qtype("q8_0"))
    base = recipe_prediction(source_view, recipe, UNIFORM)
    name = next(t.name for t in source_view.sublayers[0].tensors if "attn_v" in t.name)
    moved = recipe_prediction(source_view, recipe | {name: "q5_0"}, UNIFORM)
    s = source_view.sublayers[0]
    share = next(t.n_elements for t in s.tensors if t.name == name) / sum(
        t.n_elements for t in s.tensors if t.quantizable)
    step = UNIFORM["q5_0"]["kld"] - UNIFORM["q4_0"]["kld"]
    expected = share / len(source_view.sublayers) * step
    assert moved["kld"] - base["kld"] == pytest.approx(expected)
    assert moved["memory_bytes"] > base["memory_bytes"]
