"""Building shards: each (tensor, type) a recipe needs and the store lacks is quantized once
from the F16 reference with llama.cpp's own quantizer (engine.quantize_tensor, the function
llama-quantize calls per tensor), written as a split file and indexed; the metadata split of
each base type is the reference's metadata with that type's file type, as llama-quantize
writes it. Nothing is quantized twice: the index and the content addressing see to it."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from apreqeld import engine
from apreqeld.core.qtypes import effective_type, from_ggml, qtype, quantizable
from apreqeld.errors import InputError, PlanError
from apreqeld.gguf.split import (
    FILE_TYPE,
    Header,
    TensorInfo,
    metadata_split_bytes,
    read_header,
    tensor_split_bytes,
)
from apreqeld.manifest import ShardTable
from apreqeld.store.shards import Assembly, ShardStore, member_assembly

Progress = Callable[[str, float], None]

RECORD_EVERY_S = 2.0  # built shards are indexed at least this often (an interrupt keeps them)


@dataclass(frozen=True)
class Filled:
    """What a fill did: the shard table of what was asked, and what it cost."""

    table: ShardTable
    quantized: int  # tensors quantized with llama.cpp
    copied: int  # tensors taken from the reference as they are
    reused: int  # (tensor, type) pairs the store already had
    bytes_written: int
    seconds: float


def fill(store: ShardStore, reference: Path, source_sha256: str,
         wanted: Mapping[str, Iterable[str]], /, *, bases: Iterable[str], threads: int = 1,
         expected: ShardTable | None = None, progress: Progress = lambda _w, _f: None
         ) -> Filled:
    """Make sure the store holds, for every tensor of `reference` in `wanted` (tensor ->
    requested types), the shard of each type, and the metadata split of each base type; the
    shard table of all that. Tensors `wanted` does not name, and those llama.cpp never
    quantizes, are taken as the reference stores them. With `expected` (a plan set's table),
    a shard that comes out different is an error: another llama.cpp build or reference."""
    started = time.monotonic()
    st = Path(reference).stat()
    header = _header(str(Path(reference).resolve()), st.st_size, st.st_mtime_ns)
    order = [t.name for t in header.tensors]
    total, count = len(order), len(order) + 1
    infos = {t.name: t for t in header.tensors}
    unknown = sorted(set(wanted) - set(infos))
    if unknown:
        raise InputError(f"the reference {reference.name} has no tensor {unknown[0]}")
    ver = engine.engine_version()
    # requested -> written type of every (tensor, requested type); fixed tensors as stored
    written: dict[str, dict[str, str]] = {}
    fixed: dict[str, str] = {}
    for t in header.tensors:
        stored = from_ggml(t.ggml_type).name
        if not quantizable(t.name, len(t.shape)) or t.name not in wanted:
            fixed[t.name] = stored
            continue
        written[t.name] = {q: effective_type(qtype(q), t.shape[0]).name for q in wanted[t.name]}
    base_types = sorted({qtype(b).name for b in bases})
    with store.filling():
        index = store.index(source_sha256, ver)
        have = index["shards"]
        todo = sorted({(n, w) for n, by in written.items() for w in by.values()}
                      | set(fixed.items()))
        todo = [(n, w) for n, w in todo
                if not (have.get(n, {}).get(w) and store.has(have[n][w]))]
        reused = len({(n, w) for n, by in written.items() for w in by.values()}
                     | set(fixed.items())) - len(todo)
        built: dict[str, dict[str, str]] = {}
        stats = {"quantized": 0, "copied": 0, "bytes": 0}
        with open(reference, "rb") as f:
            data = np.memmap(f, dtype=np.uint8, mode="r")
            position = {n: k for k, n in enumerate(order)}

            def make(item: tuple[str, str]) -> tuple[str, str, str, int, bool]:
                name, type_name = item
                info = infos[name]
                raw = _tensor_bytes(data, info)
                copied = from_ggml(info.ggml_type).name == type_name
                body = raw if copied else engine.quantize_tensor(
                    _rows(raw, info), type_name, threads=1)
                shard = tensor_split_bytes(
                    TensorInfo(name, info.shape, qtype(type_name).ggml if not copied
                               else info.ggml_type, 0),
                    memoryview(body), no=position[name] + 1, count=count, total=total)
                return name, type_name, store.add(shard), len(shard), copied

            last = time.monotonic()
            done_elements, all_elements = 0, sum(_elements(infos[n]) for n, _ in todo) or 1
            taken: set[Future] = set()

            def take(future: Future) -> str:
                name, type_name, sha, size, copied = future.result()
                built.setdefault(name, {})[type_name] = sha
                stats["copied" if copied else "quantized"] += 1
                stats["bytes"] += size
                taken.add(future)
                return name

            pool = ThreadPoolExecutor(max_workers=max(1, threads))
            futures = [pool.submit(make, item) for item in todo]
            try:
                for future in futures:
                    name = take(future)
                    done_elements += _elements(infos[name])
                    progress(f"shards: {name}", done_elements / all_elements)
                    if time.monotonic() - last > RECORD_EVERY_S:
                        store.record(source_sha256, ver, tensors=order, shards=built,
                                     metadata={})
                        last = time.monotonic()
            except BaseException:
                # interrupted: what is queued is dropped, what other threads finish is kept
                pool.shutdown(wait=True, cancel_futures=True)
                for future in futures:
                    if future not in taken and future.done() and not future.cancelled() \
                            and future.exception() is None:
                        take(future)
                raise
            finally:
                pool.shutdown(wait=True)
                if built:  # the next fill resumes from what is indexed
                    store.record(source_sha256, ver, tensors=order, shards=built, metadata={})
        metadata = {}
        for base in base_types:
            known = index["metadata"].get(base)
            if known and store.has(known):
                metadata[base] = known
                continue
            blob = metadata_split_bytes(reference, count=count, total=total,
                                        set_u32={FILE_TYPE: qtype(base).ftype})
            metadata[base] = store.add(blob)
            stats["bytes"] += len(blob)
        store.record(source_sha256, ver, tensors=order, shards=built, metadata=metadata)
    index = store.index(source_sha256, ver)
    shards = {n: {q: index["shards"][n][w] for q, w in by.items()} for n, by in written.items()}
    table = ShardTable(engine=ver, tensors=order, metadata=metadata,
                       fixed={n: index["shards"][n][w] for n, w in fixed.items()},
                       shards=shards)
    if expected is not None:
        _check_expected(table, expected)
    return Filled(table, stats["quantized"], stats["copied"], reused, stats["bytes"],
                  time.monotonic() - started)


@lru_cache(maxsize=8)
def _header(path: str, _size: int, _mtime_ns: int) -> Header:
    """The reference's header, parsed once per file version (a tokenizer takes ~0.1 s)."""
    return read_header(path)


def _tensor_bytes(data: np.memmap, info: TensorInfo) -> np.ndarray:
    q = from_ggml(info.ggml_type)
    return data[info.offset:info.offset + q.tensor_bytes(_elements(info))]


def _elements(info: TensorInfo) -> int:
    return int(np.prod(info.shape))


def _rows(raw: np.ndarray, info: TensorInfo) -> np.ndarray:
    """The reference tensor as (rows, row length) floats: what quantization starts from."""
    dtype = {0: np.float32, 1: np.float16}.get(info.ggml_type)
    if dtype is None:
        raise PlanError(f"reference tensor {info.name} is {from_ggml(info.ggml_type).name}, "
                        "not f16/f32: it cannot be quantized from")
    return raw.view(dtype).reshape(-1, info.shape[0])


def _check_expected(table: ShardTable, expected: ShardTable) -> None:
    if table.tensors != expected.tensors:
        raise PlanError("the reference's tensors differ from the plan set's shard table")
    pairs = [(f"metadata of {b}", table.metadata.get(b), s) for b, s in expected.metadata.items()
             if b in table.metadata]
    pairs += [(n, table.fixed.get(n), s) for n, s in expected.fixed.items() if n in table.fixed]
    pairs += [(f"{n} as {q}", table.shards.get(n, {}).get(q), s)
              for n, by in expected.shards.items() for q, s in by.items()
              if q in table.shards.get(n, {})]
    for what, got, want in pairs:
        if got != want:
            raise PlanError(f"shard {what} came out with sha256 {str(got)[:12]}…, the plan set "
                            f"says {want[:12]}… (another llama.cpp build, {table.engine}, or "
                            "another model?)")


def assembled(store: ShardStore, reference: Path, source_sha256: str,
              recipes: Mapping[Hashable, tuple[Mapping[str, str], str]], /, *, threads: int = 1,
              progress: Progress = lambda _w, _f: None,
              ) -> tuple[ShardTable, dict[Hashable, tuple[Path, Assembly]]]:
    """Every recipe (key -> (tensor -> requested type, base type)) made loadable: the shards
    it lacks built once (`fill`), then each assembled by links. The shard table of all of them
    and, by key, the first split's path and the assembly."""
    wanted: dict[str, set[str]] = {}
    for recipe, _ in recipes.values():
        for name, type_name in recipe.items():
            wanted.setdefault(name, set()).add(qtype(type_name).name)
    filled = fill(store, reference, source_sha256, wanted,
                  bases={base for _, base in recipes.values()}, threads=threads,
                  progress=progress)
    found = {}
    for key, (recipe, base) in recipes.items():
        assembly = member_assembly(filled.table, {n: qtype(q).name for n, q in recipe.items()},
                                   qtype(base).name)
        found[key] = (store.assemble(assembly), assembly)
    return filled.table, found
