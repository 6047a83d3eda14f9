"""The one module that talks to llama.cpp (through llama-cpp-python's ctypes C API).

Everything here runs the real engine: quantization with per-tensor overrides, decoding for
perplexity and KL divergence (llama-perplexity's protocol), generation timing (llama-bench's
protocol) and residual-stream capture through the scheduler's eval callback.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from apreqeld.core.qtypes import qtype
from apreqeld.errors import EngineError, InputError, ModelError

_THREAD_LOG = threading.local()  # each thread's own ring of llama.cpp log lines


def _log_ring() -> deque[str]:
    """The last 200 llama.cpp log lines written by the calling thread."""
    ring = getattr(_THREAD_LOG, "ring", None)
    if ring is None:
        ring = _THREAD_LOG.ring = deque(maxlen=200)
    return ring


@cache
def _llama():
    """Import llama_cpp once, initialise the backend and route its log into a ring buffer."""
    os.environ.setdefault("LLAMA_LOG_VERBOSITY", "0")
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        _log_ring().append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _llama.log_callback = _log  # keep the callback alive as long as the library
    return llama_cpp


@cache
def _ggml():
    """libggml with the few tensor accessors the eval callback needs, typed by hand."""
    from llama_cpp._ggml import libggml

    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    libggml.ggml_nbytes.restype = ctypes.c_size_t
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    return libggml


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml.h's `struct ggml_tensor` (type, buffer, ne, nb)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _recent_log(pattern: str = r"error|failed|invalid|unable|cannot") -> str:
    """The calling thread's last llama.cpp log line that reports a problem."""
    lines = [ln.strip() for ln in _log_ring() if re.search(pattern, ln, re.I) and ln.strip()]
    return lines[-1] if lines else "no detail in llama.cpp's log"


def engine_version() -> str:
    """llama-cpp-python's version: it pins the llama.cpp build it was compiled from."""
    return f"llama-cpp-python {_llama().__version__}"


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan...)."""
    return bool(_llama().llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's own description of the CPU features it was built with."""
    return _llama().llama_print_system_info().decode("utf-8", "replace").strip()


def cpu_description() -> str:
    """The CPU model name, as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- quantization


def quantize(src: Path, dst: Path, /, *, tensor_types: Mapping[str, str] | None = None,
             base: str = "q8_0", threads: int = 0, ftype: int | None = None,
             pure: bool = True) -> int:
    """Quantize `src` into `dst`, giving every named tensor its type (llama-quantize --tensor-type);
    returns how many tensors llama.cpp had to give a fallback type.

    `tensor_types` maps exact tensor names to type names; tensors not named get `base`.
    `pure` disables llama.cpp's own mixing, so what is written is exactly what is asked, up to
    llama.cpp's shape fallbacks (which the caller checks in the written file). A preset is
    `ftype` (a llama_ftype id, instead of `base`'s) with `pure=False`: llama.cpp's own mixing.
    """
    ll = _llama()
    params = ll.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(qtype(base).ftype) if ftype is None else int(ftype)
    params.allow_requantize = True
    params.pure = pure
    keep = []
    if tensor_types:
        overrides = (ll.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
            pattern = f"^{re.escape(name)}$".encode()
            keep.append(pattern)
            overrides[i].pattern = pattern
            overrides[i].type = int(qtype(type_name).ggml)
        overrides[len(tensor_types)].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(ll.llama_model_tensor_override))
    _log_ring().clear()
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise EngineError(f"llama.cpp could not quantize {src}: {_recent_log()}")
    QUANTIZED["models"] += 1
    for line in reversed(_log_ring()):
        m = re.search(r"(\d+) of \d+ tensor\(s\) required fallback", line)
        if m:
            return int(m.group(1))
    return 0


# How much this process has asked llama.cpp to quantize: whole models and single tensors.
QUANTIZED: dict[str, int] = {"models": 0, "tensors": 0}
_ROWS_PER_BLOCK_ELEMENTS = 1 << 22  # rows converted to f32 and quantized together (16 MiB)


@cache
def _quantizer():
    """libggml's quantization entry points, typed by hand (llama-quant.cpp calls the same)."""
    gg = _ggml()
    gg.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p]
    gg.ggml_quantize_chunk.restype = ctypes.c_size_t
    gg.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    gg.ggml_validate_row_data.restype = ctypes.c_bool
    gg.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    gg.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return gg


