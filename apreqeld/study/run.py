"""The paper's evaluation (§4) as one resumable job: plan, build and measure every weight
configuration, then compare the mixed set with the uniform set (Pareto front, hypervolume,
robustness) and write study.json and a self-contained report.html."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from apreqeld import __version__
from apreqeld.core.configs import PAPER_CONFIGS, WeightConfig
from apreqeld.core.metrics import LATENCY, MEMORY
from apreqeld.core.pareto import compare_sets, nondominated
from apreqeld.core.plans import canonical_sha256, make_plan
from apreqeld.core.qtypes import qtype
from apreqeld.evidence.measurement import interleaved_rounds, measure_file, uniform_gguf
from apreqeld.evidence.protocol import Progress, Protocol, machine_fingerprint, no_progress
from apreqeld.evidence.reference import ensure_reference, reference_caveat
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import read_model
from apreqeld.storage import atomic_path, write_json_atomic
from apreqeld.study.analysis import robustness_table
from apreqeld.study.report import render_report
from apreqeld.workflow import PlanOptions, build, evidence

OBJECTIVES = (MEMORY, LATENCY)
# The paper's reference point (the uniform set's worst values) gives no volume to a uniform
# type that is worst in any objective; the "+margin" variants also report the usual remedy.
HV_MARGIN = 0.1


def run_study(source: Path, out_dir: Path, /, *, workspace: Workspace, options: PlanOptions,
              configs: Sequence[WeightConfig] = PAPER_CONFIGS, interleave: bool = True,
              command: str | None = None, progress: Progress = no_progress) -> dict:
    """Plan, build and measure every configuration (each distinct plan once), analyse, report.
    Uniform GGUFs follow measure-types' rule: made when needed, deleted once measured."""
    started = time.time()
    out_dir = Path(out_dir)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    view = read_model(source)
    sha = workspace.sha256(source)
    steps = len(configs) + 3

    def stage(k: float, what: str) -> Progress:
        return lambda w, f: progress(f"{what}: {w}" if w else what, (k + f) / steps)

    protocol, accuracy, estimator = options.protocol, options.accuracy, options.estimator
    dev, layers = evidence(source, workspace=workspace, options=options,
                           progress=stage(0, "uniform types and layer profile"))
    t_uniform = time.time() - started
    reference = ensure_reference(source, workspace=workspace, protocol=protocol)
    models: list[dict] = []
    first_of: dict[str, str] = {}
    t_build = t_measure = 0.0
    for i, cfg in enumerate(configs):
        tick = stage(2 + i, f"{cfg.name} ({i + 1}/{len(configs)})")
        plan = make_plan(view, sha, dev, layers, cfg.weights, estimator=estimator,
                         accuracy=accuracy, limits=options.limits)
        pid = plan["plan_id"]
        gguf = out_dir / "models" / f"{pid}.gguf"
        t0 = time.time()
        if not (gguf.exists() and read_model(gguf).plan_id == pid):
            tick("building", 0.1)
            build(plan, gguf, source=source, workspace=workspace, threads=protocol.threads)
        t1 = time.time()
        measured = cached_measurement(
            workspace, measurement_key(plan["tensor_types"], reference, protocol),
            lambda gguf=gguf, tick=tick: measure_file(
                gguf, protocol=protocol, reference=reference,
                progress=lambda w, f: tick(w, 0.2 + 0.8 * f)))
        t_build += t1 - t0
        t_measure += time.time() - t1
        models.append({
            "name": cfg.name, "category": cfg.category, "weights": list(cfg.weights),
            "distribution": plan["distribution"], "bpw": measured["bpw"],
            "predicted": plan["predicted"], "measured": measured, "plan_id": pid,
            "gguf": f"models/{pid}.gguf", "same_as": first_of.get(pid),
            "topsis_score": plan["topsis_score"],
        })
        first_of.setdefault(pid, cfg.name)
        tick("done", 1.0)
    t2 = time.time()
    if interleave:
        _interleave_latency(dev, models, out_dir, reference=reference, workspace=workspace,
                            protocol=protocol, progress=stage(2 + len(configs),
                                                              "latency in interleaved rounds"))
    t_measure += time.time() - t2
    study = analyse(dev, models, accuracy=accuracy)
    study |= {
        "apreqel_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "model": {"name": view.name, "path": str(source), "sha256": sha,
                  "architecture": view.architecture, "n_blocks": view.n_blocks,
                  "n_sublayers": len(view.sublayers), "reference": reference.note,
                  "caveat": reference_caveat(view)},
        "device": dev["device"],
        "protocol": dev["protocol"] | {"calibration": layers["text"],
                                       "calibration_tokens": layers["tokens"],
                                       "latency_reps": protocol.reps,
                                       "latency_tokens": protocol.n_gen,
                                       "ctx": protocol.n_ctx},
        "policy": dev["policy"],
        "planning": {"estimator": estimator, "accuracy": accuracy, "gamma": options.gamma,
                     "configs": len(configs), "distinct_plans": len(first_of)},
        "latency_method": ("interleaved rounds: every model once per round, reps rounds; "
                           "latency_isolated_ms keeps each model's own llama-bench run"
                           if interleave else "llama-bench run per model"),
        "contribution": layers,
        "timing": {"total_s": round(time.time() - started, 1),
                   "measure_uniform_s": round(t_uniform, 1), "build_s": round(t_build, 1),
                   "measure_models_s": round(t_measure, 1)},
    }
    write_study(study, out_dir)
    return study


