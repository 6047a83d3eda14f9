"""The additive predictor of a plan set (core.targeting.Predictor) from the evidence its
manifest records (`protocol.planning.aim`): uniform types, footprints, sublayer sensitivity
and the calibration the aiming loop fitted. Pure: a model shape and plain data in.
"""

from __future__ import annotations

from collections.abc import Mapping

from apreqeld.core.calibration import scaled_weights
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import ModelShape, expected_types
from apreqeld.core.sensitivity import (
    sensitivity_weights,
    size_weights,
    tensor_part,
    type_figures,
)
from apreqeld.core.targeting import Predictor


def predictor(view: ModelShape, evidence: Mapping, /) -> Predictor:
    """The additive predictor from the evidence: accuracy weighted by sensitivity, latency and
    the footprint's overhead by size; parameter bytes exact."""
    uniform, footprint = evidence["uniform"], evidence["footprint"]
    by_size = size_weights(view)
    by_sensitivity = sensitivity_weights(view, evidence["sensitivity"]["added_kld"],
                                         evidence["sensitivity"].get("part_added_kld"))
    columns = {
        "latency_ms": ({n: m["latency_ms"] for n, m in uniform.items()}, by_size),
        "overhead_bytes": ({n: footprint[n]["footprint_bytes"] - uniform[n]["memory_bytes"]
                            for n in uniform}, by_size),
        "kld": ({n: m["kld"] for n, m in uniform.items()}, by_sensitivity),
        "ppl": ({n: m["ppl"] for n, m in uniform.items()}, by_sensitivity),
    }
    quantizable = [t for t in view.tensors if t.quantizable]
    return Predictor(
        weights={k: w for k, (_, w) in columns.items()},
        figures={k: type_figures(view, u, w) for k, (u, w) in columns.items()},
        bytes_of={t.name: {n: t.bytes_as(qtype(n)) for n in uniform} for t in quantizable},
        fixed_bytes=sum(t.n_bytes for t in view.tensors if not t.quantizable))


def outside_recipe(view: ModelShape, outside: str, /) -> dict[str, str]:
    """The outside tensors (token embedding, output) at `outside`, as in every aimed mix."""
    return {t.name: qtype(outside).name for t in view.outside if t.quantizable}


def written(view: ModelShape, recipe: Mapping[str, str], /) -> dict[str, str]:
    """The recipe's tensors at the types llama.cpp writes (the predictor's figures are of
    written types)."""
    got = expected_types(view, recipe)
    return {t: got[t] for t in recipe}


def predictable(predictor_: Predictor, recipe: Mapping[str, str], /) -> bool:
    """Whether the predictor has a figure for every type the recipe gives a tensor (a member
    with a type no uniform model measured is left out of the fit)."""
    return (all(recipe.get(t) in predictor_.bytes_of.get(t, {}) for t in predictor_.bytes_of)
            and all(recipe.get(t) in f for m, f in predictor_.figures.items()
                    for t in predictor_.weights[m]))


def tensor_parts(view: ModelShape, /) -> dict[str, str]:
    """Sublayer tensor -> its part (attn_v, ffn_down, ...)."""
    return {t.name: tensor_part(t.name) or "" for s in view.sublayers for t in s.tensors
            if t.quantizable}


def predictor_from_record(view: ModelShape, record: Mapping, /) -> Predictor:
    """The aiming predictor from a manifest's `protocol.planning.aim`: the prior from its
    evidence, then, where it has one, its calibration's figures and part factors."""
    prior = predictor(view, record)
    cal = record.get("calibration")
    if not cal:
        return prior
    parts = tensor_parts(view)
    weights = {m: scaled_weights(w, parts, cal["part_scale"][m]) if m in cal["part_scale"]
               else dict(w) for m, w in prior.weights.items()}
    return Predictor(weights=weights, figures={m: dict(f) for m, f in cal["figures"].items()},
                     bytes_of=prior.bytes_of, fixed_bytes=prior.fixed_bytes)
