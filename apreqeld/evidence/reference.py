"""The F16 reference of a model and the evaluation data derived from it (tokens, log-probs)."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apreqeld import engine
from apreqeld.core.qtypes import qtype
from apreqeld.errors import InputError
from apreqeld.evidence.protocol import Progress, Protocol, no_progress
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.resources import evaluation_text
from apreqeld.storage import atomic_path
from apreqeld.store.fill import assembled


@dataclass(frozen=True)
class Reference:
    """The F16 reference of a model and the evaluation data derived from it."""

    source: ModelView
    source_sha256: str
    path: Path  # the F16 GGUF
    tokens: np.ndarray
    logprobs: tuple[engine.SparseLogprobs, ...]
    note: str


def assembled_models(reference: Reference | Path, source_sha256: str,
                     recipes: Mapping[Hashable, tuple[Mapping[str, str], str]], /, *,
                     workspace: Workspace, threads: int = 1,
                     progress: Progress = no_progress) -> dict[Hashable, Path]:
    """Recipes (key -> (tensor -> type, base type)) as models loadable from the shard store of
    the workspace's state directory: each missing shard quantized once from the reference,
    then linked (store.fill.assembled)."""
    path = reference.path if isinstance(reference, Reference) else Path(reference)
    _, found = assembled(workspace.store, path, source_sha256, recipes, threads=threads,
                         progress=progress)
    return {key: first for key, (first, _) in found.items()}


def assembled_model(reference: Reference, recipe: Mapping[str, str], base: str, /, *,
                    workspace: Workspace, threads: int = 1) -> Path:
    """One recipe as a loadable model (`assembled_models`)."""
    return assembled_models(reference, reference.source_sha256, {0: (recipe, base)},
                            workspace=workspace, threads=threads)[0]


def reference_caveat(view: ModelView, /) -> str | None:
    """One note for every accuracy report of a model stored below q8_0: its "F16 reference" is
    a dequantized copy, so types near the source's own grid look better than they are."""
    stored = view.file_type
    if stored is None or stored.bits_per_weight >= qtype("q8_0").bits_per_weight:
        return None
    return (f"note: the F16 reference is dequantized from {stored.name.upper()}, not the "
            f"original weights; types near {stored.name}'s own grid look better than they are")


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


