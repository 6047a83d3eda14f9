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
from apreqeld.core.metrics import mean_and_error, perplexity
from apreqeld.core.qtypes import AUTO_CANDIDATES, PAPER_TYPES, QType, parse_types, qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.errors import InputError
from apreqeld.evidence.protocol import Progress, Protocol, machine_description, no_progress
from apreqeld.evidence.reference import Reference, ensure_reference
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.storage import atomic_path


def measure_file(path: Path, /, *, protocol: Protocol, reference: Reference | None,
                 progress: Progress = no_progress, tokens: np.ndarray | None = None) -> dict:
    """Measure one GGUF: parameter bytes, ms per generated token, perplexity and KL divergence."""
    view = read_model(path)
    tokens = reference.tokens if reference is not None else tokens
    if tokens is None:
        raise InputError("no evaluation tokens: give a reference model or tokens")
    nll, kld, same = [], [], []
    with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        refs = reference.logprobs if reference is not None else None
        for i, chunk in enumerate(engine.perplexity_chunks(
                s, tokens, n_ctx=protocol.n_ctx, n_chunks=protocol.chunks, reference=refs)):
            nll.append(chunk.nll)
            if chunk.kld is not None:
                kld.append(chunk.kld)
                same.append(chunk.same_top)
            progress("perplexity", (i + 1) / protocol.chunks)
        progress("latency", 0.0)
        timing = engine.time_generation(s, n_gen=protocol.n_gen, reps=protocol.reps)
    ppl, ppl_se = perplexity(np.concatenate(nll))
    kld_mean, kld_se = mean_and_error(np.concatenate(kld)) if kld else (math.nan, math.nan)
    ms = np.asarray(timing.ms_per_token)
    return {
        "memory_bytes": view.parameter_bytes,
        "bpw": view.bits_per_weight,
        "latency_ms": float(ms.mean()),
        "latency_std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "latency_engine_ms": timing.engine_ms_per_token,
        "ppl": ppl, "ppl_se": ppl_se,
        "kld": kld_mean, "kld_se": kld_se,
        "top1_agreement": float(np.concatenate(same).mean()) if same else math.nan,
        "tensor_types": _type_counts(view),
    }


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
                  protocol: Protocol, workspace: Workspace, keep_models: bool = False,
                  progress: Progress = no_progress) -> dict:
    """The device profile: every uniform type built from the F16 reference and measured."""
    started = time.time()
    view = read_model(source)
    ladder = order_types(view, resolve_types(types, view))  # bad names fail before any work
    outside_type = qtype(outside)
    reference = ensure_reference(source, workspace=workspace, protocol=protocol,
                                 progress=progress)
    ref_key = measurement_key({"reference": "f16"}, reference, protocol)
    ref_metrics = cached_measurement(workspace, ref_key, lambda: measure_file(
        reference.path, protocol=protocol, reference=reference,
        progress=lambda w, f: progress(f"reference: {w}", f)))
    per_type: dict[str, dict] = {}
    for q in ladder:
        recipe = tensor_recipe(view, [q] * len(view.sublayers), outside=outside_type)

        def compute(q: QType = q) -> dict:
            progress(f"{q.name}: quantizing", 0.0)
            gguf = uniform_gguf(reference, q, outside=outside_type, workspace=workspace,
                                threads=protocol.threads)
            result = measure_file(gguf, protocol=protocol, reference=reference,
                                  progress=lambda w, f: progress(f"{q.name}: {w}", f))
            if not keep_models:
                gguf.unlink()
            return result

        measured = cached_measurement(workspace, measurement_key(recipe, reference, protocol),
                                      compute)
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
    """The uniform model of type `q` built from the reference (kept in the work directory)."""
    view = reference.source
    gguf = workspace.model_dir(reference.source_sha256) / f"uniform-{q.name}-{outside.name}.gguf"
    if not gguf.exists():
        recipe = tensor_recipe(view, [q] * len(view.sublayers), outside=outside)
        with atomic_path(gguf, suffix=".gguf") as tmp:
            engine.quantize(reference.path, tmp, tensor_types=recipe, base=q.name,
                            threads=threads)
    return gguf


def interleaved_latency(paths: Mapping[str, Path], /, *, protocol: Protocol,
                        progress: Progress = no_progress) -> dict[str, tuple[float, float]]:
    """ms per generated token of several models, measured in rounds (every model once per
    round, `protocol.reps` rounds) so that a machine whose speed drifts over minutes biases
    none of them; each round is one llama-bench tg run after a warm-up. Returns mean, std."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    total = protocol.reps * len(paths)
    for r in range(protocol.reps):
        for k, (name, path) in enumerate(paths.items()):
            with engine.open_session(path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                                     gpu_layers=protocol.gpu_layers) as s:
                timing = engine.time_generation(s, n_gen=protocol.n_gen, reps=1, seed=r)
            samples[name].append(timing.ms_per_token[0])
            progress(f"round {r + 1}/{protocol.reps}", (r * len(paths) + k + 1) / total)
    return {name: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            for name, v in samples.items()}


def _effective_counts(view: ModelView, q: QType) -> dict[str, int]:
    """How many sublayer tensors really get each type when `q` is asked for."""
    return _sorted_counts(t.type_as(q).name for s in view.sublayers for t in s.tensors
                          if t.quantizable)
