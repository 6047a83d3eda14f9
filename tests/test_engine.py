"""The llama.cpp engine: quantization with per-tensor types, decoding, timing."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from apreqeld import engine
from apreqeld.core.qtypes import from_ggml, qtype
from apreqeld.errors import EngineError, ModelError
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView
from apreqeld.resources import evaluation_text
from support import THREADS, TINY_BLOCK, uniform_path, write_tiny_gguf

# --------------------------------------------------------------------------- pure helpers


def _dense_logsumexp(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("shift", [0.0, 100.0])
def test_threaded_row_logsumexp_matches_float64(shift: float) -> None:
    """The row-parallel path (blocks of rows in a session's pool) equals a dense float64
    log-sum-exp, whatever the block boundaries."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(scale=4.0, size=(131, 2000)) + shift).astype(np.float32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = engine.row_logsumexp(logits, np.empty_like(logits), pool)
    assert threaded == pytest.approx(_dense_logsumexp(logits), rel=1e-6)
    assert threaded == pytest.approx(engine.row_logsumexp(logits, np.empty_like(logits)),
                                     rel=1e-6)


def test_kl_divergence_matches_a_dense_float64_computation() -> None:
    """KL(reference || model) per row from the sparse reference equals the dense float64 sum
    of p (log p - log q) over the tokens llama-perplexity keeps (reference log p > -16)."""
    rng = np.random.default_rng(4)
    ref_logits = rng.normal(scale=5.0, size=(7, 3000))
    model_logits = (ref_logits + rng.normal(scale=0.5, size=ref_logits.shape)).astype(np.float32)
    ref_logp = ref_logits - _dense_logsumexp(ref_logits)[:, None]
    model_logp = model_logits.astype(np.float64) - _dense_logsumexp(model_logits)[:, None]
    kept = ref_logp > engine.KLD_LOGPROB_FLOOR
    assert not kept.all()  # the floor matters for these rows
    dense = np.where(kept, np.exp(ref_logp) * (ref_logp - model_logp), 0.0).sum(axis=1)
    sparse = engine.SparseLogprobs.from_logprobs(ref_logp)
    lse = _dense_logsumexp(model_logits)
    got = sparse.kl_divergence(model_logits, lse, sparse.flat_index(model_logits.shape[1]))
    assert got == pytest.approx(dense, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("shift", [0.0, 100.0, -100.0])
def test_log_softmax_matches_float64(shift: float) -> None:
    rng = np.random.default_rng(2)
    logits = (rng.normal(scale=4.0, size=(5, 1000)) + shift).astype(np.float32)
    x = logits.astype(np.float64)
    direct = x - x.max(axis=1, keepdims=True)
    direct -= np.log(np.exp(direct).sum(axis=1, keepdims=True))
    assert engine.log_softmax(logits) == pytest.approx(direct, abs=1e-4)


def test_sparse_logprobs_keep_everything_above_the_floor() -> None:
    logp = np.log(np.array([[0.7, 0.3, 1e-9, 1e-30], [1e-12, 0.25, 0.25, 0.5]]))
    sparse = engine.SparseLogprobs.from_logprobs(logp)
    assert sparse.offsets.tolist() == [0, 2, 5]
    assert sparse.indices.tolist() == [0, 1, 1, 2, 3]
    assert sparse.values == pytest.approx(np.log([0.7, 0.3, 0.25, 0.25, 0.5]))
    assert sparse.argmax.tolist() == [0, 3]


# --------------------------------------------------------------------------- quantization


@pytest.mark.integration
def test_k_quant_fallbacks_are_what_llama_cpp_writes(
        reference: Reference, source_view: ModelView, tmp_path: Path) -> None:
    """Every K-quant, asked for tensors of both row lengths (576 and 1536), comes out of
    llama.cpp with exactly the type Tensor.type_as predicts; the fallback count matches."""
    asked = ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_xs"]
    quantizable = [t for t in source_view.tensors if t.quantizable]
    recipe = {t.name: asked[i % len(asked)] for i, t in enumerate(quantizable)}
    out = tmp_path / "k-mix.gguf"
    engine.quantize(reference.path, out, tensor_types=recipe, base="q8_0", threads=THREADS)
    stored = {t.name: from_ggml(t.tensor_type).name for t in GGUFReader(out).tensors}
    predicted = {t.name: t.type_as(qtype(recipe[t.name])).name if t.quantizable else "f32"
                 for t in source_view.tensors}
    assert stored == predicted
    pairs = Counter((recipe[t.name], t.shape[0], stored[t.name]) for t in quantizable)
    for name in asked:  # both row lengths were exercised for every asked type
        assert {n for (a, n, _) in pairs if a == name} == {576, 1536}
    assert pairs[("q4_K", 576, "q5_0")] and pairs[("q4_K", 1536, "q4_K")]
    assert pairs[("q3_K", 576, "q4_0")] and pairs[("q6_K", 576, "q8_0")]
    assert pairs[("q5_K", 576, "q5_1")] and pairs[("iq4_xs", 576, "iq4_nl")]
    fell_back = sum(stored[t.name] != recipe[t.name] for t in quantizable)
    assert fell_back > 0
    assert engine.quantize(reference.path, tmp_path / "again.gguf", tensor_types=recipe,
                           base="q8_0", threads=THREADS) == fell_back


@pytest.mark.integration
def test_llama_log_lines_stay_in_the_thread_that_caused_them(tmp_path: Path) -> None:
    """llama.cpp's log is collected per thread: a failure in one thread is reported there and
    leaves nothing in another thread's log (a daemon's requests do not see each other's)."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", TINY_BLOCK, block_count=1)
    errors: list[Exception] = []

    def fail() -> None:
        try:
            engine.quantize(tiny, tmp_path / "out.gguf", base="q8_0", threads=THREADS)
        except EngineError as exc:
            errors.append(exc)

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "context_length" in str(errors[0])
    assert "context_length" not in engine._recent_log()


@pytest.mark.integration
def test_quantize_failure_is_an_engine_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match=r"^llama\.cpp could not quantize .*bogus\.gguf: "):
        engine.quantize(bogus, tmp_path / "out.gguf", base="q8_0", threads=THREADS)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.integration
def test_load_failure_is_a_model_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"^llama\.cpp could not load .*bogus\.gguf: "):
        with engine.open_session(bogus, n_ctx=64, threads=THREADS):
            pass


# --------------------------------------------------------------------------- sessions


@pytest.mark.integration
def test_session_tokenizes_like_the_evaluation_tokens(reference: Reference) -> None:
    with engine.open_session(reference.path, n_ctx=64, threads=THREADS) as s:
        assert s.n_vocab == 49152 and s.n_embd == 576
        assert s.add_bos is False  # SmolLM2's vocabulary adds no BOS
        tokens = s.tokenize(evaluation_text()[:2000])
        assert tokens.dtype == np.int32 and len(tokens) > 100
        # a prefix of the text tokenizes like the whole text, up to the cut
        assert np.array_equal(tokens[:-5], reference.tokens[:len(tokens) - 5])
        with pytest.raises(EngineError, match="^batch of 65 tokens exceeds the context's "
                                              "n_batch 64$"):
            s.decode(np.zeros(65, dtype=np.int32))


@pytest.mark.integration
def test_generation_timing(device_profile: dict, workspace: Workspace,
                           reference: Reference) -> None:
    with engine.open_session(uniform_path(workspace, reference, "q4_0"), n_ctx=64,
                             threads=THREADS) as s:
        timing = engine.time_generation(s, n_gen=4, reps=2)
    assert timing.n_gen == 4
    assert len(timing.ms_per_token) == 2
    assert all(ms > 0 for ms in timing.ms_per_token)
    wall = float(np.mean(timing.ms_per_token))
    assert wall / 2 <= timing.engine_ms_per_token <= wall * 2
    # the profile's stored figures obey the same relation
    for m in [device_profile["reference"]["measured"]] + [
            device_profile["uniform"][n]["measured"] for n in device_profile["types"]]:
        assert m["latency_ms"] > 0 and m["latency_std_ms"] >= 0
        assert m["latency_ms"] / 2 <= m["latency_engine_ms"] <= m["latency_ms"] * 2
