"""Mixes aimed at llama.cpp's presets (offline): measure what the additive predictor needs,
then, for each preset, find the most accurate recipe predicted to be no larger and faster.

Evidence (all cached in the work directory): every candidate type's uniform model measured
(memory, latency, accuracy) and its serving footprint, and each sublayer's sensitivity (the
KL divergence one sublayer adds alone at the probe type). core.targeting does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from apreqeld.core.qtypes import AUTO_CANDIDATES, qtype
from apreqeld.core.sensitivity import sensitivity_weights, size_weights, type_figures
from apreqeld.core.targeting import Options, Predictor, aim, option_tables, sublayer_options
from apreqeld.evidence.footprint import cached_footprint
from apreqeld.evidence.measurement import interleaved_rounds, measure_types, uniform_gguf
from apreqeld.evidence.protocol import Progress, Protocol, machine_fingerprint, no_progress
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.sensitivity import measure_sensitivity
from apreqeld.evidence.workspace import Workspace, cached_measurement
from apreqeld.gguf.view import ModelView

AIM_TYPES: tuple[str, ...] = AUTO_CANDIDATES + ("iq4_xs",)
AIM_PARTS: tuple[str, ...] = ("attn_v", "ffn_down")  # given their own type, as presets do
SENSITIVITY_BASE, SENSITIVITY_PROBE = "q8_0", "q4_0"


def aiming_evidence(source: Path, view: ModelView, reference: Reference, /, *, outside: str,
                    protocol: Protocol, workspace: Workspace, serving_ctx: int,
                    types: Sequence[str] = AIM_TYPES,
                    progress: Progress = no_progress) -> dict:
    """Uniform types (those whose every tensor gets a measurable type), their footprints and
    the sublayer sensitivity."""
    usable = _usable_types(view, types)
    dev = measure_types(source, types=",".join(usable), outside=outside, protocol=protocol,
                        workspace=workspace,
                        progress=lambda w, f: progress(f"aim: uniform types: {w}", f / 3))
    uniform = {n: dev["uniform"][n]["measured"] for n in dev["types"]}
    footprint, paths = {}, {}
    for k, name in enumerate(dev["types"]):
        progress(f"aim: footprint of {name}", (1 + k / len(uniform)) / 4)
        paths[name] = path = uniform_gguf(reference, qtype(name), outside=qtype(outside),
                                          workspace=workspace, threads=protocol.threads)
        footprint[name] = cached_footprint(path, workspace=workspace, n_ctx=serving_ctx,
                                           threads=protocol.threads,
                                           gpu_layers=protocol.gpu_layers)
    # The uniform types' own latencies were timed one type after another; the figures need
    # them side by side (interleaved rounds), as the plan set's members are timed.
    latency = cached_measurement(
        workspace, {"aim_latency": sorted(workspace.sha256(p) for p in paths.values()),
                    "machine": machine_fingerprint(), "protocol": asdict(protocol),
                    "apreqel_aim_latency": 1},
        lambda: {n: r["median_ms"] for n, r in interleaved_rounds(
            paths, protocol=protocol,
            progress=lambda w, f: progress(f"aim: latency {w}", (2 + f) / 4)).items()})
    uniform = {n: m | {"latency_ms": latency[n]} for n, m in uniform.items()}
    sensitivity = measure_sensitivity(
        view, reference, base=SENSITIVITY_BASE, probe=SENSITIVITY_PROBE, outside=outside,
        protocol=protocol, workspace=workspace,
        progress=lambda w, f: progress(f"aim: {w}", (3 + f) / 4))
    return {"uniform": uniform, "footprint": footprint, "sensitivity": sensitivity}


def _usable_types(view: ModelView, types: Sequence[str]) -> list[str]:
    """The types each of whose fallbacks on this model is also in `types` (and not f16)."""
    names = {qtype(n).name for n in types}
    tensors = [t for s in view.sublayers for t in s.tensors if t.quantizable]
    return [qtype(n).name for n in types
            if all(t.type_as(qtype(n)).name in names for t in tensors)]


def predictor(view: ModelView, evidence: Mapping, /) -> Predictor:
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


def aimed_recipes(view: ModelView, predictor_: Predictor, targets: Mapping[str, Mapping],
                  /, *, outside: str, parts: Sequence[str], accuracy: str = "kld",
                  aims: Sequence[tuple[str, Mapping[str, float]]] | None = None,
                  ) -> list[tuple[str, dict[str, str]]]:
    """(label, recipe) for each target recipe and aim (the metric to minimize, the margins
    below the target's predictions) that the predictor finds a recipe for; each aim asks for
    a footprint no larger, and latency and accuracy lower, than the target's."""
    options: Options = sublayer_options(view, list(predictor_.figures[accuracy]), parts=parts)
    tables = option_tables(predictor_, options)
    fixed = {t.name: outside for t in view.outside if t.quantizable}
    aims = aims if aims is not None else default_aims(accuracy)
    found = []
    for name, recipe in targets.items():
        target = predictor_.predict(recipe)
        for minimize, margins in aims:
            got = aim(predictor_, options, target, fixed, minimize=minimize, margins=margins,
                      tables=tables)
            if got is not None:
                found.append((f"aimed at {name}: least {_short(minimize)}, "
                              + ", ".join(f"{_short(m)} -{x:.0%}" for m, x in margins.items()
                                          if x), got))
    return found


def default_aims(accuracy: str) -> tuple[tuple[str, dict[str, float]], ...]:
    """Most accurate a little and clearly faster; fastest a little more accurate."""
    return ((accuracy, {"footprint_bytes": 0.0, "latency_ms": 0.04, accuracy: 0.02}),
            (accuracy, {"footprint_bytes": 0.0, "latency_ms": 0.08, accuracy: 0.02}),
            ("latency_ms", {"footprint_bytes": 0.0, "latency_ms": 0.02, accuracy: 0.10}))


def _short(metric: str) -> str:
    return {"footprint_bytes": "footprint", "latency_ms": "ms"}.get(metric, metric)
