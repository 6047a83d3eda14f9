"""Measurements on the real default model: memory, accuracy, KL divergence, caching and resume."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader

from apreqeld import engine
from apreqeld.core.metrics import mean_and_error, perplexity
from apreqeld.core.qtypes import effective_type, from_ggml, parse_types, qtype
from apreqeld.errors import InputError
from apreqeld.evidence import measurement as measure
from apreqeld.evidence.measurement import measure_types, order_types
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.split import split_files
from apreqeld.gguf.view import ModelView
from apreqeld.resources import evaluation_text
from support import (
    INTERRUPT_AFTER,
    INTERRUPTED_ON,
    PROTOCOL,
    THREADS,
    TINY_TYPES,
    MeasureHistory,
    uniform_path,
)

# llama-perplexity -m reference-f16.gguf -f wiki.test.raw -c 512 --chunks 8 (same llama.cpp
# build as llama-cpp-python 0.3.36) reports this final estimate for the default model.
LLAMA_PERPLEXITY_F16_8_CHUNKS = 24.3749

# --------------------------------------------------------------------------- statistics


def test_mean_and_error_is_llama_cpp_mean_and_uncertainty() -> None:
    values = np.array([2.0, 3.5, 1.25, 4.0, 0.5, 2.75])
    mean, err = mean_and_error(values)
    assert mean == pytest.approx(values.mean(), rel=1e-15)
    assert err == pytest.approx(np.std(values) / math.sqrt(len(values) - 1), rel=1e-12)


def test_mean_and_error_edge_cases() -> None:
    assert all(math.isnan(x) for x in mean_and_error(np.array([])))
    mean, err = mean_and_error(np.array([1.5]))
    assert mean == 1.5 and math.isnan(err)
    assert mean_and_error(np.full(10, 0.1)) == pytest.approx((0.1, 0.0), abs=1e-9)


def test_perplexity_is_exp_mean_nll_with_delta_method_error() -> None:
    rng = np.random.default_rng(1)
    nll = rng.gamma(2.0, 1.5, size=255)
    ppl, se = perplexity(nll)
    assert ppl == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert se == pytest.approx(ppl * nll.std() / math.sqrt(len(nll) - 1), rel=1e-12)


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chunks": 0}, "^chunks must be at least 1, got 0$"),
     ({"reps": -2}, "^reps must be at least 1, got -2$"),
     ({"n_gen": 0}, "^gen must be at least 1, got 0$"),
     ({"threads": 0}, "^threads must be at least 1, got 0$"),
     ({"n_ctx": 511}, "^context must be an even number of at least 8, got 511$"),
     ({"n_ctx": 6}, "^context must be an even number of at least 8, got 6$"),
     ({"gpu_layers": -1}, "^gpu-layers must be >= 0, got -1$")],
)
def test_protocol_rejects_bad_budgets(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Protocol(**kwargs)


def test_protocol_counts_scored_tokens() -> None:
    assert PROTOCOL.tokens_scored == 255
    assert Protocol(chunks=8).tokens_scored == 8 * 255


# --------------------------------------------------------------------------- type ladders


@pytest.mark.integration
def test_types_are_ordered_least_to_most_aggressive(source_view: ModelView) -> None:
    ladder = order_types(source_view, parse_types("q4_0,q8_0,q5_0,q6_K,q4_K"))
    # q6_K falls back to q8_0 on 576-wide rows, so it is bigger than q5_0 but below q8_0;
    # q4_K falls back to q5_0 on most tensors, so it sits between q5_0 and q4_0.
    assert [q.name for q in ladder] == ["q8_0", "q6_K", "q5_0", "q4_K", "q4_0"]


@pytest.mark.integration
def test_auto_types_are_fallback_free(source_view: ModelView) -> None:
    ladder = measure.resolve_types("auto", source_view)
    assert [q.name for q in ladder] == ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
    for q in ladder:
        for s in source_view.sublayers:
            assert all(t.type_as(q) == q for t in s.tensors if t.quantizable)


# --------------------------------------------------------------------------- uniform models


@pytest.mark.integration
def test_device_profile_shape(device_profile: dict, reference: Reference) -> None:
    assert device_profile["kind"] == "apreqel.device-profile"
    assert device_profile["types"] == ["q8_0", "q4_0"]
    assert device_profile["model"]["sha256"] == reference.source_sha256
    assert device_profile["model"]["n_sublayers"] == 60
    assert device_profile["reference"]["note"].startswith("F16 dequantized from Q4_1")
    assert device_profile["protocol"]["tokens_scored"] == 255
    assert device_profile["policy"]["outside_type"] == "q8_0"


@pytest.mark.integration
def test_uniform_memory_is_the_sum_of_its_tensor_bytes(
        device_profile: dict, workspace: Workspace, reference: Reference,
        source_view: ModelView) -> None:
    path = uniform_path(workspace, reference, "q4_0")
    tensors = [t for f in split_files(path) for t in GGUFReader(f).tensors]
    measured = device_profile["uniform"]["q4_0"]["measured"]
    assert measured["memory_bytes"] == sum(int(t.n_bytes) for t in tensors)
    stored = {t.name: from_ggml(t.tensor_type).name for t in tensors}
    q4_0, q8_0 = qtype("q4_0"), qtype("q8_0")
    for s in source_view.sublayers:
        for t in s.tensors:
            want = effective_type(q4_0, t.shape[0]).name if t.quantizable else "f32"
            assert stored[t.name] == want, t.name
    for t in source_view.outside:
        want = effective_type(q8_0, t.shape[0]).name if t.quantizable else "f32"
        assert stored[t.name] == want, t.name
    quantizable = Counter(stored[t.name] for t in source_view.tensors if t.quantizable)
    assert measured["tensor_types"] == dict(quantizable)
    # what the profile predicts for the sublayers is what the file holds
    sublayer_bytes = sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk."))
    assert device_profile["uniform"]["q4_0"]["sublayer_bytes"] == sublayer_bytes


@pytest.mark.integration
def test_reference_against_itself_has_no_divergence(device_profile: dict) -> None:
    ref = device_profile["reference"]["measured"]
    assert abs(ref["kld"]) < 1e-6
    assert ref["top1_agreement"] == 1.0
    assert ref["tensor_types"] == {"f16": 211}


@pytest.mark.integration
def test_q4_0_diverges_more_than_q8_0(device_profile: dict) -> None:
    q4 = device_profile["uniform"]["q4_0"]["measured"]
    q8 = device_profile["uniform"]["q8_0"]["measured"]
    assert 0 < q8["kld"] < q4["kld"]
    assert q4["top1_agreement"] < q8["top1_agreement"] < 1.0
    assert q4["memory_bytes"] < q8["memory_bytes"]
    assert q8["ppl"] < q4["ppl"]
    for m in (q4, q8):
        assert m["kld_se"] > 0 and m["ppl_se"] > 0


# --------------------------------------------------------------------------- llama.cpp's protocol


@pytest.fixture(scope="module")
def f16_chunk_nll(reference: Reference) -> list[np.ndarray]:
    """Per-chunk NLL of the F16 reference on 8 chunks of 512 tokens (apreqel's engine)."""
    with engine.open_session(reference.path, n_ctx=512, threads=THREADS) as s:
        return [c.nll for c in engine.perplexity_chunks(s, reference.tokens, n_ctx=512,
                                                        n_chunks=8)]


def _independent_perplexity(model: Path, n_chunks: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """llama-perplexity's protocol written from scratch on llama-cpp-python's high-level API.

    flash_attn=True: llama-perplexity runs with llama.cpp's default flash-attention "auto",
    which is on for the CPU backend; llama_cpp.Llama defaults to off, which shifts the
    perplexity by ~3e-4 relative (a different attention kernel, not a different protocol)."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_batch=512, logits_all=True,
                          verbose=False, n_threads=THREADS, n_threads_batch=THREADS,
                          flash_attn=True)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        tokens = np.asarray(llm.tokenize(evaluation_text().encode("utf-8"), add_bos=True,
                                         special=False), dtype=np.int32)
        nll = []
        for i in range(n_chunks):
            chunk = tokens[i * 512:(i + 1) * 512].copy()
            if add_bos:
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk.tolist())
            logits = np.asarray(llm.scores[256:511], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            targets = tokens[i * 512 + 257:(i + 1) * 512]
            nll.append(-logp[np.arange(255), targets])
        return tokens, nll
    finally:
        llm.close()


@pytest.mark.integration
def test_reference_perplexity_matches_an_independent_implementation(
        reference: Reference, device_profile: dict, f16_chunk_nll: list[np.ndarray]) -> None:
    tokens, nll = _independent_perplexity(reference.path, 2)
    assert np.array_equal(tokens, reference.tokens)
    independent = math.exp(np.concatenate(nll).mean())
    ours = math.exp(np.concatenate(f16_chunk_nll[:2]).mean())
    assert ours == pytest.approx(independent, rel=1e-4)
    # the same figure through measure_file (the profile's reference: 1 chunk)
    measured = device_profile["reference"]["measured"]["ppl"]
    assert measured == pytest.approx(math.exp(nll[0].mean()), rel=1e-4)
    assert measured == pytest.approx(math.exp(f16_chunk_nll[0].mean()), rel=1e-9)


@pytest.mark.integration
def test_reference_perplexity_matches_llama_perplexity_on_8_chunks(
        f16_chunk_nll: list[np.ndarray]) -> None:
    assert [len(n) for n in f16_chunk_nll] == [255] * 8
    ppl, _ = perplexity(np.concatenate(f16_chunk_nll))
    assert ppl == pytest.approx(LLAMA_PERPLEXITY_F16_8_CHUNKS, abs=0.005)


# --------------------------------------------------------------------------- caching and resume


@pytest.mark.integration
def test_second_run_measures_only_the_new_type(measure_history: MeasureHistory) -> None:
    """After measuring q4_0,q8_0, measuring q4_0,q5_0,q8_0 measures q5_0 and nothing else."""
    assert measure_history.second == ["q5_0"]
    assert measure_history.second_quantized == ["q5_0"]
    assert measure_history.second_profile["types"] == ["q8_0", "q5_0", "q4_0"]


@pytest.mark.integration
def test_second_run_reuses_the_stored_measurements(measure_history: MeasureHistory,
                                                   device_profile: dict) -> None:
    again = measure_history.second_profile
    for name in ("q8_0", "q4_0"):
        assert again["uniform"][name]["measured"] == device_profile["uniform"][name]["measured"]
    assert again["reference"]["measured"] == device_profile["reference"]["measured"]


@pytest.mark.integration
def test_interrupted_run_keeps_finished_work_and_leaves_no_partial_files(
        measure_history: MeasureHistory, workspace: Workspace, source_view: ModelView) -> None:
    # the interrupted run measured q5_1 (q8_0 was stored), then was interrupted on q5_0
    assert measure_history.interrupted == ["q5_1"]
    assert measure_history.interrupted_quantized == ["q5_1", INTERRUPTED_ON]
    # the interrupt lands on a q5_0 tensor; what was queued after it is dropped (a tensor
    # already being quantized on another thread may still finish)
    done = measure_history.interrupted_tensors
    assert INTERRUPT_AFTER <= done <= INTERRUPT_AFTER + PROTOCOL.threads
    # nothing half-written is left, and every shard built before the interrupt is kept: the
    # next run quantizes only the q5_0 tensors that were not built
    assert measure_history.part_files_after_interrupt == []
    sublayer_tensors = sum(t.quantizable for s in source_view.sublayers for t in s.tensors)
    assert measure_history.second_tensors == sublayer_tensors - done
    # the rerun of the same command measures and quantizes nothing it already has
    assert measure_history.rerun == []
    assert measure_history.rerun_quantized == []
    assert measure_history.rerun_profile["types"] == ["q8_0", "q5_1", "q5_0", "q4_0"]
    assert list(workspace.root.rglob("*.part")) == []
    assert list(workspace.root.rglob(".*.json*")) == []


@pytest.mark.integration
def test_uniform_models_are_links_into_the_store(measure_history: MeasureHistory,
                                                 workspace: Workspace,
                                                 reference: Reference) -> None:
    """No uniform model is a file of its own: each is links to shards, so the store's disk
    is one copy of each (tensor, type), however many models use it."""
    folder = workspace.model_dir(reference.source_sha256)
    assert sorted(p.name for p in folder.glob("*.gguf")) == ["reference-f16.gguf"]
    q5_0, q4_0 = (uniform_path(workspace, reference, t) for t in ("q5_0", "q4_0"))
    files = [f for m in (q5_0, q4_0) for f in split_files(m)]
    assert files and all(f.is_symlink() for f in files)
    shared = {f.resolve() for f in split_files(q5_0)} & {f.resolve() for f in split_files(q4_0)}
    assert len(shared) >= 1 + len(reference.source.outside)  # metadata and outside tensors


@pytest.mark.integration
@pytest.mark.parametrize(("types", "outside", "bad"),
                         [("q4_0,q9_9", "q8_0", "q9_9"), (TINY_TYPES, "q7_7", "q7_7")])
def test_unknown_types_fail_before_any_llama_cpp_work(
        source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        types: str, outside: str, bad: str) -> None:
    def no_reference(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the F16 reference was prepared before the types were checked")

    monkeypatch.setattr(measure, "ensure_reference", no_reference)
    with pytest.raises(InputError, match=f"unknown quantization type '{bad}'"):
        measure_types(source_model, types=types, outside=outside, protocol=PROTOCOL,
                      workspace=Workspace(tmp_path / "fresh"))
