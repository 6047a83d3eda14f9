"""The model view: a GGUF file's tensors grouped into sublayers (attention and FFN of each block).

Grouping follows llama.cpp's tensor-name conventions (`blk.N.attn_*`, `blk.N.ffn_*`), so every
llama.cpp decoder architecture maps without a list of models.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from apreqeld.core.qtypes import QType, effective_type, from_ggml, quantizable
from apreqeld.errors import InputError, ModelError
from apreqeld.gguf.split import GGUF_MAGIC, SPLIT_NO, read_header, split_files
from apreqeld.storage import write_json_atomic

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_ATTN = ("attn", "post_attention", "attention")
_FFN = ("ffn", "post_ffw", "post_mlp")


@dataclass(frozen=True)
class Tensor:
    """One weight tensor as stored in the file."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    qtype: QType
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def quantizable(self) -> bool:
        return quantizable(self.name, len(self.shape))

    def bytes_as(self, requested: QType) -> int:
        """Exact bytes if quantized to `requested` (after llama.cpp's fallback), else as stored."""
        if not self.quantizable:
            return self.n_bytes
        return effective_type(requested, self.shape[0]).tensor_bytes(self.n_elements)

    def type_as(self, requested: QType) -> QType:
        """The type this tensor really gets when `requested` is asked for."""
        return effective_type(requested, self.shape[0]) if self.quantizable else self.qtype


@dataclass(frozen=True)
class Sublayer:
    """The paper's "layer": the attention or the FFN part of one block."""

    block: int
    kind: str  # "attn" or "ffn"
    tensors: tuple[Tensor, ...]

    @property
    def name(self) -> str:
        return f"blk.{self.block}.{self.kind}"

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def bytes_as(self, requested: QType) -> int:
        return sum(t.bytes_as(requested) for t in self.tensors)


@dataclass(frozen=True)
class ModelView:
    """Everything apreqel needs to know about a GGUF file without running it."""

    path: Path
    architecture: str
    name: str
    n_blocks: int
    file_type: QType | None
    sublayers: tuple[Sublayer, ...]  # ordered blk.0.attn, blk.0.ffn, blk.1.attn, ...
    outside: tuple[Tensor, ...]  # token embedding, output, final norm, per-block extras
    add_bos: bool
    file_bytes: int
    plan_id: str | None = None  # set in files built by apreqel

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for s in self.sublayers for t in s.tensors) + self.outside

    @property
    def parameter_bytes(self) -> int:
        """Memory footprint as the paper defines it: bytes of all parameter tensors."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.parameter_bytes / self.n_parameters

    def tensor_types(self) -> dict[str, str]:
        """Every tensor's stored type by name: the ground truth a plan is checked against."""
        return {t.name: t.qtype.name for t in self.tensors}

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "name": self.name,
            "n_blocks": self.n_blocks,
            "n_sublayers": len(self.sublayers),
            "file_type": self.file_type.name if self.file_type else None,
            "parameter_bytes": self.parameter_bytes,
            "n_parameters": self.n_parameters,
            "bits_per_weight": self.bits_per_weight,
            "sublayers": [
                {"name": s.name, "block": s.block, "kind": s.kind, "bytes": s.n_bytes,
                 "tensors": [_tensor_dict(t) for t in s.tensors]}
                for s in self.sublayers
            ],
            "outside": [_tensor_dict(t) for t in self.outside],
        }


