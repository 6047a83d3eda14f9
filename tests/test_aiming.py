"""Aimed mixes on the real default model: the evidence (uniform types, footprints, one probe
per sublayer and per part), the predictor against what llama.cpp really measures, and the
candidates a plan set gets from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from apreqeld import engine
from apreqeld import planset as P
from apreqeld.aiming import aiming_evidence, predictor
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import recipe_prediction, tensor_recipe
from apreqeld.core.sensitivity import parts
from apreqeld.evidence.measurement import score_file
from apreqeld.evidence.reference import Reference, ensure_reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from support import PROTOCOL, written_uniform

TYPES = ("q8_0", "q5_0", "q4_0", "q4_K")  # q4_K falls back to q5_0 on 576-wide rows


@pytest.fixture(scope="module")
def own_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Apart from the session's: the uniform models kept here must not be there for the
    tests that count what measure_types builds."""
    return Workspace(tmp_path_factory.mktemp("aiming-work"))


@pytest.fixture(scope="module")
def own_reference(source_model: Path, own_workspace: Workspace) -> Reference:
    return ensure_reference(source_model, workspace=own_workspace, protocol=PROTOCOL)


@pytest.fixture(scope="module")
def evidence(source_model: Path, source_view: ModelView, own_reference: Reference,
             own_workspace: Workspace) -> dict:
    return aiming_evidence(source_model, source_view, own_reference, outside="q8_0",
                           protocol=PROTOCOL, workspace=own_workspace, serving_ctx=256,
                           types=TYPES)


def test_evidence_has_every_type_and_probe(evidence: dict, source_view: ModelView) -> None:
    assert set(evidence["uniform"]) == set(TYPES) == set(evidence["footprint"])
    sens = evidence["sensitivity"]
    assert len(sens["added_kld"]) == len(source_view.sublayers)
    assert set(sens["part_added_kld"]) == set(parts(source_view))
    # one sublayer at a time adds up to about the whole model at the probe type (additivity)
    whole = evidence["uniform"]["q4_0"]["kld"] - sens["base_kld"]
    assert sum(sens["added_kld"]) == pytest.approx(whole, rel=0.4)
    assert sens["part_added_kld"]["ffn_down"] > sens["part_added_kld"]["attn_k"]


def test_predictor_reproduces_uniform_models_and_predicts_a_mix(
        evidence: dict, source_view: ModelView, own_reference: Reference, tmp_path: Path) -> None:
    reference = own_reference
    pred = predictor(source_view, evidence)
    for name in TYPES:
        got = pred.predict(written_uniform(source_view, name))
        assert got["kld"] == pytest.approx(evidence["uniform"][name]["kld"])
        assert got["latency_ms"] == pytest.approx(evidence["uniform"][name]["latency_ms"])
        assert got["memory_bytes"] == evidence["uniform"][name]["memory_bytes"]
    # a mix the predictor never saw, built and scored by llama.cpp
    half = len(source_view.sublayers) // 2
    recipe = tensor_recipe(source_view, [qtype("q4_0")] * half + [qtype("q8_0")] * half,
                           outside=qtype("q8_0"))
    recipe |= {t: "q4_K" for t in recipe if ".ffn_down." in t and t.startswith("blk.1.")}
    out = tmp_path / "mix.gguf"
    engine.quantize(reference.path, out, tensor_types=recipe, base="q8_0", threads=1)
    assert read_model(out).tensor_types()["blk.1.ffn_down.weight"] == "q4_K"
    measured = score_file(out, protocol=PROTOCOL, reference=reference)["kld"]
    predicted = pred.predict(recipe)["kld"]
    assert predicted == pytest.approx(measured, rel=0.3)
    uniform = {n: {k: float(evidence["uniform"][n][k]) for k in ("memory_bytes", "kld")}
               for n in TYPES}
    proportional = recipe_prediction(source_view, recipe, uniform)["kld"]
    assert abs(predicted / measured - 1) < abs(proportional / measured - 1)


def test_aimed_candidates_beat_their_target_as_predicted(evidence: dict,
                                                         source_view: ModelView) -> None:
    pred = predictor(source_view, evidence)
    target = written_uniform(source_view, "q5_0")
    cands = P.add_aimed([], source_view, "0" * 64, pred, {"Q5_0": target}, outside="q8_0",
                        accuracy="kld")
    assert cands and all(c.label.startswith("aimed at Q5_0: ") for c in cands)
    goal = pred.predict(target)
    for c in cands:
        assert c.kind == "mix" and c.predicted == pred.predict(c.recipe)
        assert c.predicted["footprint_bytes"] <= goal["footprint_bytes"]
        assert c.predicted["latency_ms"] < goal["latency_ms"]
        assert c.predicted["kld"] < goal["kld"]
