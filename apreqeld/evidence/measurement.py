"""Measure GGUF models on this machine: memory, latency and accuracy, cached and resumable.

Memory is the exact parameter bytes of the file; latency is llama-bench's tg protocol;
accuracy is llama-perplexity's protocol (perplexity) and the mean KL divergence from the F16
reference on the same tokens. Every finished measurement is stored under the work directory,
keyed by what determines it, so a second run (or an interrupted one) re-measures nothing.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from apreqeld import __version__, engine
from apreqeld.core.disturbance import (
    BOUNDS,
    CLEAN,
    Bounds,
    latency_record,
    sample_disturbed,
    stolen_share,
)
from apreqeld.core.metrics import mean_and_error, perplexity
from apreqeld.core.qtypes import AUTO_CANDIDATES, PAPER_TYPES, QType, parse_types, qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.errors import InputError
from apreqeld.evidence.conditions import Window, combine, observe
from apreqeld.evidence.protocol import Progress, Protocol, machine_description, no_progress
from apreqeld.evidence.reference import Reference, assembled_model, ensure_reference
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import ModelView, read_model

LATENCY_TRIES = 3  # timings of one measurement at most, while it stays disturbed
LATENCY_BACKOFF_S = 0.5  # wait before the 2nd try; doubled before each later one
REMEASURABLE = ("latency",)


def measure_file(path: Path, /, *, protocol: Protocol, reference: Reference | None,
                 progress: Progress = no_progress, tokens: np.ndarray | None = None,
                 bounds: Bounds = BOUNDS, tries: int = LATENCY_TRIES) -> dict:
    """Measure one GGUF: parameter bytes, ms per generated token, perplexity and KL divergence;
    `progress` gets one fraction for the whole measurement, never going back."""
    view = read_model(path)
    tokens = reference.tokens if reference is not None else tokens
    if tokens is None:
        raise InputError("no evaluation tokens: give a reference model or tokens")
    with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        # one fraction for the whole file: scoring takes it to 0.9, timing the rest
        scores = _score(s, tokens, reference, protocol, lambda w, f: progress(w, 0.9 * f))
        progress("latency", 0.9)
        latency = time_latency(s, protocol=protocol, bounds=bounds, tries=tries)
    return {
        "memory_bytes": view.parameter_bytes,
        "bpw": view.bits_per_weight,
        **latency_fields(latency),
        **scores,
        "tensor_types": _type_counts(view),
    }


def score_file(path: Path, /, *, protocol: Protocol, reference: Reference,
               progress: Progress = no_progress) -> dict:
    """Accuracy only (perplexity, KL divergence, top-1 agreement): no timing."""
    with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        return _score(s, reference.tokens, reference, protocol, progress)


def _score(session: engine.Session, tokens: np.ndarray, reference: Reference | None,
           protocol: Protocol, progress: Progress) -> dict:
    nll, kld, same = [], [], []
    refs = reference.logprobs if reference is not None else None
    for i, chunk in enumerate(engine.perplexity_chunks(
            session, tokens, n_ctx=protocol.n_ctx, n_chunks=protocol.chunks, reference=refs)):
        nll.append(chunk.nll)
        if chunk.kld is not None:
            kld.append(chunk.kld)
            same.append(chunk.same_top)
        progress("perplexity", (i + 1) / protocol.chunks)
    ppl, ppl_se = perplexity(np.concatenate(nll))
    kld_mean, kld_se = mean_and_error(np.concatenate(kld)) if kld else (math.nan, math.nan)
    return {"ppl": ppl, "ppl_se": ppl_se, "kld": kld_mean, "kld_se": kld_se,
            "top1_agreement": float(np.concatenate(same).mean()) if same else math.nan}


def time_latency(session: engine.Session, /, *, protocol: Protocol, bounds: Bounds = BOUNDS,
                 tries: int = LATENCY_TRIES, backoff_s: float = LATENCY_BACKOFF_S) -> dict:
    """llama-bench tg (a warm-up, then `protocol.reps` runs), each run watched for contention;
    a disturbed measurement is timed again (at most `tries` times, with backoff) and the least
    disturbed attempt is kept, marked as such."""
    engine.time_generation(session, n_gen=1, reps=1, warmup=True)
    best: dict | None = None
    for attempt in range(1, max(1, tries) + 1):
        record = _timed_reps(session, protocol, bounds, seed=1000 * attempt)
        record["attempts"] = attempt
        if record["quality"] == CLEAN:
            return record
        if best is None or (record["stolen"] or 0.0) <= (best["stolen"] or 0.0):
            best = record
        if attempt < tries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return best | {"attempts": max(1, tries)}


def _timed_reps(session: engine.Session, protocol: Protocol, bounds: Bounds, *,
                seed: int) -> dict:
    samples: list[float] = []
    windows: list[Window] = []
    engine_ms: list[float] = []
    for r in range(protocol.reps):
        with observe() as w:
            timing = engine.time_generation(session, n_gen=protocol.n_gen, reps=1,
                                            seed=seed + r, warmup=False)
        samples.append(timing.ms_per_token[0])
        engine_ms.append(timing.engine_ms_per_token)
        windows.append(w)
    stolen = [stolen_share(w.others_cpu_s, w.wall_s, cores=w.cores, threads=protocol.threads)
              for w in windows]
    return latency_record(samples, stolen, combine(windows), threads=protocol.threads,
                          bounds=bounds) | {"engine_ms": float(np.mean(engine_ms))}


def latency_fields(record: dict) -> dict:
    """The latency keys of a measurement: llama-bench mean and std (as before), median, IQR,
    quality, and the whole record (samples, conditions, verdict) under "latency"."""
    return {"latency_ms": record["mean_ms"], "latency_std_ms": record["std_ms"],
            "latency_engine_ms": record["engine_ms"],
            "latency_median_ms": record["median_ms"], "latency_iqr_ms": record["iqr_ms"],
            "latency_quality": record["quality"], "latency": record}


def retime_file(path: Path, /, *, protocol: Protocol, bounds: Bounds = BOUNDS,
                tries: int = LATENCY_TRIES) -> dict:
    """Only the latency keys of `path` (no perplexity, no KL divergence)."""
    with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        return latency_fields(time_latency(s, protocol=protocol, bounds=bounds, tries=tries))


def _type_counts(view: ModelView) -> dict[str, int]:
    """How many quantizable tensors of the file have each type."""
    return _sorted_counts(t.qtype.name for t in view.tensors if t.quantizable)


def _sorted_counts(names: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(names).items()))


def auto_types(view: ModelView, /, *, max_types: int = 5) -> tuple[QType, ...]:
    """A ladder of types that every sublayer tensor accepts as asked (no K-quant fallback),
    one per distinct bits per weight, spread from the least to the most aggressive."""
    tensors = [t for s in view.sublayers for t in s.tensors if t.quantizable]
    accepted: dict[float, QType] = {}
    for name in AUTO_CANDIDATES:
        q = qtype(name)
        if all(t.type_as(q) == q for t in tensors):
            accepted.setdefault(q.bits_per_weight, q)
    ladder = [accepted[b] for b in sorted(accepted, reverse=True)]
    if len(ladder) > max_types:
        picks = np.unique(np.round(np.linspace(0, len(ladder) - 1, max_types)).astype(int))
        ladder = [ladder[i] for i in picks]
    return tuple(ladder)


def resolve_types(spec: str | None, view: ModelView) -> tuple[QType, ...]:
    """`None`: the paper's K-quant set; "auto": a fallback-free ladder; else a comma list."""
    if spec is None:
        return tuple(qtype(n) for n in PAPER_TYPES)
    if spec.strip().lower() == "auto":
        return auto_types(view)
    return parse_types(spec)


