"""Mixes aimed at llama.cpp's presets (offline): measure what the additive predictor needs,
then, for each preset, find per-tensor recipes predicted to beat it on every axis by a margin
(core.aims), and refit the predictor to what the members measured (core.calibration).

Evidence (all cached in the work directory): every candidate type's uniform model measured
(memory, latency, accuracy) and its serving footprint, and each sublayer's sensitivity (the
KL divergence one sublayer adds alone at the probe type). core.targeting does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from apreqeld.core.aims import STRICT, aims_at
from apreqeld.core.calibration import RIDGE, Calibration, Observation, recalibrate
from apreqeld.core.disturbance import CLEAN, DISTURBED
from apreqeld.core.prediction import (  # noqa: F401 - the aiming names callers use
    outside_recipe,
    predictable,
    predictor,
    predictor_from_record,
    tensor_parts,
    written,
)
from apreqeld.core.qtypes import AUTO_CANDIDATES, qtype
from apreqeld.core.targeting import Predictor, option_tables, tensor_options
from apreqeld.evidence.footprint import cached_footprint
from apreqeld.evidence.measurement import interleaved_rounds, measure_types, uniform_gguf
from apreqeld.evidence.protocol import Progress, Protocol, machine_fingerprint, no_progress
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.sensitivity import measure_sensitivity
from apreqeld.evidence.workspace import Workspace, cached_measurement
from apreqeld.gguf.view import ModelView
from apreqeld.manifest import Member

AIM_TYPES: tuple[str, ...] = AUTO_CANDIDATES + ("iq4_xs",)
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
    def timed(_stored: dict | None = None) -> dict:
        records = interleaved_rounds(
            paths, protocol=protocol,
            progress=lambda w, f: progress(f"aim: latency {w}", (2 + f) / 4))
        qualities = {r["quality"] for r in records.values()}
        return {"latency_ms": {n: r["median_ms"] for n, r in records.items()},
                "latency_quality": CLEAN if qualities == {CLEAN} else DISTURBED,
                "latency": records}

    # A figure timed under contention is timed again, never used silently for the aims.
    latency = cached_measurement(
        workspace, {"aim_latency": sorted(workspace.sha256(p) for p in paths.values()),
                    "machine": machine_fingerprint(), "protocol": asdict(protocol),
                    "apreqel_aim_latency": 2},
        timed, retime=timed)
    uniform = {n: m | {"latency_ms": latency["latency_ms"][n],
                       "latency_quality": latency["latency_quality"]}
               for n, m in uniform.items()}
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


def aimed_recipes(view: ModelView, predictor_: Predictor, targets: Mapping[str, Mapping],
                  /, *, outside: str, accuracy: str = "kld",
                  margins: Mapping[str, float] | None = None,
                  ) -> list[tuple[str, dict[str, str]]]:
    """(label, recipe) for each target recipe: the most accurate recipe predicted below the
    target's predictions by `margins` (initial_margins) on every axis, per tensor (core.aims);
    the loop's later rounds aim at the measured presets on every axis."""
    options = tensor_options(view, list(predictor_.figures[accuracy]))
    tables = option_tables(predictor_, options)
    fixed = outside_recipe(view, outside)
    margins = dict(margins if margins is not None else initial_margins(accuracy))
    found = []
    for name, recipe in targets.items():
        target = predictor_.predict(recipe)
        level, got = aims_at(predictor_, options, target, fixed, margins, accuracy=accuracy,
                             tables=tables, minimize=(accuracy,))
        for minimize, r in got:
            found.append((aim_label(name, minimize, margins, level or 0.0), r))
    return found


def initial_margins(accuracy: str) -> dict[str, float]:
    """The margins of the first aims, before anything aimed is measured."""
    return {"footprint_bytes": 0.005, "latency_ms": 0.05, accuracy: 0.05}


def aim_label(preset: str, minimize: str, margins: Mapping[str, float], level: float, /, *,
              round_: int = 0) -> str:
    """`aimed at Q4_K_M: least kld, footprint -0.5%, ms -5%, kld -5%` (round > 0 named)."""
    kept = ", ".join(f"{_short(m)} -{max(x * level, STRICT):.1%}" for m, x in margins.items())
    return (f"aimed at {preset}" + (f" (round {round_})" if round_ else "")
            + f": least {_short(minimize)}, {kept}")


def observations(view: ModelView, predictor_: Predictor, members: Sequence[Member], /, *,
                 accuracy: str) -> list[Observation]:
    """The members as the recalibration sees them: written recipe; latency (median of the
    rounds), the footprint's overhead over the exact parameter bytes, and the accuracy. A
    member with a type the predictor has no figure for is left out."""
    found = []
    for m in members:
        recipe = written(view, m.recipe)
        if not predictable(predictor_, recipe):
            continue
        memory = predictor_.predict(recipe)["memory_bytes"]
        found.append(Observation(recipe, {
            "latency_ms": m.measured.latency.median_ms,
            "overhead_bytes": m.measured.footprint_bytes - memory,
            accuracy: float(getattr(m.measured, accuracy))}))
    return found


def calibrated(view: ModelView, prior: Predictor, members: Sequence[Member], /, *,
               accuracy: str) -> Calibration:
    """The prior refitted to the measured members (core.calibration), the accuracy's tensor
    weights rescaled per part."""
    return recalibrate(prior, observations(view, prior, members, accuracy=accuracy),
                       parts=tensor_parts(view), scale_parts=(accuracy,))


def evidence_record(evidence: Mapping, /) -> dict:
    """What `predictor` needs of the evidence, as kept in the manifest."""
    keys = ("memory_bytes", "latency_ms", "kld", "ppl")
    return {"uniform": {n: {k: float(m[k]) for k in keys} for n, m in evidence["uniform"].items()},
            "footprint": {n: {"footprint_bytes": int(f["footprint_bytes"])}
                          for n, f in evidence["footprint"].items()},
            "sensitivity": {k: evidence["sensitivity"][k] for k in (
                "base", "probe", "outside", "base_kld", "sublayers", "added_kld",
                "part_added_kld")}}


def calibration_record(cal: Calibration, /) -> dict:
    """The recalibrated figures and part factors (with `evidence_record`, the predictor)."""
    return {"figures": cal.figures, "part_scale": cal.part_scale, "ridge": RIDGE,
            "observations": cal.observations, "residual": cal.residual}


def _short(metric: str) -> str:
    return {"footprint_bytes": "footprint", "latency_ms": "ms"}.get(metric, metric)