def quantize_tensor(rows: np.ndarray, type_name: str, /, *, threads: int = 1) -> np.ndarray:
    """One tensor quantized to `type_name` as llama-quantize quantizes it: llama.cpp's
    ggml_quantize_chunk over blocks of rows (rows are quantized independently, so the bytes do
    not depend on the blocking), each block validated with ggml_validate_row_data.

    `rows` is (n_rows, n_per_row) in float16 or float32 (converted block by block, so memory
    stays bounded); the result is the tensor's bytes (uint8)."""
    q = qtype(type_name)
    if rows.ndim != 2 or rows.dtype not in (np.float16, np.float32):
        raise EngineError(f"quantize_tensor needs 2-D float16/float32 rows, got "
                          f"{rows.dtype}{list(rows.shape)}")
    n_rows, n_per_row = rows.shape
    if n_per_row % q.block_size:
        raise EngineError(f"rows of {n_per_row} cannot be {q.name} (blocks of {q.block_size})")
    gg = _quantizer()
    if gg.ggml_quantize_requires_imatrix(q.ggml):
        raise EngineError(f"{q.name} needs an importance matrix")
    row_bytes = q.row_bytes(n_per_row)
    out = np.empty(n_rows * row_bytes, dtype=np.uint8)
    step = max(1, _ROWS_PER_BLOCK_ELEMENTS // n_per_row)
    blocks = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]

    def block(bounds: tuple[int, int]) -> bool:
        a, b = bounds
        src = np.ascontiguousarray(rows[a:b], dtype=np.float32)
        dst = out[a * row_bytes:b * row_bytes]
        size = gg.ggml_quantize_chunk(q.ggml, src.ctypes.data, dst.ctypes.data, 0, b - a,
                                      n_per_row, None)
        return size == dst.nbytes and bool(gg.ggml_validate_row_data(q.ggml, dst.ctypes.data,
                                                                      size))

    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # ctypes drops the GIL
            ok = all(pool.map(block, blocks))
    else:
        ok = all(block(b) for b in blocks)
    if not ok:
        raise EngineError(f"llama.cpp's {q.name} quantization produced invalid data")
    QUANTIZED["tensors"] += 1
    return out


# --------------------------------------------------------------------------- sessions


EvalCallback = Callable[[str, "np.ndarray | None"], None]


@dataclass
class Session:
    """A loaded model and one context: decode batches, read logits, time the engine."""

    model: ctypes.c_void_p
    ctx: ctypes.c_void_p
    n_vocab: int
    n_embd: int
    add_bos: bool
    bos: int
    n_batch: int
    _batch: object
    _keepalive: tuple = ()
    rows: ThreadPoolExecutor | None = None  # this session's threads for row-parallel numpy

    @property
    def _ll(self):
        return _llama()

    def tokenize(self, text: str, *, add_special: bool = True) -> np.ndarray:
        """Tokenize like llama.cpp's common_tokenize (specials not parsed)."""
        ll = self._ll
        vocab = ll.llama_model_get_vocab(self.model)
        raw = text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, False)
        if n < 0:
            buf = (ll.llama_token * -n)()
            n = ll.llama_tokenize(vocab, raw, len(raw), buf, -n, add_special, False)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def clear(self) -> None:
        """Forget the KV cache (a new sequence starts at position 0)."""
        ll = self._ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)

    def decode(self, tokens: np.ndarray, *, start_pos: int = 0,
               outputs: np.ndarray | None = None) -> None:
        """Decode `tokens` as sequence 0 from `start_pos`; `outputs` flags rows that get logits."""
        ll = self._ll
        n = len(tokens)
        if n > self.n_batch:
            raise EngineError(f"batch of {n} tokens exceeds the context's n_batch {self.n_batch}")
        b = self._batch
        b.n_tokens = n
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:n] = tokens
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:n] = np.arange(
            start_pos, start_pos + n, dtype=np.int32)
        flags = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        flags[:n] = 1 if outputs is None else outputs.astype(np.int8)
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}: {_recent_log()}")

    def logits(self, n_rows: int) -> np.ndarray:
        """The last decode's logits as a (n_rows, n_vocab) float32 view (no copy)."""
        ptr = self._ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    def synchronize(self) -> None:
        self._ll.llama_synchronize(self.ctx)

    def perf(self) -> tuple[float, int]:
        """Engine time (ms) and token count of all decodes since the last perf reset."""
        d = self._ll.llama_perf_context(self.ctx)
        return d.t_p_eval_ms + d.t_eval_ms, d.n_p_eval + d.n_eval

    def perf_reset(self) -> None:
        self._ll.llama_perf_context_reset(self.ctx)