def order_types(view: ModelView, types: Sequence[QType]) -> tuple[QType, ...]:
    """Least to most aggressive, by the bytes the sublayers really get (after fallbacks)."""
    def sublayer_bytes(q: QType) -> int:
        return sum(s.bytes_as(q) for s in view.sublayers)

    return tuple(sorted(types, key=lambda q: (-sublayer_bytes(q), q.name)))


def measure_types(source: Path, /, *, types: str | None = None, outside: str = "q8_0",
                  protocol: Protocol, workspace: Workspace,
                  progress: Progress = no_progress, remeasure: Sequence[str] = ()) -> dict:
    """The device profile: every uniform type built from the F16 reference and measured.
    A cached latency comes back with its quality (disturbed ones marked, never as clean);
    `remeasure=("latency",)` re-times every one (a model is rebuilt only where it was deleted;
    accuracy is never re-scored)."""
    unknown = set(remeasure) - set(REMEASURABLE)
    if unknown:
        raise InputError(f"cannot remeasure '{sorted(unknown)[0]}' "
                         f"(choose {', '.join(REMEASURABLE)})")
    again = "latency" in remeasure
    started = time.time()
    view = read_model(source)
    ladder = order_types(view, resolve_types(types, view))  # bad names fail before any work
    outside_type = qtype(outside)
    reference = ensure_reference(source, workspace=workspace, protocol=protocol,
                                 progress=progress)
    ref_key = measurement_key({"reference": "f16"}, reference, protocol)
    ref_metrics = cached_measurement(workspace, ref_key, lambda: measure_file(
        reference.path, protocol=protocol, reference=reference,
        progress=lambda w, f: progress(f"reference: {w}", f)),
        retime=(lambda old: old | retime_file(reference.path, protocol=protocol)) if again
        else None, again=again)
    per_type: dict[str, dict] = {}
    for q in ladder:
        recipe = tensor_recipe(view, [q] * len(view.sublayers), outside=outside_type)

        def compute(q: QType = q) -> dict:
            progress(f"{q.name}: assembling", 0.0)
            gguf = uniform_gguf(reference, q, outside=outside_type, workspace=workspace,
                                threads=protocol.threads)
            return measure_file(gguf, protocol=protocol, reference=reference,
                                progress=lambda w, f: progress(f"{q.name}: {w}", f))

        def retime(old: dict, q: QType = q) -> dict:
            progress(f"{q.name}: re-timing", 0.0)
            gguf = uniform_gguf(reference, q, outside=outside_type, workspace=workspace,
                                threads=protocol.threads)
            return old | retime_file(gguf, protocol=protocol)

        measured = cached_measurement(workspace, measurement_key(recipe, reference, protocol),
                                      compute, retime=retime if again else None, again=again)
        per_type[q.name] = {
            "requested": q.name,
            "nominal_bpw": q.bits_per_weight,
            "sublayer_bytes": sum(s.bytes_as(q) for s in view.sublayers),
            "effective_types": _effective_counts(view, q),
            "measured": measured,
        }
    return {
        "kind": "apreqel.device-profile",
        "format": 1,
        "apreqel": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"path": str(source), "sha256": reference.source_sha256, "name": view.name,
                  "architecture": view.architecture, "n_blocks": view.n_blocks,
                  "n_sublayers": len(view.sublayers),
                  "stored_type": view.file_type.name if view.file_type else None},
        "reference": {"type": "f16", "note": reference.note, "measured": ref_metrics},
        "device": machine_description(protocol),
        "protocol": protocol.to_dict(),
        "policy": {"outside_type": outside_type.name,
                   "note": "token embedding, output and every tensor outside the sublayers get "
                           "this type in every uniform and mixed model"},
        "types": [q.name for q in ladder],
        "uniform": per_type,
        "elapsed_s": round(time.time() - started, 1),
    }


