"""Plans: from measurements, contribution scores and user weights to a per-tensor recipe.

A plan is plain JSON data (weights, types, distribution, allocation, recipe, predictions and
the evidence it used), so it can be saved, diffed and replayed with `apreqel build --plan`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from apreqeld import __version__
from apreqeld.core.allocation import allocate, rank_order
from apreqeld.core.candidates import exact_memory, proportional_metrics
from apreqeld.core.disturbance import DISTURBED, disturbed_text, profile_latency_evidence
from apreqeld.core.metrics import ACCURACY_METRICS, LATENCY, MEMORY, METRICS
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import ModelShape, expected_types, llama_quantize_recipe, tensor_recipe
from apreqeld.core.topsis import rank_distributions
from apreqeld.errors import PlanError

ESTIMATORS = ("proportional", "exact")
PREDICTED = METRICS
DISTURBED_POLICIES = ("refuse", "flag")


def cost_matrix(device_profile: Mapping, /, *, columns: Sequence[str]) -> np.ndarray:
    """(M, J) matrix of the uniform measurements, types in the profile's order."""
    rows = []
    for name in device_profile["types"]:
        measured = device_profile["uniform"][name]["measured"]
        row = [float(measured[c]) for c in columns]
        if not np.all(np.isfinite(row)):
            raise PlanError(f"device profile has no finite {columns} for type {name}")
        rows.append(row)
    return np.asarray(rows)


def _check_same_model(device_profile: Mapping, layer_profile: Mapping, sha256: str) -> None:
    if device_profile["model"]["sha256"] != sha256:
        raise PlanError("the device profile was measured on another model "
                        f"(sha256 {device_profile['model']['sha256'][:12]}…, this model "
                        f"{sha256[:12]}…)")
    if layer_profile.get("model_sha256", sha256) != sha256:
        raise PlanError("the layer profile was computed on another model")


def check_choices(*, estimator: str, accuracy: str, limits: Mapping[str, float]) -> None:
    """Refuse an unknown estimator, accuracy metric or limit (before any work is done)."""
    if estimator not in ESTIMATORS:
        raise PlanError(f"unknown estimator '{estimator}' (choose {', '.join(ESTIMATORS)})")
    if accuracy not in ACCURACY_METRICS:
        raise PlanError(f"unknown accuracy metric '{accuracy}' "
                        f"(choose {', '.join(ACCURACY_METRICS)})")
    unknown = set(limits) - set(PREDICTED)
    if unknown:
        raise PlanError(f"unknown limit '{sorted(unknown)[0]}' (choose {', '.join(PREDICTED)})")


def make_plan(view: ModelShape, sha256: str, device_profile: Mapping, layer_profile: Mapping,
              weights: Sequence[float], /, *, estimator: str = "proportional",
              accuracy: str = "ppl", limits: Mapping[str, float] | None = None,
              disturbed: str = "flag") -> dict:
    """Rank every distribution by TOPSIS, allocate by contribution (Algorithm 1), and return
    the plan with its recipe and predicted metrics.

    `limits` (upper bounds on memory_bytes, latency_ms, ppl, kld) restrict the candidates
    before ranking; memory is bounded with the exact estimate, the rest proportionally.
    The plan records its latency evidence and quality; `disturbed="refuse"` refuses disturbed
    latency where it steers the plan (a latency weight or limit)."""
    limits = dict(limits or {})
    check_choices(estimator=estimator, accuracy=accuracy, limits=limits)
    _check_same_model(device_profile, layer_profile, sha256)
    latency = latency_evidence(device_profile, weights, limits, disturbed=disturbed)
    types = [qtype(n) for n in device_profile["types"]]
    outside = qtype(device_profile["policy"]["outside_type"])
    sublayers = {s["name"]: s for s in layer_profile["sublayers"]}
    names = [s.name for s in view.sublayers]
    if set(sublayers) != set(names):
        raise PlanError("the layer profile's sublayers do not match the model's")
    scores = np.array([sublayers[n]["score"] for n in names], dtype=np.float64)
    cosines = np.array([sublayers[n]["mean_cosine"] for n in names], dtype=np.float64)
    order = rank_order(scores, tiebreak=cosines)
    bytes_by_rank = np.array([[view.sublayers[i].bytes_as(q) for q in types] for i in order])
    outside_bytes = sum(t.bytes_as(outside) if t.quantizable else t.n_bytes
                        for t in view.outside)

    def exact(z: np.ndarray) -> np.ndarray:
        return exact_memory(z, bytes_by_rank, outside_bytes=outside_bytes)

    all_costs = cost_matrix(device_profile, columns=PREDICTED)

    def feasible(z: np.ndarray) -> np.ndarray:
        x = proportional_metrics(z, all_costs)
        ok = np.ones(z.shape[0], dtype=bool)
        for j, name in enumerate(PREDICTED):
            if name in limits:
                values = exact(z) if name == "memory_bytes" else x[:, j]
                ok &= values <= limits[name]
        return ok

    if limits:
        _check_reachable(limits, all_costs, exact(np.eye(len(types), dtype=np.int64) *
                                                  len(names)))
    criteria = (MEMORY, LATENCY, accuracy)
    ranking = rank_distributions(len(names), cost_matrix(device_profile, columns=criteria),
                                 weights, memory_column=exact if estimator == "exact" else None,
                                 feasible=feasible if limits else None)
    z = np.array([ranking.distribution])
    predicted = dict(zip(PREDICTED, proportional_metrics(z, all_costs)[0].tolist(),
                         strict=True))
    predicted["memory_bytes_exact"] = float(exact(z)[0])
    assignment = allocate(scores, ranking.distribution, tiebreak=cosines)
    sublayer_types = [types[i] for i in assignment]
    recipe = tensor_recipe(view, sublayer_types, outside=outside)
    plan = {
        "kind": "apreqel.plan",
        "format": 1,
        "apreqel": __version__,
        "model": {"name": view.name, "sha256": sha256, "architecture": view.architecture,
                  "n_sublayers": len(names)},
        "reference": "f16",
        "weights": dict(zip(("memory", "latency", "accuracy"), map(float, weights),
                            strict=True)),
        "criteria": list(criteria),
        "estimator": estimator,
        "types": [q.name for q in types],
        "outside_type": outside.name,
        "distribution": dict(zip([q.name for q in types], ranking.distribution, strict=True)),
        "candidates": ranking.n_candidates,
        "limits": limits,
        "feasible_candidates": ranking.n_feasible,
        "topsis_score": ranking.score,
        "allocation": {n: q.name for n, q in zip(names, sublayer_types, strict=True)},
        "predicted": predicted,
        "bits_per_weight": 8.0 * predicted["memory_bytes_exact"] / view.n_parameters,
        "tensor_types": recipe,
        "expected_types": expected_types(view, recipe),
        "evidence": {
            "device_profile": {k: device_profile[k] for k in ("device", "protocol", "created")},
            "device_profile_sha256": canonical_sha256(device_profile),
            "layer_profile": {k: layer_profile[k] for k in ("text", "token_range", "gamma")},
            "latency": latency,
        },
    }
    plan["plan_id"] = plan_id(plan)
    return plan