def _tensor_dict(t: Tensor) -> dict:
    return {"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.n_bytes}


def check_gguf_path(path: str | Path) -> Path:
    """Fail with one line unless `path` is an existing file that starts like a GGUF."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    if not p.is_file():
        raise InputError(f"model path is not a file: {p}")
    with p.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"not a GGUF file (bad magic): {p}")
    return p


def _sublayer_kind(rest: str) -> str | None:
    if rest.startswith(_ATTN):
        return "attn"
    if rest.startswith(_FFN):
        return "ffn"
    return None


def read_model(path: str | Path) -> ModelView:
    """Read a GGUF file's metadata and tensor table and group the tensors into sublayers."""
    p = check_gguf_path(path)
    st = p.stat()
    # absolute, not resolved: the first split of an assembled model is a link into the shard
    # store, and its siblings are found by its own name
    return _read_model(Path(os.path.abspath(p)), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _read_model(p: Path, size: int, _mtime_ns: int) -> ModelView:
    files = split_files(p)
    tensors: list[Tensor] = []
    kv: dict = {}
    for k, part in enumerate(files):
        try:
            header = read_header(part)
        except FileNotFoundError:
            raise ModelError(f"split {k + 1} of {len(files)} is missing: {part}") from None
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"cannot read GGUF file {part} (truncated or corrupt: "
                             f"{detail})") from None
        if k == 0:
            kv = header.kv
        elif header.kv.get(SPLIT_NO) != k:
            raise ModelError(f"{part} is not split {k + 1} of {len(files)} (its split.no is "
                             f"{header.kv.get(SPLIT_NO)})")
        for info in header.tensors:
            qt = from_ggml(info.ggml_type)
            n_bytes = qt.tensor_bytes(int(np.prod(info.shape)))
            end = info.offset + n_bytes
            if end > header.file_bytes:
                raise ModelError(f"truncated GGUF file: tensor {info.name} ends at byte {end}, "
                                 f"file has {header.file_bytes}: {part}")
            tensors.append(Tensor(info.name, info.shape, qt, n_bytes))
    if len(files) > 1:
        size = sum(f.stat().st_size for f in files)
    arch = kv.get("general.architecture")
    if not arch:
        raise ModelError(f"GGUF file has no general.architecture: {p}")
    groups: dict[tuple[int, str], list[Tensor]] = {}
    outside: list[Tensor] = []
    for t in tensors:
        m = _BLOCK.match(t.name)
        kind = _sublayer_kind(m.group(2)) if m else None
        if m and kind:
            groups.setdefault((int(m.group(1)), kind), []).append(t)
        else:
            outside.append(t)
    n_blocks = int(kv.get(f"{arch}.block_count") or 0)
    if not groups:
        raise ModelError(f"no blk.N.attn_*/blk.N.ffn_* tensors found in {p}: "
                         f"architecture '{arch}' cannot be mapped onto sublayers")
    blocks = sorted({b for b, _ in groups})
    if n_blocks == 0:
        n_blocks = blocks[-1] + 1
    missing = [f"blk.{b}.{k}" for b in range(n_blocks) for k in ("attn", "ffn")
               if (b, k) not in groups]
    if missing:
        raise ModelError(f"cannot map '{arch}' onto sublayers: missing {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} in {p}")
    sublayers = tuple(Sublayer(b, k, tuple(groups[(b, k)]))
                      for b in range(n_blocks) for k in ("attn", "ffn"))
    return ModelView(
        path=p, architecture=str(arch), name=str(kv.get("general.name") or p.stem),
        n_blocks=n_blocks, file_type=_dominant_type(tensors), sublayers=sublayers,
        outside=tuple(outside), add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", True)),
        file_bytes=size, plan_id=kv.get("apreqel.plan_id"),
    )


def _dominant_type(tensors: list[Tensor]) -> QType | None:
    """The most common type among quantizable tensors: what a person calls the file's type."""
    counts = Counter(t.qtype for t in tensors if t.quantizable)
    return counts.most_common(1)[0][0] if counts else None


def file_sha256(path: str | Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) in `cache_dir`: big models hash once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}:{st.st_size}:{st.st_mtime_ns}"
    index = cache_dir / "sha256.json" if cache_dir else None
    known: dict[str, str] = {}
    if index and index.exists():
        try:
            known = json.loads(index.read_text())
        except ValueError:
            known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if index:
        known[key] = digest
        write_json_atomic(index, known)
    return digest