def _interleave_latency(dev: dict, models: list[dict], out_dir: Path, /, *,
                        reference, workspace: Workspace, protocol: Protocol,
                        progress: Progress) -> None:
    """Re-time every uniform type and distinct plan in interleaved rounds (cached in out_dir),
    so that the machine's drift over the minutes of a study biases no model; the uniform GGUFs
    made for it are deleted afterwards."""
    names = [f"uniform:{t}" for t in dev["types"]] + [m["plan_id"] for m in models]
    key = canonical_sha256({"models": sorted(names), "protocol": asdict(protocol),
                            "machine": machine_fingerprint()})[:16]
    cache = out_dir / f"latency-rounds-{key}.json"
    if cache.exists():
        rounds = json.loads(cache.read_text())
    else:
        outside = qtype(dev["policy"]["outside_type"])
        uniform = {f"uniform:{t}": uniform_gguf(reference, qtype(t), outside=outside,
                                                workspace=workspace, threads=protocol.threads)
                   for t in dev["types"]}
        try:
            rounds = interleaved_rounds(uniform | {m["plan_id"]: out_dir / m["gguf"]
                                                   for m in models},
                                        protocol=protocol, progress=progress)
        finally:
            for path in uniform.values():
                path.unlink(missing_ok=True)
        write_json_atomic(cache, rounds)

    def update(measured: dict, name: str) -> dict:
        r = rounds[name]
        return measured | {"latency_isolated_ms": measured["latency_ms"],
                           "latency_isolated_std_ms": measured["latency_std_ms"],
                           "latency_ms": r["mean_ms"], "latency_std_ms": r["std_ms"],
                           "latency_median_ms": r["median_ms"], "latency_iqr_ms": r["iqr_ms"],
                           "latency_quality": r["quality"],
                           "latency_reason": r["reason"]}

    for t in dev["types"]:
        entry = dev["uniform"][t]
        entry["measured"] = update(entry["measured"], f"uniform:{t}")
    for m in models:
        m["measured"] = update(m["measured"], m["plan_id"])


def _points(rows: Sequence[dict], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[float(r["measured"][o]) for o in objectives] for r in rows], dtype=float)


def analyse(dev: dict, models: list[dict], /, *, accuracy: str = "ppl") -> dict:
    """Pareto flags over uniform ∪ mixed, hypervolumes (ppl and kld) and Table 2."""
    uniform = [{"name": t, "type": t, "bpw": dev["uniform"][t]["measured"]["bpw"],
                "measured": dev["uniform"][t]["measured"]} for t in dev["types"]]
    objectives = (*OBJECTIVES, accuracy)
    both = np.vstack([_points(uniform, objectives), _points(models, objectives)]) \
        if models else _points(uniform, objectives)
    flags = nondominated(both).tolist()
    hv = {}
    for key, acc, margin in (("ppl", "ppl", 0.0), ("kld", "kld", 0.0),
                             ("ppl+margin", "ppl", HV_MARGIN), ("kld+margin", "kld", HV_MARGIN)):
        objs = (*OBJECTIVES, acc)
        if not models or not _all_finite(uniform + models, objs):
            continue
        cmp = compare_sets(_points(uniform, objs), _points(models, objs), margin=margin)
        hv[key] = {"objectives": list(objs), "ideal": list(cmp.ideal), "ref": list(cmp.ref),
                   "normalisation": cmp.normalisation, "margin": margin,
                   "hv_uniform": cmp.hv_baseline,
                   "hv_apreqel": cmp.hv_candidates, "hv_union": cmp.hv_union,
                   "gain": cmp.gain, "gain_union": cmp.gain_union}
    return {
        "types": dev["types"],
        "uniform": uniform,
        "models": models,
        "pareto": {"objectives": list(objectives), "uniform": flags[:len(uniform)],
                   "models": flags[len(uniform):]},
        "hypervolume": hv,
        "robustness": robustness_table(models, metrics=(*OBJECTIVES, accuracy))
        if models else {},
    }


def _all_finite(rows: Sequence[dict], objectives: Sequence[str]) -> bool:
    return all(math.isfinite(float(r["measured"][o])) for r in rows for o in objectives)


def write_study(study: dict, out_dir: Path) -> tuple[Path, Path]:
    """study.json and report.html, each written atomically."""
    json_path = write_json_atomic(out_dir / "study.json", study)
    html_path = out_dir / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_report(study), encoding="utf-8")
    return json_path, html_path
