"""Measure GGUF models on this machine: memory, latency and accuracy, cached and resumable.

Memory is the exact parameter bytes of the file; latency is llama-bench's tg protocol;
accuracy is llama-perplexity's protocol (perplexity) and the mean KL divergence from the F16
reference on the same tokens. Every finished measurement is stored under the work directory,
keyed by what determines it, so a second run (or an interrupted one) re-measures nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import __version__, engine
from .errors import InputError
from .metrics import mean_and_error, perplexity
from .model import ModelView, file_sha256, read_model
from .qtypes import AUTO_CANDIDATES, PAPER_TYPES, QType, parse_types, qtype
from .recipe import tensor_recipe
from .resources import EVAL_TEXT_NAME, evaluation_text
from .storage import atomic_path, default_workdir, write_json_atomic

Progress = Callable[[str, float], None]  # (what is happening, fraction done of this step)


def no_progress(_what: str, _fraction: float) -> None:
    """The default progress callback: report nothing."""
    pass


@dataclass(frozen=True)
class Protocol:
    """Everything that determines a measurement besides the model file itself."""

    n_ctx: int = 512
    chunks: int = 8
    n_gen: int = 64
    reps: int = 5
    threads: int = field(default_factory=engine.default_threads)
    gpu_layers: int = 0
    text: str = EVAL_TEXT_NAME

    def __post_init__(self) -> None:
        for name in ("n_ctx", "chunks", "n_gen", "reps", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('n_', '')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.n_ctx % 2 or self.n_ctx < 8:
            raise InputError(f"context must be an even number of at least 8, got {self.n_ctx}")
        if self.gpu_layers < 0:
            raise InputError(f"gpu-layers must be >= 0, got {self.gpu_layers}")

    @property
    def tokens_scored(self) -> int:
        return self.chunks * (self.n_ctx - self.n_ctx // 2 - 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_scored": self.tokens_scored,
                               "scoring": "llama-perplexity: chunks of ctx tokens, BOS first "
                                          "when the vocabulary adds one, second half scored",
                               "latency": "llama-bench tg: warm-up, then reps runs of n_gen "
                                          "one-token decodes; ms per token"}


def machine_description(protocol: Protocol) -> dict:
    """Where the numbers come from: CPU, GPU backend, threads, llama.cpp build."""
    gpu = engine.gpu_offload_supported()
    return {"cpu": engine.cpu_description(), "gpu": "GPU backend" if gpu else None,
            "gpu_offload": gpu, "threads": protocol.threads,
            "gpu_layers": protocol.gpu_layers if gpu else 0,
            "llama_cpp": engine.engine_version(), "system_info": engine.system_info()}


class Workspace:
    """The work directory: reference model, tokens, reference log-probs, measurement cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_workdir()
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, sha: str) -> Path:
        d = self.root / "models" / sha[:16]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def measurement_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{key}.json"

    def sha256(self, path: Path) -> str:
        return file_sha256(path, cache_dir=self.root)


@dataclass(frozen=True)
class Reference:
    """The F16 reference of a model and the evaluation data derived from it."""

    source: ModelView
    source_sha256: str
    path: Path  # the F16 GGUF
    tokens: np.ndarray
    logprobs: tuple[engine.SparseLogprobs, ...]
    note: str


def reference_file(source: Path, /, *, workspace: Workspace,
                   progress: Progress = no_progress) -> Path:
    """The F16 reference of `source`, made once with llama.cpp and kept in the work directory."""
    read_model(source)
    ref_path = workspace.model_dir(workspace.sha256(source)) / "reference-f16.gguf"
    if not ref_path.exists():
        progress("making the F16 reference", 0.0)
        with atomic_path(ref_path, suffix=".gguf") as tmp:
            engine.quantize(source, tmp, base="f16")
    return ref_path