@contextmanager
def open_session(path: Path, /, *, n_ctx: int = 512, n_batch: int | None = None,
                 threads: int | None = None, gpu_layers: int = 0,
                 on_tensor: EvalCallback | None = None,
                 wanted: Callable[[str], bool] | None = None) -> Iterator[Session]:
    """Load `path` and create a context; `on_tensor(name, data)` receives wanted graph tensors."""
    ll = _llama()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    _log_ring().clear()
    model = ll.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ModelError(f"llama.cpp could not load {path}: {_recent_log()}")
    n_batch = n_batch or n_ctx
    threads = threads or default_threads()
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = False
    keep: tuple = ()
    if on_tensor is not None:
        callback = _make_eval_callback(on_tensor, wanted or (lambda _n: True))
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        keep = (callback,)
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        ll.llama_model_free(model)
        raise EngineError(f"llama.cpp could not create a context for {path}: {_recent_log()}")
    vocab = ll.llama_model_get_vocab(model)
    batch = ll.llama_batch_init(n_batch, 0, 1)
    for i in range(n_batch):
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
    session = Session(model=model, ctx=ctx, n_vocab=ll.llama_vocab_n_tokens(vocab),
                      n_embd=ll.llama_model_n_embd(model),
                      add_bos=bool(ll.llama_vocab_get_add_bos(vocab)),
                      bos=int(ll.llama_vocab_bos(vocab)), n_batch=n_batch, _batch=batch,
                      _keepalive=keep, rows=ThreadPoolExecutor(
                          max_workers=threads, thread_name_prefix="apreqel-rows"))
    try:
        yield session
    finally:
        session.rows.shutdown()
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


