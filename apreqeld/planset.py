"""Plan sets (offline): weight grid -> one TOPSIS plan per vector -> each distinct plan built
once and measured on this machine -> the measured Pareto set, written as a validated manifest
(`plans/NAME/planset.json` + one llama-quantize recipe per member) from which every member's
GGUF is rebuilt byte for byte (`materialize`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from apreqeld import engine
from apreqeld.aiming import (
    aimed_recipes,
    aiming_evidence,
    calibration_record,
    evidence_record,
    initial_margins,
    predictor,
    written,
)
from apreqeld.aiming_loop import DEFAULT_BOUNDS, Bounds, close_loop
from apreqeld.build import export_gguf
from apreqeld.core.configs import PAPER_CONFIGS, parse_configs
from apreqeld.core.disturbance import DISTURBED, latency_record, stolen_share
from apreqeld.core.frontier import dominance_gaps, dominated_by, simplex_grid, unique_vectors
from apreqeld.core.metrics import METRICS, latency_stats
from apreqeld.core.plans import ACCURACY_METRICS, ESTIMATORS, distribution_text, make_plan, plan_id
from apreqeld.core.qtypes import parse_presets, preset_ftype, qtype
from apreqeld.core.recipes import (
    ModelShape,
    expected_types,
    llama_quantize_recipe,
    recipe_prediction,
    tensor_recipe,
)
from apreqeld.core.sensitivity import parts
from apreqeld.core.targeting import Predictor
from apreqeld.errors import EngineError, InputError, PlanError
from apreqeld.evidence.conditions import Window, combine, observe
from apreqeld.evidence.footprint import DEFINITION as FOOTPRINT_DEFINITION
from apreqeld.evidence.footprint import SERVING_BATCH, cached_footprint
from apreqeld.evidence.measurement import measure_file, order_types, resolve_types
from apreqeld.evidence.protocol import Progress, Protocol, machine_description, no_progress
from apreqeld.evidence.reference import Reference, ensure_reference, reference_file
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import file_sha256, read_model
from apreqeld.manifest import (
    LatencyStats,
    Member,
    Metrics,
    ModelInfo,
    PlanSet,
    PresetComparison,
    Serving,
    ShardTable,
    load_planset,
    manifest_path,
    member_shards,
    save_planset,
)
from apreqeld.resources import default_model_path
from apreqeld.storage import atomic_path
from apreqeld.store.fill import assembled, fill
from apreqeld.store.shards import Assembly, ShardStore
from apreqeld.workflow import device_profile, layer_profile

LATENCY_NOTE = ("ms/token: llama-bench tg (warm-up, then n_gen one-token decodes) timed in "
                "interleaved rounds: each round loads every member once, in an order rotated "
                "by one per round; reps rounds; median and IQR over rounds (mean and std too)")


PRESET_NOTE = ("presets: llama.cpp's file types that quantize this model without an imatrix, "
               "built from the F16 reference with llama.cpp's own mixing; a preset's recipe is "
               "the per-tensor types it got, replayed to rebuild it; `presets` compares each "
               "with the mixes and uniform types (miss: relative excess of the closest one)")


@dataclass
class Candidate:
    """A distinct recipe to build and measure, and every weight vector that chose it."""

    id: str
    kind: str
    label: str
    base_type: str
    recipe: dict[str, str]
    weights: list[tuple[float, float, float]] = field(default_factory=list)
    predicted: dict[str, float] | None = None
    presets: list[str] = field(default_factory=list)


def weight_vectors(*, step: float = 0.1, paper: bool = True,
                   weights_file: Path | None = None) -> list[tuple[float, float, float]]:
    """The grid over the simplex plus the paper's 28 configurations, or a user's weights file."""
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise InputError(f"weights file not found: {path}")
        try:
            configs = parse_configs(path.read_text(encoding="utf-8"))
        except InputError as exc:
            raise InputError(f"weights file {path}: {exc}") from None
        return unique_vectors([c.weights for c in configs])
    grid = simplex_grid(step)
    return unique_vectors(grid + ([c.weights for c in PAPER_CONFIGS] if paper else []))


def member_plan(view: ModelShape, model_sha256: str, recipe: dict[str, str],
                base_type: str) -> dict:
    """The minimal plan a member is built from: only what its manifest entry determines, so the
    GGUF's embedded metadata (and thus its sha256) is reproducible from the manifest alone."""
    plan = {"kind": "apreqel.plan", "format": 1, "model": {"sha256": model_sha256},
            "tensor_types": dict(sorted(recipe.items())),
            "expected_types": expected_types(view, recipe), "outside_type": base_type}
    plan["plan_id"] = plan_id(plan)
    return plan