def uniform_gguf(reference: Reference, q: QType, /, *, outside: QType, workspace: Workspace,
                 threads: int = 0) -> Path:
    """The uniform model of type `q` (`outside` for the tensors outside the sublayers),
    assembled from the shard store."""
    view = reference.source
    recipe = tensor_recipe(view, [q] * len(view.sublayers), outside=outside)
    return assembled_model(reference, recipe, outside.name, workspace=workspace,
                           threads=threads or engine.default_threads())


def interleaved_latency(paths: Mapping[str, Path], /, *, protocol: Protocol,
                        progress: Progress = no_progress) -> dict[str, tuple[float, float]]:
    """ms per generated token of several models, measured in rounds (every model once per
    round, `protocol.reps` rounds) so that a machine whose speed drifts over minutes biases
    none of them; each round is one llama-bench tg run after a warm-up. Returns mean, std."""
    rounds = interleaved_rounds(paths, protocol=protocol, progress=progress)
    return {name: (r["mean_ms"], r["std_ms"]) for name, r in rounds.items()}


def interleaved_rounds(paths: Mapping[str, Path], /, *, protocol: Protocol,
                       progress: Progress = no_progress, bounds: Bounds = BOUNDS,
                       tries: int = LATENCY_TRIES,
                       backoff_s: float = LATENCY_BACKOFF_S) -> dict[str, dict]:
    """`interleaved_latency` with each run watched: a round in which another process stole
    from any run is run again (at most `tries` times, with backoff); returns each model's
    latency record (median, IQR, mean, std, per-sample flags, conditions, quality)."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    stolen: dict[str, list[float | None]] = {name: [] for name in paths}
    windows: dict[str, list[Window]] = {name: [] for name in paths}
    total = protocol.reps * len(paths)
    for r in range(protocol.reps):
        for attempt in range(1, max(1, tries) + 1):
            got = {name: _one_run(path, protocol, seed=1000 * attempt + r)
                   for name, path in paths.items()}
            if not any(sample_disturbed(s, bounds) for _, s, _ in got.values()) or attempt == tries:
                break
            time.sleep(backoff_s * 2 ** (attempt - 1))
        for name, (ms, s, w) in got.items():
            samples[name].append(ms)
            stolen[name].append(s)
            windows[name].append(w)
        progress(f"round {r + 1}/{protocol.reps}", (r + 1) * len(paths) / total)
    return {name: latency_record(samples[name], stolen[name], combine(windows[name]),
                                 threads=protocol.threads, bounds=bounds)
            for name in paths}


def _one_run(path: Path, protocol: Protocol, *, seed: int) -> tuple[float, float | None, Window]:
    """One llama-bench tg run of `path` after a warm-up: ms per token, share stolen, window."""
    with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        engine.time_generation(s, n_gen=1, reps=1, warmup=True)
        with observe() as w:
            timing = engine.time_generation(s, n_gen=protocol.n_gen, reps=1, seed=seed,
                                            warmup=False)
    share = stolen_share(w.others_cpu_s, w.wall_s, cores=w.cores, threads=protocol.threads)
    return timing.ms_per_token[0], share, w


def _effective_counts(view: ModelView, q: QType) -> dict[str, int]:
    """How many sublayer tensors really get each type when `q` is asked for."""
    return _sorted_counts(t.type_as(q).name for s in view.sublayers for t in s.tensors
                          if t.quantizable)