def default_threads() -> int:
    """llama.cpp's default: the number of physical-ish cores available to this process."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def _make_eval_callback(on_tensor: EvalCallback, wanted: Callable[[str], bool]):
    ll = _llama()
    gg = _ggml()

    def callback(tensor: int, ask: bool, _user: int) -> bool:
        name = gg.ggml_get_name(tensor).decode("utf-8", "replace")
        if ask:
            return wanted(name)
        head = _TensorHead.from_address(tensor)
        if head.type != 0:  # not GGML_TYPE_F32: the receiver decides whether that matters
            on_tensor(name, None)
            return True
        shape = tuple(int(d) for d in head.ne)
        nbytes = gg.ggml_nbytes(tensor)
        out = np.empty(nbytes // 4, dtype=np.float32)
        gg.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, nbytes)
        n_cols = shape[0]
        on_tensor(name, out.reshape(-1, n_cols))
        return True

    return ll.ggml_backend_sched_eval_callback(callback)


# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class ChunkScores:
    """Per-token results of one perplexity chunk (the scored second half)."""

    nll: np.ndarray  # negative log-likelihood of each scored token (float64)
    kld: np.ndarray | None  # KL(reference || model) per scored token
    same_top: np.ndarray | None  # whether the argmax agrees with the reference's


# llama-perplexity ignores reference log-probs at or below -16 in its KL sum; so do we, which
# also lets the reference be stored sparsely.
KLD_LOGPROB_FLOOR = -16.0


@dataclass(frozen=True)
class SparseLogprobs:
    """A reference's log-probabilities above the KL floor, row by row (CSR layout)."""

    offsets: np.ndarray  # (rows + 1,) int64
    indices: np.ndarray  # token ids, int32
    values: np.ndarray  # log-probs, float32
    argmax: np.ndarray  # (rows,) the reference's top token

    @classmethod
    def from_logprobs(cls, logp: np.ndarray) -> SparseLogprobs:
        keep = logp > KLD_LOGPROB_FLOOR
        rows, cols = np.nonzero(keep)
        offsets = np.zeros(len(logp) + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        return cls(offsets, cols.astype(np.int32), logp[rows, cols].astype(np.float32),
                   logp.argmax(axis=1).astype(np.int32))

    @cached_property
    def probs(self) -> np.ndarray:
        """exp(values), float64: the reference's probabilities of the kept tokens."""
        return np.exp(self.values.astype(np.float64))

    @cached_property
    def row_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: sum p*log p and sum p over the kept tokens (the model-free part of KL)."""
        starts = self.offsets[:-1]
        return (np.add.reduceat(self.probs * self.values, starts),
                np.add.reduceat(self.probs, starts))

    def flat_index(self, n_vocab: int) -> np.ndarray:
        """Positions of the kept entries in a row-major (rows, n_vocab) logits array."""
        rows = np.repeat(np.arange(len(self.argmax), dtype=np.int64), np.diff(self.offsets))
        return rows * n_vocab + self.indices

    def kl_divergence(self, logits: np.ndarray, lse: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """KL(reference || model) per row: sum p (log p - logits + lse) over kept tokens."""
        plogp, psum = self.row_terms
        cross = np.add.reduceat(self.probs * np.take(logits, flat), self.offsets[:-1])
        return plogp - cross + lse * psum


def row_logsumexp(logits: np.ndarray, scratch: np.ndarray,
                  pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """log(sum(exp(row))) of each row in float32, on blocks of rows in `pool`'s threads (numpy
    releases the GIL): the exp over the vocabulary is most of perplexity's Python side."""
    workers = 1 if pool is None else min(pool._max_workers, max(1, len(logits) // 16))
    if workers == 1:
        return _row_logsumexp(logits, scratch)
    out = np.empty(len(logits), dtype=np.float32)
    bounds = np.linspace(0, len(logits), workers + 1).astype(int)

    def block(a: int, b: int) -> None:
        out[a:b] = _row_logsumexp(logits[a:b], scratch[a:b])

    for done in [pool.submit(block, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]:
        done.result()
    return out


def _row_logsumexp(logits: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """row_logsumexp in this thread, shifting by the row max only when needed
    (exp of logits below 60 cannot overflow a float32 sum of 2^20 terms)."""
    top = logits.max(axis=1)
    if top.max() > 60.0 or top.min() < -60.0:
        np.subtract(logits, top[:, None], out=scratch)
        np.exp(scratch, out=scratch)
        return np.log(scratch.sum(axis=1)) + top
    np.exp(logits, out=scratch)
    return np.log(scratch.sum(axis=1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32."""
    return logits - row_logsumexp(logits, np.empty_like(logits))[:, None]


def perplexity_chunks(session: Session, tokens: np.ndarray, /, *, n_ctx: int, n_chunks: int,
                      reference: Sequence[SparseLogprobs] | None = None,
                      keep_logprobs: Callable[[int, np.ndarray], None] | None = None,
                      ) -> Iterator[ChunkScores]:
    """llama-perplexity's protocol: chunks of n_ctx tokens, the first replaced by BOS when the
    vocabulary adds one, logits for the second half, each token scored on its successor.
    `reference[i]` holds the reference's log-probs of chunk i, for the KL divergence."""
    first = n_ctx // 2
    n_scored = n_ctx - first - 1
    outputs = np.zeros(n_ctx, dtype=np.int8)
    outputs[first:] = 1
    scratch = np.empty((n_scored, session.n_vocab), dtype=np.float32)
    rows = np.arange(n_scored)
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if session.add_bos:
            chunk[0] = session.bos
        session.clear()
        session.decode(chunk, outputs=outputs)
        logits = session.logits(n_ctx - first)[:n_scored]
        lse = row_logsumexp(logits, scratch, session.rows)
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        nll = (lse - logits[rows, targets]).astype(np.float64)
        kld = same = None
        if reference is not None:
            ref = reference[i]
            kld = ref.kl_divergence(logits, lse.astype(np.float64),
                                    ref.flat_index(session.n_vocab))
            same = logits.argmax(axis=1) == ref.argmax
        if keep_logprobs is not None:
            keep_logprobs(i, logits - lse[:, None])
        yield ChunkScores(nll=nll, kld=kld, same_top=same)


@dataclass(frozen=True)
class GenerationTiming:
    """llama-bench tg: wall ms per generated token of each repetition, and the engine's own."""

    ms_per_token: tuple[float, ...]
    engine_ms_per_token: float
    n_gen: int


def time_generation(session: Session, /, *, n_gen: int, reps: int, seed: int = 0,
                    warmup: bool = True) -> GenerationTiming:
    """llama-bench's test_gen: one-token decodes of random tokens, warm-up then `reps` runs."""
    rng = random.Random(seed)
    one = np.zeros(1, dtype=np.int32)

    def run(count: int, pos: int) -> None:
        token = session.bos if session.add_bos else rng.randrange(session.n_vocab)
        for k in range(count):
            one[0] = token
            session.decode(one, start_pos=pos + k)
            session.synchronize()
            token = rng.randrange(session.n_vocab)

    if warmup:
        session.clear()
        run(1, 0)
    samples = []
    session.perf_reset()
    for _ in range(reps):
        session.clear()
        t0 = time.perf_counter_ns()
        run(n_gen, 0)
        samples.append((time.perf_counter_ns() - t0) / 1e6 / n_gen)
    engine_ms, engine_n = session.perf()
    return GenerationTiming(tuple(samples), engine_ms / max(engine_n, 1), n_gen)


def capture_tensors(session: Session, tokens: Sequence[np.ndarray], /) -> None:
    """Decode each token chunk from position 0 with logits for every token, so that the eval
    callback sees the full residual stream (no last-layer pruning to output rows)."""
    for chunk in tokens:
        session.clear()
        session.decode(np.asarray(chunk, dtype=np.int32))


# ---- serving: generation for the daemon's workers
# Used only by apreqeld.runtime.worker, one loaded model per worker process.


@dataclass
class ServedToken:
    """One streamed piece of text (usually one token) or, with `finish` set, the end."""

    text: str
    finish: str | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """How a served reply is sampled; None/0 leave llama.cpp's defaults. `response_format`
    is the wire's: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""

    max_tokens: int
    temperature: float
    stop: Sequence[str] = ()
    seed: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: Mapping | None = None


@cache
def _json_grammar(schema: str | None):
    """A llama.cpp grammar for JSON text: any JSON value (schema None) or a value valid for
    the JSON schema (as canonical JSON text); InputError when the schema cannot be turned into
    a grammar. Cached: the grammar sampler is built from it per request."""
    _llama()
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF

    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the converter asserts on what it cannot do
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"response_format.json_schema cannot be enforced: {detail}") from None


def json_grammar(response_format: Mapping | None):
    """The grammar a response format asks for, None for free text."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    if response_format["type"] == "json_object":
        return _json_grammar(None)
    return _json_grammar(json.dumps(response_format["json_schema"], sort_keys=True))


class ServingModel:
    """A GGUF loaded for serving through llama-cpp-python's high-level `Llama` class."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int, gpu_layers: int = 0) -> None:
        _llama()  # route llama.cpp's log into the ring buffer before anything loads
        from llama_cpp import Llama

        try:
            self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {path}: {exc}; {_recent_log()}") from None
        self.generated = 0  # tokens sampled by the last call
        self.prompted = 0  # tokens of the last call's prompt (after the chat template)

    def warm_up(self) -> None:
        """One real decode, so that the first request does not pay for page faults."""
        self._llm.eval(self._llm.tokenize(b"Hello", add_bos=True))
        self._llm.reset()

    def _counter(self):
        from llama_cpp import LogitsProcessorList

        self.generated = self.prompted = 0

        def count(ids, scores):
            if not self.generated:  # the first sample sees the prompt's tokens
                self.prompted = len(ids)
            self.generated += 1
            return scores

        return LogitsProcessorList([count])

    def _options(self, o: SamplingOptions) -> dict:
        kw = {"max_tokens": o.max_tokens, "temperature": o.temperature, "stop": list(o.stop),
              "seed": o.seed, "presence_penalty": o.presence_penalty,
              "frequency_penalty": o.frequency_penalty, "grammar": json_grammar(o.response_format),
              "stream": True, "logits_processor": self._counter()}
        if o.top_p is not None:
            kw["top_p"] = o.top_p
        return kw

    @staticmethod
    def _stream(chunks: Iterator[dict], piece: Callable[[dict], str]) -> Iterator[ServedToken]:
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                yield ServedToken(piece(choice), choice.get("finish_reason"))
        except ValueError as exc:  # llama-cpp-python: "Requested tokens (N) exceed context..."
            if "exceed context window" not in str(exc):
                raise
            raise InputError(f"the prompt is too long: {exc}") from None

    def complete(self, prompt: str, *, options: SamplingOptions | None = None,
                 **sampling) -> Iterator[ServedToken]:
        """Stream a plain completion of `prompt` (`options`, or its fields as keywords)."""
        o = options or SamplingOptions(**sampling)
        chunks = self._llm.create_completion(prompt, **self._options(o))
        return self._stream(chunks, lambda choice: choice.get("text") or "")

    def chat(self, messages: Sequence[Mapping[str, str]], *,
             options: SamplingOptions | None = None, **sampling) -> Iterator[ServedToken]:
        """Stream a chat reply, formatted with the model's own chat template."""
        o = options or SamplingOptions(**sampling)
        chunks = self._llm.create_chat_completion([dict(m) for m in messages],
                                                  **self._options(o))
        return self._stream(chunks, lambda choice: choice.get("delta", {}).get("content") or "")

    def prompt_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=True))

    def close(self) -> None:
        self._llm.close()