def candidates(view: ModelShape, model_sha256: str, dev: dict, layers: dict,
               vectors: Sequence[Sequence[float]], /, *, estimator: str = "exact",
               accuracy: str = "kld", protect: Sequence[str] = (),
               progress: Progress = no_progress) -> list[Candidate]:
    """Uniform models of the profile's types, then one TOPSIS plan per vector; identical
    recipes merged into one candidate that remembers every vector that chose it. With
    `protect` (e.g. attn_v, ffn_down), those tensors of every mix are one type gentler, and
    each uniform type is also offered so protected (as llama.cpp's presets do)."""
    outside = dev["policy"]["outside_type"]
    ladder = list(dev["types"])
    found: dict[str, Candidate] = {}
    extra: list[tuple[str, dict[str, str]]] = []
    for name in ladder:
        recipe = tensor_recipe(view, [qtype(name)] * len(view.sublayers), outside=qtype(outside))
        m = dev["uniform"][name]["measured"]
        pid = member_plan(view, model_sha256, recipe, outside)["plan_id"]
        found[pid] = Candidate(pid, "uniform", name, outside, recipe, predicted={
            k: float(m[k]) for k in ("memory_bytes", "latency_ms", "ppl", "kld")})
        if protect:
            extra.append((f"{name} +{'+'.join(protect)}", protect_recipe(recipe, ladder, protect)))
    for k, w in enumerate(vectors):
        progress("planning", k / max(len(vectors), 1))
        plan = make_plan(view, model_sha256, dev, layers, w, estimator=estimator,
                         accuracy=accuracy)
        recipe = protect_recipe(plan["tensor_types"], ladder, protect)
        pid = member_plan(view, model_sha256, recipe, outside)["plan_id"]
        if pid not in found:
            label = distribution_text(plan["distribution"])
            found[pid] = Candidate(pid, "mix", label + (f" +{'+'.join(protect)}" if protect
                                                        else ""), outside, recipe,
                                   predicted=_predicted(view, recipe, dev, plan, protect))
        found[pid].weights.append(tuple(round(float(x), 6) for x in w))
    for label, recipe in extra:
        pid = member_plan(view, model_sha256, recipe, outside)["plan_id"]
        found.setdefault(pid, Candidate(pid, "mix", label, outside, recipe,
                                        predicted=_predicted(view, recipe, dev, None, protect)))
    return list(found.values())


def _predicted(view: ModelShape, recipe: dict[str, str], dev: dict, plan: dict | None,
               protect: Sequence[str]) -> dict[str, float]:
    """The plan's own prediction, or, for a recipe `protect` changed, the per-tensor one."""
    if plan is not None and not protect:
        return dict(plan["predicted"])
    uniform = {n: {k: float(dev["uniform"][n]["measured"][k]) for k in METRICS}
               for n in dev["types"]}
    return recipe_prediction(view, recipe, uniform)


def protect_recipe(recipe: Mapping[str, str], ladder: Sequence[str],
                   parts: Sequence[str]) -> dict[str, str]:
    """`recipe` with every sublayer tensor named `blk.N.PART.*` (PART in `parts`) one step
    gentler on `ladder` (gentlest first); the gentlest type stays."""
    rank = {n: i for i, n in enumerate(ladder)}
    out = dict(recipe)
    for name, t in recipe.items():
        pieces = name.split(".")
        if len(pieces) > 2 and pieces[0] == "blk" and pieces[2] in parts and rank.get(t, 0) > 0:
            out[name] = ladder[rank[t] - 1]
    return out


def parse_protect(spec: str | None, view: ModelShape) -> tuple[str, ...]:
    """`attn_v,ffn_down` -> ("attn_v", "ffn_down"), each naming tensors of the model."""
    parts = tuple(p.strip() for p in (spec or "").split(",") if p.strip())
    for p in parts:
        if not any(t.name.split(".")[2:3] == [p] for s in view.sublayers for t in s.tensors):
            raise InputError(f"--protect: no sublayer tensor blk.N.{p}.* in this model")
    return parts


def probe_preset(reference: Path, name: str, view: ModelShape, /, *, workspace: Workspace,
                 model_sha256: str, threads: int = 0) -> dict:
    """Quantize the F16 reference with preset `name` (llama.cpp's own mixing, no imatrix):
    {"applies": True, "recipe": tensor -> type it got} or {"applies": False, "error": why}.
    Cached: llama.cpp gives the same answer every time."""
    ftype = preset_ftype(name)

    def attempt() -> dict:
        folder = workspace.model_dir(model_sha256)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".preset-") as tmp:
            out = Path(tmp) / "preset.gguf"
            try:
                engine.quantize(reference, out, ftype=ftype, pure=False, threads=threads)
            except EngineError as exc:
                return {"applies": False, "error": str(exc)}
            written = read_model(out).tensor_types()
        recipe = {t.name: written[t.name] for t in view.tensors if t.quantizable}
        try:
            for type_name in recipe.values():
                qtype(type_name)
        except InputError as exc:
            return {"applies": False, "error": f"cannot be replayed: {exc}"}
        return {"applies": True, "recipe": recipe}

    return cached_measurement(workspace, {
        "preset": name.upper(), "ftype": ftype, "model": model_sha256,
        "engine": engine.engine_version(), "apreqel_preset_probe": 1}, attempt)


def add_presets(cands: Sequence[Candidate], probes: Mapping[str, dict], view: ModelShape,
                model_sha256: str, base_type: str) -> list[Candidate]:
    """The candidates plus every preset that applies: merged into a candidate with the same
    recipe, else a new `preset` candidate whose recipe replays llama.cpp's mixing."""
    found = {c.id: c for c in cands}
    for name, probe in probes.items():
        if not probe["applies"]:
            continue
        pid = member_plan(view, model_sha256, probe["recipe"], base_type)["plan_id"]
        if pid not in found:
            found[pid] = Candidate(pid, "preset", name, base_type, dict(probe["recipe"]))
        found[pid].presets.append(name)
        if found[pid].kind == "preset":
            found[pid].label = "=".join(found[pid].presets)
    return list(found.values())


def add_aimed(cands: Sequence[Candidate], view: ModelShape, model_sha256: str,
              aim_predictor: Predictor, targets: Mapping[str, Mapping[str, str]], /, *,
              outside: str, accuracy: str) -> list[Candidate]:
    """The candidates plus the mixes aimed at each preset (a recipe already there keeps its
    candidate)."""
    return add_recipes(cands, view, model_sha256, [
        (label, recipe, aim_predictor.predict(recipe)) for label, recipe in aimed_recipes(
            view, aim_predictor, targets, outside=outside, accuracy=accuracy)], outside=outside)


