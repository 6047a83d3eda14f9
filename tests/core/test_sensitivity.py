"""The additive model: per-type figures reproduce every uniform model, fallbacks included, and
a recipe's prediction is the weighted sum a plain loop computes."""

from __future__ import annotations

import numpy as np
import pytest

from apreqeld.core.sensitivity import (
    part_probe_recipe,
    parts,
    predict,
    probe_recipe,
    sensitivity_weights,
    size_weights,
    type_figures,
)
from apreqeld.errors import PlanError
from apreqeld.gguf.view import ModelView
from support import written_uniform

UNIFORM_KLD = {"q8_0": 0.004, "q5_0": 0.08, "q4_0": 0.28, "q4_K": 0.07, "q3_K": 0.41}


def sensitivities(view: ModelView) -> list[float]:
    return list(np.random.default_rng(7).uniform(0.001, 0.04, len(view.sublayers)))


def test_figures_reproduce_every_uniform_model_with_fallbacks(source_view: ModelView) -> None:
    weights = sensitivity_weights(source_view, sensitivities(source_view),
                                  {"attn_v": 0.08, "ffn_down": 0.1, "attn_q": 0.015})
    figures = type_figures(source_view, UNIFORM_KLD, weights)
    for name, value in UNIFORM_KLD.items():
        assert predict(written_uniform(source_view, name), figures, weights) == pytest.approx(value)
    # q4_K is written only on ffn_down (rows of 1536), q5_0 elsewhere: its figure is what the
    # ffn_down tensors must carry for the uniform model to come out as measured
    down = sum(w for t, w in weights.items() if ".ffn_down." in t)
    assert figures["q4_K"] == pytest.approx(
        (UNIFORM_KLD["q4_K"] - (1 - down) * UNIFORM_KLD["q5_0"]) / down)


def test_prediction_is_the_weighted_sum_over_tensors(source_view: ModelView) -> None:
    added = sensitivities(source_view)
    weights = sensitivity_weights(source_view, added)
    assert sum(weights.values()) == pytest.approx(1.0)
    figures = type_figures(source_view, UNIFORM_KLD, weights)
    rng = np.random.default_rng(1)
    recipe = {t: ["q8_0", "q5_0", "q4_0"][rng.integers(3)] for t in weights}
    # independently: per sublayer, its sensitivity share times the size-weighted mean figure
    total = sum(max(a, 0) for a in added)
    expected = 0.0
    for s, a in zip(source_view.sublayers, added, strict=True):
        ts = [t for t in s.tensors if t.quantizable]
        n = sum(t.n_elements for t in ts)
        expected += a / total * sum(t.n_elements / n * figures[recipe[t.name]] for t in ts)
    assert predict(recipe, figures, weights) == pytest.approx(expected)


def test_part_sensitivity_splits_a_sublayer_by_part(source_view: ModelView) -> None:
    added = [1.0] * len(source_view.sublayers)
    by_part = {p: 1.0 for p in parts(source_view)} | {"attn_v": 9.0}
    weights = sensitivity_weights(source_view, added, by_part)
    attn = [t.name for t in source_view.sublayers[0].tensors if t.quantizable]
    v = next(n for n in attn if ".attn_v." in n)
    assert weights[v] == pytest.approx(9 * weights[next(n for n in attn if ".attn_q." in n)])
    assert sum(weights[n] for n in attn) == pytest.approx(1 / len(source_view.sublayers))


def test_size_weights_are_each_tensors_share(source_view: ModelView) -> None:
    weights = size_weights(source_view)
    t = source_view.sublayers[1].tensors[0]
    total = sum(x.n_elements for s in source_view.sublayers for x in s.tensors if x.quantizable)
    assert weights[t.name] == pytest.approx(t.n_elements / total)


def test_probes_quantize_one_sublayer_or_one_part(source_view: ModelView) -> None:
    one = probe_recipe(source_view, 3, base="q8_0", probe="q4_0", outside="q8_0")
    changed = {n for n, q in one.items() if q == "q4_0"}
    assert changed == {t.name for t in source_view.sublayers[3].tensors if t.quantizable}
    part = part_probe_recipe(source_view, "ffn_down", base="q8_0", probe="q4_0", outside="q8_0")
    assert {n for n, q in part.items() if q == "q4_0"} == {
        n for n in part if n.startswith("blk.") and ".ffn_down." in n}
    assert part["token_embd.weight"] == "q8_0"


def test_no_sensitivity_at_all_is_an_error(source_view: ModelView) -> None:
    with pytest.raises(PlanError, match="sensitivity is undefined"):
        sensitivity_weights(source_view, [0.0] * len(source_view.sublayers))
    with pytest.raises(PlanError, match="3 sensitivities for 60 sublayers"):
        sensitivity_weights(source_view, [0.1] * 3)
