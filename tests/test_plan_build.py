"""Plans (TOPSIS + Algorithm 1) and builds (one llama.cpp quantization, checked and stamped)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import llama_cpp
import pytest

from apreqeld import workflow
from apreqeld.build import build_gguf, read_embedded_plan
from apreqeld.core.plans import make_plan, plan_id, validate_plan
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import (
    expected_types,
    llama_quantize_recipe,
    tensor_recipe,
    type_mismatches,
)
from apreqeld.errors import InputError, PlanError
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from support import MIXED_WEIGHTS, THREADS, BuiltPlan, CliRunner

# --------------------------------------------------------------------------- recipes (pure)


def test_llama_quantize_recipe_format() -> None:
    text = llama_quantize_recipe({"token_embd.weight": "q8_0", "blk.10.ffn_down.weight": "q4_K",
                                  "blk.2.Attn_Q.weight": "q6_K"})
    assert text == ("^blk\\.10\\.ffn_down\\.weight$=q4_K\n"
                    "^blk\\.2\\.attn_q\\.weight$=q6_K\n"
                    "^token_embd\\.weight$=q8_0\n")
    for line in text.splitlines():
        pattern, _, _type = line.rpartition("=")
        assert len([n for n in ("blk.10.ffn_down.weight", "blk.2.attn_q.weight",
                                "token_embd.weight", "blk.1.ffn_down.weight")
                    if re.search(pattern, n)]) == 1


def test_tensor_recipe_and_expected_types(tiny_model: Path) -> None:
    view = read_model(tiny_model)
    recipe = tensor_recipe(view, [qtype("q4_0"), qtype("q4_K")], outside=qtype("q8_0"))
    assert recipe == {"blk.0.attn_q.weight": "q4_0", "blk.0.ffn_up.weight": "q4_K",
                      "token_embd.weight": "q8_0"}
    # rows of 32 weights: q4_K (256-blocks) does not fit, llama.cpp writes its q5_0 fallback
    assert expected_types(view, recipe) == {
        "blk.0.attn_norm.weight": "f32", "blk.0.attn_q.weight": "q4_0",
        "blk.0.ffn_norm.weight": "f32", "blk.0.ffn_up.weight": "q5_0",
        "token_embd.weight": "q8_0", "output_norm.weight": "f32"}
    with pytest.raises(PlanError, match="^1 types for 2 sublayers$"):
        tensor_recipe(view, [qtype("q4_0")], outside=qtype("q8_0"))
    with pytest.raises(PlanError, match="^the recipe gives no type to token_embd.weight$"):
        expected_types(view, {k: v for k, v in recipe.items() if k != "token_embd.weight"})


def test_type_mismatches_are_readable() -> None:
    planned = {"a.weight": "q4_0", "b.weight": "q8_0"}
    assert type_mismatches(planned, {"a.weight": "Q4_0", "b.weight": "q8_0"}) == []
    assert type_mismatches(planned, {"a.weight": "q5_0", "c.weight": "f32"}) == [
        "a.weight: planned q4_0, file has q5_0", "b.weight: planned q8_0, file has nothing",
        "c.weight: not planned"]


def _plan_stub() -> dict:
    plan = {"kind": "apreqel.plan", "model": {"sha256": "ab" * 32},
            "tensor_types": {"blk.0.attn_q.weight": "q4_0"},
            "expected_types": {"blk.0.attn_q.weight": "q4_0"}, "outside_type": "q8_0"}
    return plan | {"plan_id": plan_id(plan)}


def test_validate_plan_accepts_a_consistent_plan() -> None:
    plan = _plan_stub()
    assert validate_plan(plan) is plan
    assert re.fullmatch(r"[0-9a-f]{12}", plan["plan_id"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda p: p.update(kind="apreqel.device-profile"), r"^not an apreqel plan"),
     (lambda p: p.pop("expected_types"), r"^plan is missing 'expected_types'$"),
     (lambda p: p.update(tensor_types={}), r"^plan has no tensor types$"),
     (lambda p: p["tensor_types"].update({"blk.0.attn_q.weight": "q9_9"}),
      r"^plan gives tensor blk\.0\.attn_q\.weight the unknown type 'q9_9'$"),
     (lambda p: p["tensor_types"].update({"blk.0.attn_q.weight": "q8_0"}),
      r"^plan was edited: its recipe no longer matches its plan_id$"),
     (lambda p: p["model"].update(sha256="cd" * 32), r"^plan was edited")],
)
def test_validate_plan_rejects(edit, message: str) -> None:
    plan = _plan_stub()
    edit(plan)
    with pytest.raises(PlanError, match=message):
        validate_plan(plan)


@pytest.mark.parametrize("data", [[], "plan", None, 3])
def test_validate_plan_rejects_non_objects(data: object) -> None:
    with pytest.raises(PlanError, match=r"^not an apreqel plan \(missing \"kind\""):
        validate_plan(data)


# --------------------------------------------------------------------------- plans (real data)


def _plan(view: ModelView, reference: Reference, profile: dict, layers: dict,
          weights: tuple[float, float, float], **kwargs: str) -> dict:
    return make_plan(view, reference.source_sha256, profile, layers, weights, **kwargs)


@pytest.mark.integration
def test_memory_only_picks_the_smallest_uniform_type(
        source_view: ModelView, reference: Reference, device_profile: dict,
        layer_profile: dict) -> None:
    uniform = device_profile["uniform"]
    smallest = min(device_profile["types"], key=lambda n: uniform[n]["measured"]["memory_bytes"])
    plan = _plan(source_view, reference, device_profile, layer_profile, (1.0, 0.0, 0.0))
    assert set(plan["allocation"].values()) == {smallest}
    assert plan["distribution"][smallest] == 60
    # all sublayers of one type: the exact prediction is the measured uniform model
    assert plan["predicted"]["memory_bytes_exact"] == uniform[smallest]["measured"][
        "memory_bytes"]
    assert plan["predicted"]["ppl"] == pytest.approx(uniform[smallest]["measured"]["ppl"])


@pytest.mark.integration
def test_accuracy_only_picks_the_lowest_perplexity_type(
        source_view: ModelView, reference: Reference, device_profile: dict,
        layer_profile: dict) -> None:
    uniform = device_profile["uniform"]
    ppl = {n: uniform[n]["measured"]["ppl"] for n in device_profile["types"]}
    best = min(ppl, key=ppl.get)
    assert sorted(ppl.values())[0] < sorted(ppl.values())[1]  # unambiguous
    for estimator in ("proportional", "exact"):
        plan = _plan(source_view, reference, device_profile, layer_profile, (0.0, 0.0, 1.0),
                     estimator=estimator)
        assert set(plan["allocation"].values()) == {best}


@pytest.mark.integration
def test_plan_is_complete_and_valid(source_view: ModelView, reference: Reference,
                                    device_profile: dict, layer_profile: dict) -> None:
    plan = _plan(source_view, reference, device_profile, layer_profile, (0.2, 0.6, 0.2))
    assert validate_plan(plan) is plan
    assert list(plan["allocation"]) == [s.name for s in source_view.sublayers]
    assert sum(plan["distribution"].values()) == 60
    assert set(plan["expected_types"]) == {t.name for t in source_view.tensors}
    assert set(plan["tensor_types"]) == {t.name for t in source_view.tensors if t.quantizable}
    assert plan["weights"] == pytest.approx({"memory": 0.2, "latency": 0.6, "accuracy": 0.2})
    assert plan["evidence"]["layer_profile"]["token_range"] == [0, 256]
    assert json.loads(json.dumps(plan)) == plan


@pytest.mark.integration
def test_plan_refuses_profiles_of_another_model(
        source_view: ModelView, reference: Reference, device_profile: dict,
        layer_profile: dict) -> None:
    other = copy.deepcopy(device_profile)
    other["model"]["sha256"] = "0" * 64
    with pytest.raises(PlanError, match=r"^the device profile was measured on another model"):
        _plan(source_view, reference, other, layer_profile, (1.0, 1.0, 1.0))
    with pytest.raises(PlanError, match="^the layer profile was computed on another model$"):
        _plan(source_view, reference, device_profile, layer_profile | {"model_sha256": "0"},
              (1.0, 1.0, 1.0))
    with pytest.raises(PlanError, match="^unknown estimator 'magic'"):
        _plan(source_view, reference, device_profile, layer_profile, (1, 1, 1),
              estimator="magic")


@pytest.mark.integration
def test_mixed_plan_gives_important_sublayers_gentler_types(built_plan: BuiltPlan,
                                                            layer_profile: dict) -> None:
    plan = built_plan.plan
    assert plan["weights"] == pytest.approx(dict(zip(("memory", "latency", "accuracy"),
                                                     MIXED_WEIGHTS, strict=True)))
    used = [t for t, n in plan["distribution"].items() if n]
    assert len(used) >= 2, f"expected a mixed plan, got {plan['distribution']}"
    level = {name: i for i, name in enumerate(plan["types"])}
    ranked = sorted(layer_profile["sublayers"], key=lambda s: s["rank"])
    levels = [level[plan["allocation"][s["name"]]] for s in ranked]
    assert levels == sorted(levels)  # Algorithm 1: by rank, least aggressive first


# --------------------------------------------------------------------------- the built model


@pytest.mark.integration
def test_built_file_has_exactly_the_planned_types(built_plan: BuiltPlan) -> None:
    view = read_model(built_plan.gguf)
    assert view.tensor_types() == built_plan.plan["expected_types"]
    assert len({v for k, v in view.tensor_types().items() if k.startswith("blk.")
                and not k.endswith("norm.weight")}) >= 2
    assert view.parameter_bytes == built_plan.plan["predicted"]["memory_bytes_exact"]


@pytest.mark.integration
def test_built_file_carries_its_plan(built_plan: BuiltPlan) -> None:
    embedded = read_embedded_plan(built_plan.gguf)
    assert embedded == json.loads(json.dumps(built_plan.plan))
    assert embedded["plan_id"] == plan_id(embedded)


@pytest.mark.integration
def test_built_file_generates_text_in_llama_cpp(built_plan: BuiltPlan) -> None:
    llm = llama_cpp.Llama(model_path=str(built_plan.gguf), n_ctx=128, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)
    try:
        out = llm("Once upon a time, there was a", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["text"].strip()
    assert 1 <= out["usage"]["completion_tokens"] <= 8


@pytest.mark.integration
def test_saved_plan_and_recipe_beside_the_gguf(built_plan: BuiltPlan,
                                               source_view: ModelView) -> None:
    saved = workflow.load_plan(built_plan.plan_json)
    assert {k: v for k, v in saved.items() if k != "reproduce"} == json.loads(
        json.dumps(built_plan.plan))
    assert saved["reproduce"].startswith("llama-quantize --allow-requantize --pure "
                                         "--tensor-type-file mixed.tensor-types.txt ")
    lines = built_plan.recipe_txt.read_text().splitlines()
    quantizable = sorted(t.name for t in source_view.tensors if t.quantizable)
    assert len(lines) == len(quantizable) == 211
    by_name = {}
    for line in lines:
        m = re.fullmatch(r"\^(.+)\$=([0-9a-zA-Z_]+)", line)
        assert m, line
        matched = [n for n in quantizable if re.search(f"^{m.group(1)}$", n)]
        assert len(matched) == 1, line
        by_name[matched[0]] = m.group(2)
    assert by_name == built_plan.plan["tensor_types"]


@pytest.mark.integration
def test_replaying_the_saved_plan_is_byte_identical(built_plan: BuiltPlan, run_cli: CliRunner,
                                                    workspace_dir: Path, tmp_path: Path) -> None:
    replay = tmp_path / "replay.gguf"
    log = workspace_dir / "apreqel.log"
    before = log.read_text().splitlines() if log.exists() else []
    result = run_cli("build", "--plan", built_plan.plan_json, "-o", replay,
                     "--threads", str(THREADS))
    assert result.returncode == 0, result.stderr
    assert f"from plan {built_plan.plan['plan_id']}" in result.stdout
    assert replay.read_bytes() == built_plan.gguf.read_bytes()
    assert (tmp_path / "replay.tensor-types.txt").read_text() == built_plan.recipe_txt.read_text()
    assert list(tmp_path.glob("*.part")) == [] and list(tmp_path.glob("*.raw.gguf")) == []
    logged = log.read_text().splitlines()[len(before):]  # the progress, also in a log
    assert logged and all(re.fullmatch(r"\S+ +[\d.]+s +\d+% build: .+", line) for line in logged)


@pytest.mark.integration
def test_build_checks_the_written_types_against_the_plan(
        built_plan: BuiltPlan, reference: Reference, tmp_path: Path) -> None:
    """expected_types is not part of plan_id: a plan that expects what llama.cpp does not write
    passes validation, is quantized, and is then refused tensor by tensor; nothing is left."""
    plan = copy.deepcopy(built_plan.plan)
    name = next(n for n, t in plan["expected_types"].items() if t == "q4_0")
    plan["expected_types"][name] = "q8_0"
    out = tmp_path / "wrong.gguf"
    with pytest.raises(PlanError, match=rf"^the built file does not match the plan: "
                                        rf"{re.escape(name)}: planned q8_0, file has q4_0$"):
        build_gguf(plan, reference.path, out, threads=THREADS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_build_refuses_a_plan_for_another_model(built_plan: BuiltPlan, tiny_model: Path,
                                                workspace: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "other.gguf"
    with pytest.raises(InputError, match=r"^the plan was made for another model"):
        workflow.build(built_plan.plan, out, source=tiny_model, workspace=workspace)
    assert not out.exists()