def add_recipes(cands: Sequence[Candidate], view: ModelShape, model_sha256: str,
                new: Sequence[tuple[str, dict[str, str], Mapping[str, float] | None]], /, *,
                outside: str) -> list[Candidate]:
    """The candidates plus a mix for each (label, recipe, prediction) not among them."""
    found = {c.id: c for c in cands}
    for label, recipe, predicted in new:
        pid = member_plan(view, model_sha256, recipe, outside)["plan_id"]
        found.setdefault(pid, Candidate(pid, "mix", label, outside, dict(recipe),
                                        predicted=None if predicted is None else {
                                            k: float(v) for k, v in predicted.items()}))
    return list(found.values())


def aim_predictions(view: ModelShape, aim_predictor: Predictor, members: Sequence[Member],
                    accuracy: str) -> dict[str, dict[str, float]]:
    """The aiming predictor's footprint, latency and accuracy for every member (kept in the
    manifest, so that a re-time can judge the predictor again)."""
    keys = ("footprint_bytes", "latency_ms", accuracy)
    return {m.id: {k: round(float(v), 6) for k, v in aim_predictor.predict(
        written(view, m.recipe)).items() if k in keys} for m in members}


def prediction_errors(predictions: Mapping[str, Mapping[str, float]],
                      members: Sequence[Member], accuracy: str) -> dict[str, dict[str, float]]:
    """How far the predictions are from every member's measurement: median and largest
    relative error per metric."""
    got: dict[str, list[float]] = {"footprint_bytes": [], "latency_ms": [], accuracy: []}
    for m in members:
        p = predictions.get(m.id)
        if p is None:
            continue
        measured = {"footprint_bytes": m.measured.footprint_bytes,
                    "latency_ms": m.measured.latency.median_ms,
                    accuracy: getattr(m.measured, accuracy)}
        for k, v in measured.items():
            if v:
                got[k].append(abs(p[k] / v - 1))
    return {k: {"median": round(float(np.median(v)), 4), "max": round(float(np.max(v)), 4)}
            for k, v in got.items() if v}


def compare_presets(members: Sequence[Member], presets: Sequence[tuple[str, str]],
                    accuracy: str, reasons: Mapping[str, str | None] | None = None,
                    ) -> list[PresetComparison]:
    """Each (preset, member id) against the own members (mixes and uniform types): which
    dominate it, else the closest one, its relative excess per objective and, from the aiming
    loop, why no aim beat it (`reasons`)."""
    points = np.asarray([_objectives(m.measured, accuracy) for m in members])
    index = {m.id: i for i, m in enumerate(members)}
    own = [i for i, m in enumerate(members) if m.kind != "preset"]
    gaps = dominance_gaps(points, [index[mid] for _, mid in presets], own)
    names = ("footprint_bytes", "latency_ms", accuracy)
    return [PresetComparison(name=name, ftype=preset_ftype(name), member=mid,
                             dominated_by=[members[i].id for i in doms],
                             closest=None if near is None else members[near].id,
                             miss=dict(zip(names, map(_round6, miss), strict=False)),
                             reason=None if doms else (reasons or {}).get(name))
            for (name, mid), (doms, near, miss) in zip(presets, gaps, strict=True)]


def _round6(x: float) -> float:
    return round(x, 6)