def ensure_reference(source: Path, /, *, workspace: Workspace, protocol: Protocol,
                     progress: Progress = no_progress) -> Reference:
    """Make (once) the F16 reference of `source`, its evaluation tokens and its log-probs."""
    view = read_model(source)
    sha = workspace.sha256(source)
    folder = workspace.model_dir(sha)
    ref_path = reference_file(source, workspace=workspace, progress=progress)
    kind = view.file_type.name.upper() if view.file_type else "its stored types"
    note = f"F16 dequantized from {kind} (the precision the model ships in)"
    text = evaluation_text()
    text_sha = hashlib.sha256(text.encode()).hexdigest()[:12]
    tok_path = folder / f"tokens-{text_sha}.npy"
    if tok_path.exists():
        tokens = np.load(tok_path)
    else:
        with engine.open_session(ref_path, n_ctx=protocol.n_ctx, threads=protocol.threads) as s:
            tokens = s.tokenize(text)
        with atomic_path(tok_path, suffix=".npy") as tmp:
            with tmp.open("wb") as f:
                np.save(f, tokens)
    available = len(tokens) // protocol.n_ctx
    if protocol.chunks > available:
        raise InputError(f"the evaluation text has only {available} chunks of "
                         f"{protocol.n_ctx} tokens; asked for {protocol.chunks}")
    lp_path = folder / f"reference-logprobs-{text_sha}-c{protocol.n_ctx}-n{protocol.chunks}.npz"
    logprobs = _load_logprobs(lp_path) if lp_path.exists() else None
    if logprobs is None:
        logprobs = _reference_logprobs(ref_path, tokens, protocol, progress)
        with atomic_path(lp_path, suffix=".npz") as tmp:
            with tmp.open("wb") as f:
                np.savez(f, **{f"{k}{i}": getattr(lp, k) for i, lp in enumerate(logprobs)
                               for k in ("offsets", "indices", "values", "argmax")})
    return Reference(view, sha, ref_path, tokens, tuple(logprobs), note)


def _load_logprobs(path: Path) -> list[engine.SparseLogprobs]:
    with np.load(path) as z:
        n = sum(1 for k in z.files if k.startswith("offsets"))
        return [engine.SparseLogprobs(z[f"offsets{i}"], z[f"indices{i}"], z[f"values{i}"],
                                      z[f"argmax{i}"]) for i in range(n)]


def _reference_logprobs(ref_path: Path, tokens: np.ndarray, protocol: Protocol,
                        progress: Progress) -> list[engine.SparseLogprobs]:
    kept: list[engine.SparseLogprobs] = []

    def keep(i: int, logp: np.ndarray) -> None:
        kept.append(engine.SparseLogprobs.from_logprobs(logp))
        progress("reference log-probs", (i + 1) / protocol.chunks)

    with engine.open_session(ref_path, n_ctx=protocol.n_ctx, threads=protocol.threads,
                             gpu_layers=protocol.gpu_layers) as s:
        for _ in engine.perplexity_chunks(s, tokens, n_ctx=protocol.n_ctx,
                                          n_chunks=protocol.chunks, keep_logprobs=keep):
            pass
    return kept


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


def cached_measurement(workspace: Workspace, key_parts: dict, compute: Callable[[], dict]) -> dict:
    """Return the stored measurement for `key_parts`, or compute, store and return it."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = workspace.measurement_path(key)
    if path.exists():
        try:
            return json.loads(path.read_text())["result"]
        except (ValueError, KeyError):
            path.unlink()
    result = compute()
    write_json_atomic(path, {"key": key_parts, "result": result,
                             "measured": datetime.now(UTC).isoformat(timespec="seconds")})
    return result


def measurement_key(tensor_types: dict[str, str], reference: Reference, protocol: Protocol) -> dict:
    """What a measurement of a model built from `reference` with `tensor_types` depends on."""
    recipe = hashlib.sha256(json.dumps(tensor_types, sort_keys=True).encode()).hexdigest()
    return {"model": reference.source_sha256, "recipe": recipe, "engine": engine.engine_version(),
            "protocol": asdict(protocol), "apreqel_measure": 1}


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