def latency_evidence(device_profile: Mapping, weights: Sequence[float],
                     limits: Mapping[str, float], /, *, disturbed: str = "flag") -> dict:
    """The latency figures a plan uses, their quality, and whether they steer the plan;
    raises when `disturbed` is "refuse" and disturbed figures would steer it."""
    if disturbed not in DISTURBED_POLICIES:
        raise PlanError(f"unknown disturbed-latency policy '{disturbed}' "
                        f"(choose {', '.join(DISTURBED_POLICIES)})")
    evidence = profile_latency_evidence(device_profile)
    steers = float(weights[1]) > 0 or "latency_ms" in limits
    if steers and disturbed == "refuse" and evidence["quality"] == DISTURBED:
        raise PlanError(f"{disturbed_text(evidence)}: a busy machine would steer this plan; "
                        "re-time with `apreqel measure-types --remeasure latency` when it is "
                        "quieter, or plan with --allow-disturbed-latency")
    return evidence | {"steers_plan": steers, "policy": disturbed,
                       "warning": disturbed_text(evidence)}


def _check_reachable(limits: Mapping[str, float], costs: np.ndarray,
                     uniform_memory: np.ndarray) -> None:
    """Name the limit no distribution can meet (each metric's best is a uniform type's)."""
    best = {name: float(costs[:, j].min()) for j, name in enumerate(PREDICTED)}
    best["memory_bytes"] = float(uniform_memory.min())
    for name, bound in limits.items():
        if best[name] > bound:
            shown = f"{best[name] / 2**20:.1f} MiB" if name == "memory_bytes" else f"{best[name]:g}"
            raise PlanError(f"no distribution meets the {name} limit: the best possible with "
                            f"these types is {shown}")


def canonical_sha256(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def plan_id(plan: Mapping) -> str:
    """Identity of what a plan builds: same model and same recipe give the same id."""
    return canonical_sha256({"model": plan["model"]["sha256"],
                             "recipe": plan["tensor_types"]})[:12]


def validate_plan(plan: object, /) -> dict:
    """Check that a loaded JSON object is a complete, self-consistent plan."""
    if not isinstance(plan, dict) or plan.get("kind") != "apreqel.plan":
        raise PlanError("not an apreqel plan (missing \"kind\": \"apreqel.plan\")")
    for key in ("model", "tensor_types", "expected_types", "outside_type", "plan_id"):
        if key not in plan:
            raise PlanError(f"plan is missing '{key}'")
    if not isinstance(plan["tensor_types"], dict) or not plan["tensor_types"]:
        raise PlanError("plan has no tensor types")
    for name, type_name in plan["tensor_types"].items():
        try:
            qtype(str(type_name))
        except Exception:
            raise PlanError(f"plan gives tensor {name} the unknown type '{type_name}'") from None
    if plan_id(plan) != plan["plan_id"]:
        raise PlanError("plan was edited: its recipe no longer matches its plan_id")
    return plan


def recipe_text(plan: Mapping, /) -> str:
    """The plan's recipe for stock `llama-quantize --tensor-type-file` (which reads whitespace-
    separated `pattern=type` words, so the file carries no comments)."""
    return llama_quantize_recipe(plan["tensor_types"])


def reproduce_command(plan: Mapping, recipe_path: str, /) -> str:
    """The stock llama.cpp command that builds the same model from the F16 reference."""
    return (f"llama-quantize --allow-requantize --pure --tensor-type-file {recipe_path} "
            f"REFERENCE-F16.gguf OUT.gguf {plan['outside_type'].upper()}")


def distribution_text(distribution: Mapping[str, int], /) -> str:
    """Compact distribution: `q8_0×4 q6_K×20` (types with no sublayer left out)."""
    return " ".join(f"{t}×{n}" for t, n in distribution.items() if n) or "—"