def _interleaved_rounds(paths: dict[str, Path], /, *, workspace: Workspace, protocol: Protocol,
                        condition: str | None, run: str,
                        progress: Progress) -> dict[str, LatencyStats]:
    """ms/token per member over `protocol.reps` interleaved rounds, each run watched for
    contention (core.disturbance judges the rounds); every sample is cached (keyed by the
    member set, the round, the run and the condition), so a resumed run re-times nothing."""
    shas = {k: workspace.sha256(p) for k, p in paths.items()}
    members = sorted(shas.values())
    names = list(paths)
    samples: dict[str, list[float]] = {k: [] for k in names}
    windows: dict[str, list[Window]] = {k: [] for k in names}
    total = protocol.reps * len(names)
    for r in range(protocol.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k, name in enumerate(order):
            key = {"latency_round": r, "file": shas[name], "set": members, "run": run,
                   "condition": condition, "n_ctx": protocol.n_ctx, "n_gen": protocol.n_gen,
                   "threads": protocol.threads, "gpu_layers": protocol.gpu_layers,
                   "engine": engine.engine_version(), "apreqel_planset_latency": 1}

            def once(name: str = name, r: int = r) -> dict:
                with engine.open_session(paths[name], n_ctx=protocol.n_ctx,
                                         threads=protocol.threads,
                                         gpu_layers=protocol.gpu_layers) as s, observe() as w:
                    t = engine.time_generation(s, n_gen=protocol.n_gen, reps=1, seed=r)
                return {"ms_per_token": t.ms_per_token[0], "window": asdict(w)}

            got = cached_measurement(workspace, key, once)
            samples[name].append(got["ms_per_token"])
            windows[name].append(Window(**got.get("window", {"others_cpu_s": None})))
            progress(f"latency round {r + 1}/{protocol.reps}", (r * len(names) + k + 1) / total)
    return {name: _latency(samples[name], windows[name], protocol.threads) for name in names}


def _latency(samples: list[float], windows: list[Window], threads: int) -> LatencyStats:
    """Robust statistics of one member's rounds with the disturbance detector's verdict."""
    stolen = [stolen_share(w.others_cpu_s, w.wall_s, cores=w.cores, threads=threads)
              for w in windows]
    rec = latency_record(samples, stolen, combine(windows), threads=threads)
    return LatencyStats(**latency_stats(samples), disturbed=rec["quality"] == DISTURBED,
                        stolen=rec["stolen"], reason=rec["reason"])


def _pareto(values: list[tuple[float, float, float]], ids: list[str]) -> list[list[str]]:
    return [[ids[i] for i in doms] for doms in dominated_by(np.asarray(values))]


def _objectives(m: Metrics, accuracy: str) -> tuple[float, float, float]:
    return (float(m.footprint_bytes), m.latency.median_ms, m.kld if accuracy == "kld" else m.ppl)


def run_planset(source: Path, out_dir: Path, /, *, workspace: Workspace, protocol: Protocol,
                types: str | None = None, outside: str = "q8_0", step: float = 0.1,
                paper: bool = True, weights_file: Path | None = None,
                estimator: str = "exact", accuracy: str = "kld",
                calibration: str | None = None, calibration_tokens: int = 2048,
                serving_ctx: int = 2048,
                name: str | None = None, presets: str | None = "all",
                protect: str | None = None, aim: bool = True, bounds: Bounds = DEFAULT_BOUNDS,
                extra: Sequence[tuple[str, dict[str, str], Mapping[str, float]]] = (),
                progress: Progress = no_progress) -> PlanSet:
    """Plan every weight vector, add llama.cpp's presets that apply (`presets`: all, none or
    a comma list) and, with `aim`, mixes aimed at beating each preset (apreqeld.aiming),
    build and measure each distinct candidate once, then, with `aim`, close the loop
    (apreqeld.aiming_loop, within `bounds`), keep the measured Pareto set, and write
    `out_dir/planset.json` and `out_dir/recipes/`. `extra`: (label, recipe, prediction)s
    measured as candidates too (the daemon's composed members). Resumable."""
    started = time.time()
    quantized = dict(engine.QUANTIZED)
    out_dir = Path(out_dir)
    # Every input is checked before anything is measured.
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator '{estimator}' (choose {', '.join(ESTIMATORS)})")
    if accuracy not in ACCURACY_METRICS:
        raise InputError(f"unknown accuracy '{accuracy}' (choose {', '.join(ACCURACY_METRICS)})")
    if serving_ctx < 8:
        raise InputError(f"serving context must be at least 8, got {serving_ctx}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output is not a folder: {out_dir}")
    vectors = weight_vectors(step=step, paper=paper, weights_file=weights_file)
    view = read_model(source)
    order_types(view, resolve_types(types, view))
    qtype(outside)
    preset_names = parse_presets(presets)
    protected = parse_protect(protect, view)
    sha = workspace.sha256(source)
    steps = 8.0  # uniform types, layer profile, vectors, presets, aim, measure (2), loop

    def stage(k: float, what: str) -> Progress:
        return lambda w, f: progress(f"{what}: {w}", (k + min(max(f, 0), 1)) / steps)

    def measuring(k: int) -> Progress:
        """The first measurement, then each round of the aiming loop."""
        if k == 0:
            return lambda w, f: progress(w, (5 + 2 * min(max(f, 0), 1)) / steps)
        share = 1 / max(bounds.rounds, 1)
        return lambda w, f: progress(f"aim round {k}: {w}",
                                     (7 + min(1, share * (k - 1 + min(max(f, 0), 1)))) / steps)

    dev = device_profile(source, workspace=workspace, protocol=protocol, types=types,
                         outside=outside, progress=stage(0, "uniform types"))
    layers = layer_profile(source, workspace=workspace, calibration=calibration,
                           n_tokens=calibration_tokens, threads=protocol.threads,
                           progress=stage(1, "layer profile"))
    t_evidence = time.time() - started
    cands = candidates(view, sha, dev, layers, vectors, estimator=estimator, accuracy=accuracy,
                       protect=protected, progress=stage(2, f"{len(vectors)} weight vectors"))
    reference = ensure_reference(source, workspace=workspace, protocol=protocol)
    probes = {}
    for k, n in enumerate(preset_names):
        progress(f"presets: trying {n}", (3 + (k + 1) / len(preset_names)) / steps)
        probes[n] = probe_preset(reference.path, n, view, workspace=workspace,
                                 model_sha256=sha, threads=protocol.threads)
    cands = add_presets(cands, probes, view, sha, dev["policy"]["outside_type"])
    aim_record, aim_predictor = None, None
    outside_type = dev["policy"]["outside_type"]
    if aim and any(p["applies"] for p in probes.values()):
        evidence = aiming_evidence(source, view, reference, outside=outside_type,
                                   protocol=protocol, workspace=workspace,
                                   serving_ctx=serving_ctx,
                                   progress=lambda w, f: progress(w, (4 + f) / steps))
        aim_predictor = predictor(view, evidence)
        before = len(cands)
        cands = add_aimed(cands, view, sha, aim_predictor,
                          {n: p["recipe"] for n, p in probes.items() if p["applies"]},
                          outside=outside_type, accuracy=accuracy)
        aim_record = {"types": list(evidence["uniform"]), "parts": parts(view),
                      "options": "per tensor: every type of `types` the tensor takes as "
                                 "asked (K-quants where rows allow)",
                      "initial_margins": initial_margins(accuracy),
                      "first_aimed": len(cands) - before} | evidence_record(evidence)
    if extra:
        cands = add_recipes(cands, view, sha, list(extra), outside=outside_type)
    t_planning = time.time() - started - t_evidence
    of = {n: c.id for c in cands for n in c.presets}
    got = _measured(view, sha, cands, reference, workspace=workspace, protocol=protocol,
                    serving_ctx=serving_ctx, accuracy=accuracy,
                    previous=_previous_conditions(out_dir), progress=measuring)
    reasons: dict[str, str | None] = {}
    if aim_record is not None and aim_predictor is not None:
        loop = close_loop(view, got.members, {n: of[n] for n in preset_names if n in of},
                          aim_predictor, got.more, outside=outside_type, accuracy=accuracy,
                          bounds=bounds, first_added=aim_record["first_aimed"],
                          progress=lambda w, f: None)
        final = loop.predictor
        aim_record |= {
            "calibration": calibration_record(loop.calibration) if loop.calibration else None,
            "loop": {"bounds": {"rounds": bounds.rounds, "members": bounds.members},
                     "rounds": loop.rounds, "stop": loop.stop,
                     "added": sum(r["added"] for r in loop.rounds[1:]),
                     "status": loop.status},
            "predictions": aim_predictions(view, final, got.members, accuracy)}
        aim_record["prediction_error"] = prediction_errors(aim_record["predictions"],
                                                           got.members, accuracy)
        aim_record["prior_prediction_error"] = prediction_errors(
            aim_predictions(view, aim_predictor, got.members, accuracy), got.members, accuracy)
        reasons = {p: st["reason"] for p, st in loop.status.items()}
    members, baseline, table = got.members, got.baseline, got.table
    planset = PlanSet(
        name=name or out_dir.resolve().name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelInfo(name=view.name, sha256=sha, path=str(source),
                        architecture=view.architecture),
        engine=engine.engine_version(), device=machine_description(protocol),
        protocol=protocol.to_dict() | {
            "latency_rounds": LATENCY_NOTE,
            "planning": {"types": dev["types"], "outside_type": dev["policy"]["outside_type"],
                         "estimator": estimator, "accuracy": accuracy,
                         "protect": list(protected),
                         "vectors": len(vectors), "grid_step": None if weights_file else step,
                         "paper_configs": bool(paper and weights_file is None),
                         "presets": {"asked": list(preset_names),
                                     "rejected": {n: p["error"] for n, p in probes.items()
                                                  if not p["applies"]}},
                         "weights_file": str(weights_file) if weights_file else None,
                         "aim": aim_record,
                         "layer_profile": {k: layers[k] for k in ("text", "token_range",
                                                                  "gamma")}},
            "timing_s": {"evidence": round(t_evidence, 1), "planning": round(t_planning, 1),
                         "total": round(time.time() - started, 1)},
            "quantized": {k: engine.QUANTIZED[k] - quantized[k] for k in quantized}},
        serving=Serving(n_ctx=serving_ctx, threads=protocol.threads,
                        gpu_layers=protocol.gpu_layers, n_batch=min(serving_ctx, SERVING_BATCH),
                        baseline_rss_bytes=baseline),
        accuracy=accuracy, objectives=("footprint_bytes", "latency_ms", accuracy),
        members=members, notes=[FOOTPRINT_DEFINITION, LATENCY_NOTE, PRESET_NOTE],
        presets=compare_presets(members, [(n, of[n]) for n in preset_names if n in of],
                                accuracy, reasons),
        store=table)
    write_planset(planset, out_dir, store=workspace.store)
    progress("plan set written", 1.0)
    return planset


@dataclass
class _Measured:
    """The candidates measured so far, measured again (all timed together) as more come."""

    view: ModelShape
    sha: str
    cands: list[Candidate]
    outside: str
    accuracy: str
    run: Callable[[list[Candidate], Progress], tuple[list[Member], int, ShardTable]]
    progress: Callable[[int], Progress]  # the progress of the k-th measurement
    members: list[Member] = field(default_factory=list)
    baseline: int = 0
    table: ShardTable | None = None
    done: int = 0

    def measure(self) -> list[Member]:
        members, self.baseline, self.table = self.run(self.cands, self.progress(self.done))
        self.done += 1
        self.members = with_front(members, self.accuracy)
        return self.members

    def more(self, new: Sequence[tuple[str, dict[str, str], Mapping[str, float]]]
             ) -> list[Member]:
        """Add the (label, recipe, prediction)s not there yet, measure every candidate."""
        self.cands = add_recipes(self.cands, self.view, self.sha, new, outside=self.outside)
        return self.measure()


def _measured(view: ModelShape, sha: str, cands: Sequence[Candidate], reference: Reference, /,
              *, workspace: Workspace, protocol: Protocol, serving_ctx: int, accuracy: str,
              previous: Mapping[str, dict[str, LatencyStats]],
              progress: Callable[[int], Progress]) -> _Measured:
    """The candidates measured (measure_candidates), ready to take more; `progress(k)`
    reports the k-th measurement."""
    got = _Measured(view, sha, list(cands), cands[0].base_type, accuracy,
                    lambda cs, p: measure_candidates(view, sha, cs, reference,
                                                     workspace=workspace, protocol=protocol,
                                                     serving_ctx=serving_ctx,
                                                     previous=previous, progress=p),
                    progress)
    got.measure()
    return got


def measure_candidates(view: ModelShape, model_sha256: str, cands: Sequence[Candidate],
                       reference: Reference, /, *, workspace: Workspace, protocol: Protocol,
                       serving_ctx: int,
                       previous: Mapping[str, dict[str, LatencyStats]] | None = None,
                       progress: Progress = no_progress) -> tuple[list[Member], int, ShardTable]:
    """Assemble every candidate from the shard store (each missing shard quantized once),
    measure its accuracy and serving footprint (cached), time them all in interleaved rounds;
    the members (front not set yet), the median baseline RSS of the footprint measurements,
    and the shard table of what the members are made of."""
    table, found = assembled(workspace.store, reference.path, model_sha256,
                             {c.id: (c.recipe, c.base_type) for c in cands},
                             threads=protocol.threads,
                             progress=lambda w, f: progress(w, 0.1 * f))
    paths = {c.id: found[c.id][0] for c in cands}
    measured: dict[str, dict] = {}
    for k, c in enumerate(cands):
        def step(w: str, f: float, k: int = k, c: Candidate = c) -> None:
            progress(f"{c.label} ({k + 1}/{len(cands)}): {w}",
                     0.1 + 0.6 * (k + min(max(f, 0), 1)) / len(cands))

        path = paths[c.id]
        acc = cached_measurement(workspace, measurement_key(c.recipe, reference, protocol),
                                 lambda path=path, p=step: measure_file(
                                     path, protocol=protocol, reference=reference,
                                     progress=lambda w, f: p(w, 0.9 * f)))
        step("footprint", 0.9)
        foot = cached_footprint(path, workspace=workspace, n_ctx=serving_ctx,
                                threads=protocol.threads, gpu_layers=protocol.gpu_layers)
        measured[c.id] = {"assembly_sha256": found[c.id][1].identity,
                          "parameter_bytes": read_model(path).parameter_bytes,
                          "accuracy": acc, "footprint": foot}
    latency = _interleaved_rounds(paths, workspace=workspace, protocol=protocol,
                                  condition=None, run="default",
                                  progress=lambda w, f: progress(f"latency: {w}", 0.7 + 0.3 * f))
    members = []
    for c in cands:
        m = measured[c.id]
        acc = m["accuracy"]
        metrics = Metrics(parameter_bytes=m["parameter_bytes"],
                          footprint_bytes=m["footprint"]["footprint_bytes"],
                          latency=latency[c.id],
                          ppl=acc["ppl"], ppl_se=acc["ppl_se"], kld=acc["kld"],
                          kld_se=acc["kld_se"], top1=acc.get("top1_agreement"))
        members.append(Member(id=c.id, kind=c.kind, label=c.label, base_type=c.base_type,
                              recipe=dict(sorted(c.recipe.items())),
                              ftype=c.presets[0] if c.presets else None,
                              assembly_sha256=m["assembly_sha256"],
                              weights=c.weights, predicted=c.predicted, measured=metrics,
                              conditions=(previous or {}).get(c.id, {}), pareto=True))
    baseline = int(np.median([m["footprint"]["baseline_rss_bytes"] for m in measured.values()]))
    return members, baseline, used_table(table, members)


def used_table(table: ShardTable, members: Sequence[Member], /) -> ShardTable:
    """The part of a shard table the members are assembled from."""
    asked = {(n, q) for m in members for n, q in m.recipe.items()}
    return table.model_copy(update={
        "metadata": {b: s for b, s in table.metadata.items()
                     if any(m.base_type == b for m in members)},
        "shards": {n: {q: s for q, s in by.items() if (n, q) in asked}
                   for n, by in table.shards.items()
                   if any((n, q) in asked for q in by)}})


def planset_from_recipes(source: Path, recipes: Mapping[str, Mapping[str, str]], out_dir: Path,
                         /, *, workspace: Workspace, protocol: Protocol,
                         serving_ctx: int = 2048,
                         outside: str = "q8_0", accuracy: str = "kld", name: str | None = None,
                         progress: Progress = no_progress) -> PlanSet:
    """A plan set of the given recipes (label -> tensor -> type; a quantizable tensor not
    named gets `outside`), each built from the F16 reference and measured like any member,
    written to `out_dir`: hand-made recipes next to each other, or a small set to serve."""
    if accuracy not in ACCURACY_METRICS:
        raise InputError(f"unknown accuracy '{accuracy}' (choose {', '.join(ACCURACY_METRICS)})")
    if serving_ctx < 8:
        raise InputError(f"serving context must be at least 8, got {serving_ctx}")
    view = read_model(source)
    sha = workspace.sha256(source)
    names = {t.name for t in view.tensors if t.quantizable}
    cands: dict[str, Candidate] = {}
    for label, recipe in recipes.items():
        unknown = sorted(set(recipe) - names)
        if unknown:
            raise InputError(f"recipe '{label}': no quantizable tensor {unknown[0]} in "
                             f"{view.name}")
        full = {n: qtype(outside).name for n in sorted(names)} | {
            n: qtype(q).name for n, q in recipe.items()}
        pid = member_plan(view, sha, full, outside)["plan_id"]
        if pid in cands:
            raise InputError(f"recipes '{cands[pid].label}' and '{label}' are the same")
        inside = {full[t.name] for s in view.sublayers for t in s.tensors if t.quantizable}
        cands[pid] = Candidate(pid, "uniform" if len(inside) == 1 else "mix", label, outside,
                               full)
    reference = ensure_reference(source, workspace=workspace, protocol=protocol)
    members, baseline, table = measure_candidates(view, sha, list(cands.values()), reference,
                                                  workspace=workspace, protocol=protocol,
                                                  serving_ctx=serving_ctx, progress=progress)
    planset = PlanSet(
        name=name or Path(out_dir).resolve().name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelInfo(name=view.name, sha256=sha, path=str(source),
                        architecture=view.architecture),
        engine=engine.engine_version(), device=machine_description(protocol),
        protocol=protocol.to_dict() | {"latency_rounds": LATENCY_NOTE,
                                       "planning": {"recipes": list(recipes),
                                                    "outside_type": outside}},
        serving=Serving(n_ctx=serving_ctx, threads=protocol.threads,
                        gpu_layers=protocol.gpu_layers, n_batch=min(serving_ctx, SERVING_BATCH),
                        baseline_rss_bytes=baseline),
        accuracy=accuracy, objectives=("footprint_bytes", "latency_ms", accuracy),
        members=with_front(members, accuracy), notes=[FOOTPRINT_DEFINITION, LATENCY_NOTE],
        store=table)
    write_planset(planset, out_dir, store=workspace.store)
    return planset


def with_front(members: Sequence[Member], accuracy: str) -> list[Member]:
    """The members with `pareto` and `dominated_by` set from their measured objectives."""
    doms = _pareto([_objectives(m.measured, accuracy) for m in members],
                   [m.id for m in members])
    return [m.model_copy(update={"pareto": not d, "dominated_by": d})
            for m, d in zip(members, doms, strict=True)]


def _previous_conditions(out_dir: Path) -> dict[str, dict[str, LatencyStats]]:
    """Condition columns of an existing manifest, kept for members that are still there."""
    if not manifest_path(out_dir).is_file():
        return {}
    return {m.id: dict(m.conditions) for m in load_planset(out_dir).members}


def write_planset(planset: PlanSet, out_dir: Path, /, *, store: ShardStore | None = None
                  ) -> Path:
    """Recipes first, then the manifest (atomic each), then stale recipes removed; the plan
    set registered with `store`, whose pruning then keeps its shards."""
    folder = Path(out_dir) / "recipes"
    keep = set()
    for m in planset.members:
        path = folder / f"{m.id}.txt"
        keep.add(path.name)
        with atomic_path(path) as tmp:
            tmp.write_text(llama_quantize_recipe(m.recipe))
    saved = save_planset(planset, out_dir)
    for stale in folder.glob("*.txt"):
        if stale.name not in keep:
            stale.unlink()
    if store is not None:
        store.register(planset, saved)
    return saved


def find_source(planset: PlanSet, /, *, source: Path | None = None,
                workspace: Workspace) -> Path:
    """The model the plan set was made from: `source` (checked), else the default model or the
    recorded path when its sha256 matches."""
    want = planset.model.sha256
    if source is not None:
        got = workspace.sha256(Path(source))
        if got != want:
            raise InputError(f"{source} is not the plan set's model (sha256 {got[:12]}…, the "
                             f"plan set needs {planset.model.name} {want[:12]}…)")
        return Path(source)
    tried = []
    try:
        tried.append(default_model_path())
    except InputError:
        pass
    tried.append(Path(planset.model.path))
    for path in tried:
        if path.is_file() and workspace.sha256(path) == want:
            return path
    raise InputError(f"the plan set's model {planset.model.name} (sha256 {want[:12]}…) is not "
                     "the default model nor at its recorded path; give it with --model")


def materialize(planset: PlanSet, /, *, workspace: Workspace,
                members: Sequence[Member] | None = None, source: Path | None = None,
                manifest: Path | None = None, deep: bool = False,
                progress: Progress = no_progress) -> dict[str, Path]:
    """Make members (all by default) loadable in the workspace's state dir: assembled from the
    shard store, each missing shard quantized from the source's F16 reference and checked
    against the manifest's sha256. With `manifest`, the plan set is registered with the store
    (pruning keeps its shards); `deep` re-hashes every shard first."""
    store = workspace.store
    if source is not None:  # a model given is checked, needed or not
        find_source(planset, source=source, workspace=workspace)
    chosen = list(planset.members if members is None else members)
    assemblies = {m.id: Assembly(tuple(member_shards(planset, m))) for m in chosen}
    if manifest is not None:
        store.register(planset, manifest)
    missing: set[str] = set()
    for m in chosen:
        missing |= set(store.check(assemblies[m.id].shards, deep=deep)[0])
    if missing:
        progress(f"building {len(missing)} missing shards", 0.0)
        fill_shards(planset, missing, workspace=workspace, source=source,
                    progress=lambda w, f: progress(w, 0.9 * f))
    found = {}
    for k, m in enumerate(chosen):
        found[m.id] = store.assemble(assemblies[m.id])
        progress(f"assembled {m.label}", 0.9 + 0.1 * (k + 1) / len(chosen))
    return found


def fill_shards(planset: PlanSet, shas: Iterable[str], /, *, workspace: Workspace,
                source: Path | None = None, progress: Progress = no_progress) -> None:
    """Build the plan set's shards `shas` from the F16 reference of its model (found as
    `find_source` finds it), each checked against the manifest."""
    table = planset.store
    if table is None:
        raise InputError(f"plan set {planset.name} has no shard table: upgrade it with "
                         "`apreqel planset upgrade`")
    shas = set(shas)
    wanted: dict[str, set[str]] = {}
    for name, by in table.shards.items():
        for q, sha in by.items():
            if sha in shas:
                wanted.setdefault(name, set()).add(q)
    bases = [b for b, sha in table.metadata.items() if sha in shas] or list(table.metadata)[:1]
    src = find_source(planset, source=source, workspace=workspace)
    ref = reference_file(src, workspace=workspace, progress=progress)
    fill(workspace.store, ref, planset.model.sha256, wanted, bases=bases,
         threads=planset.serving.threads, expected=table, progress=progress)


def export_member(planset: PlanSet, member: Member, out: Path, /, *, workspace: Workspace,
                  source: Path | None = None) -> Path:
    """One member as one ordinary GGUF for stock llama.cpp tools (byte for byte what `apreqel
    build` writes for its recipe), checked against the manifest's file sha256 where known."""
    path = materialize(planset, workspace=workspace, members=[member], source=source)[member.id]
    view = read_model(path)
    plan = member_plan(view, planset.model.sha256, member.recipe, member.base_type)
    out = Path(out)
    if out.is_dir():
        raise InputError(f"output path is a directory: {out}")
    export_gguf(path, plan, out)
    if member.file_sha256 is not None and file_sha256(out) != member.file_sha256:
        out.unlink()
        raise PlanError(f"the export of {member.id} differs from the manifest's file sha256 "
                        "(another llama.cpp build?)")
    return out


def upgrade_planset(folder: Path, /, *, workspace: Workspace, source: Path | None = None,
                    progress: Progress = no_progress) -> PlanSet:
    """A format-1 plan set (members rebuilt from recipes) as format 2 (assembled from the
    store): shards built, each member's export checked byte for byte against the sha256 its
    old build had, its serving footprint measured again as the store serves it (split files),
    then the front and the presets recomputed. Nothing else is re-measured."""
    planset = load_planset(folder)
    if planset.format >= 2 and planset.store is not None:
        return planset
    src = find_source(planset, source=source, workspace=workspace)
    ref = reference_file(src, workspace=workspace, progress=progress)
    table, found = assembled(workspace.store, ref, planset.model.sha256,
                             {m.id: (m.recipe, m.base_type) for m in planset.members},
                             threads=planset.serving.threads,
                             progress=lambda w, f: progress(w, 0.2 * f))
    view = read_model(src)
    members = []
    with tempfile.TemporaryDirectory(dir=workspace.root, prefix=".upgrade-") as tmp:
        for k, m in enumerate(planset.members):
            path, assembly = found[m.id]
            progress(f"checking {m.id} ({k + 1}/{len(planset.members)})",
                     0.2 + 0.8 * k / len(planset.members))
            out = export_gguf(path, member_plan(view, planset.model.sha256, m.recipe,
                                                m.base_type), Path(tmp) / "member.gguf")
            if m.file_sha256 is not None and file_sha256(out) != m.file_sha256:
                raise PlanError(f"member {m.id} assembled from the store differs from its "
                                "old build (another llama.cpp build or model?)")
            size = out.stat().st_size
            out.unlink()
            foot = cached_footprint(path, workspace=workspace, n_ctx=planset.serving.n_ctx,
                                    threads=planset.serving.threads,
                                    gpu_layers=planset.serving.gpu_layers)
            measured = m.measured.model_copy(update={"footprint_bytes": foot["footprint_bytes"]})
            members.append(m.model_copy(update={"assembly_sha256": assembly.identity,
                                                "file_bytes": size, "measured": measured}))
    members = with_front(members, planset.accuracy)
    upgraded = PlanSet.model_validate(planset.model_copy(update={
        "format": 2, "store": used_table(table, members), "members": members,
        "presets": compare_presets(members, [(p.name, p.member) for p in planset.presets],
                                   planset.accuracy, {p.name: p.reason for p in planset.presets}),
        "notes": [n for n in planset.notes if not n.startswith("footprint =")]
        + [FOOTPRINT_DEFINITION + " Members are loaded as the store serves them: one split "
           "file per tensor, reached through links."]}).model_dump())
    write_planset(upgraded, folder, store=workspace.store)
    return upgraded


def record_condition(folder: Path, condition: str, /, *, workspace: Workspace,
                     source: Path | None = None,
                     reps: int | None = None, progress: Progress = no_progress) -> PlanSet:
    """Re-time every member (interleaved rounds, the manifest's protocol) under the machine's
    current condition and store it as `conditions[condition]`; nothing is rebuilt or re-scored."""
    if not condition or not condition.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"condition name must be letters, digits, '-' or '_', got '{condition}'")
    planset = load_planset(folder)
    latency = _retimed_rounds(planset, workspace=workspace, source=source,
                              reps=reps, condition=condition, run="default", progress=progress)
    members = [m.model_copy(update={"conditions": dict(m.conditions) | {
        condition: latency[m.id]}}) for m in planset.members]
    updated = planset.model_copy(update={"members": members})
    write_planset(updated, folder)
    return updated


def retime_planset(folder: Path, /, *, workspace: Workspace, source: Path | None = None,
                   reps: int | None = None, progress: Progress = no_progress) -> PlanSet:
    """Re-run the main latency column's interleaved rounds (nothing rebuilt or re-scored),
    then recompute the front and the preset comparison. Resumable: an interrupted re-time
    keeps its rounds for the next try."""
    planset = load_planset(folder)
    n = int(planset.protocol.get("retimed", 0)) + 1
    latency = _retimed_rounds(planset, workspace=workspace, source=source,
                              reps=reps, condition=None, run=f"retime-{n}", progress=progress)
    members = with_front([m.model_copy(update={"measured": m.measured.model_copy(
        update={"latency": latency[m.id]})}) for m in planset.members], planset.accuracy)
    protocol = planset.protocol | {
        "reps": reps or planset.protocol["reps"], "retimed": n,
        "retimed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    aim = (protocol.get("planning") or {}).get("aim")
    if aim and aim.get("predictions"):
        aim = aim | {"prediction_error": prediction_errors(aim["predictions"], members,
                                                           planset.accuracy)}
        protocol["planning"] = protocol["planning"] | {"aim": aim}
    updated = planset.model_copy(update={
        "members": members,
        "presets": compare_presets(members, [(p.name, p.member) for p in planset.presets],
                                   planset.accuracy, _retimed_reasons(planset, n)),
        "protocol": protocol})
    updated = PlanSet.model_validate(updated.model_dump())
    write_planset(updated, folder)
    return updated


def _retimed_reasons(planset: PlanSet, n: int, /) -> dict[str, str | None]:
    """The presets' reasons after re-time `n`: a preset dominated before is, if no longer,
    said to be a latency tie of the re-time."""
    return {p.name: p.reason if not p.dominated_by else
            f"dominated before re-time {n} ({', '.join(p.dominated_by[:3])}), not in its "
            "rounds: a latency tie within the spread" for p in planset.presets}


def _retimed_rounds(planset: PlanSet, /, *, workspace: Workspace, source: Path | None,
                    reps: int | None, condition: str | None, run: str,
                    progress: Progress) -> dict[str, LatencyStats]:
    """Materialize every member, then time them all in interleaved rounds (the manifest's
    protocol, `reps` rounds if given)."""
    p = planset.protocol
    protocol = Protocol(n_ctx=p["n_ctx"], chunks=p["chunks"], n_gen=p["n_gen"],
                        reps=reps or p["reps"], threads=p["threads"],
                        gpu_layers=p["gpu_layers"])
    paths = materialize(planset, workspace=workspace, source=source,
                        progress=lambda w, f: progress(f"materialize: {w}", f / 4))
    return _interleaved_rounds(paths, workspace=workspace, protocol=protocol,
                               condition=condition, run=run,
                               progress=lambda w, f: progress(w, 0.25 + 3 * f / 4))

