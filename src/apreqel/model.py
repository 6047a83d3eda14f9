"""The model view: a GGUF file's tensors grouped into sublayers (attention and FFN of each block).

Grouping follows llama.cpp's tensor-name conventions (`blk.N.attn_*`, `blk.N.ffn_*`), so every
llama.cpp decoder architecture maps without a list of models.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from .errors import InputError, ModelError
from .qtypes import QType, effective_type, from_ggml, quantizable
from .storage import write_json_atomic

GGUF_MAGIC = b"GGUF"
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
        real = effective_type(requested, self.shape[0])
        return self.n_elements // real.block_size * real.type_size

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


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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
    size = p.stat().st_size
    try:
        reader = GGUFReader(p)
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on bad files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read GGUF file {p} (truncated or corrupt: {detail})") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"GGUF file has no general.architecture: {p}")
    tensors: list[Tensor] = []
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelError(f"truncated GGUF file: tensor {t.name} ends at byte {end}, "
                             f"file has {size}: {p}")
        tensors.append(Tensor(t.name, tuple(int(d) for d in t.shape), from_ggml(t.tensor_type),
                              int(t.n_bytes)))
    groups: dict[tuple[int, str], list[Tensor]] = {}
    outside: list[Tensor] = []
    for t in tensors:
        m = _BLOCK.match(t.name)
        kind = _sublayer_kind(m.group(2)) if m else None
        if m and kind:
            groups.setdefault((int(m.group(1)), kind), []).append(t)
        else:
            outside.append(t)
    n_blocks = int(_field(reader, f"{arch}.block_count", 0) or 0)
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
    file_type = _dominant_type(tensors)
    return ModelView(
        path=p, architecture=str(arch), name=str(_field(reader, "general.name", p.stem)),
        n_blocks=n_blocks, file_type=file_type, sublayers=sublayers, outside=tuple(outside),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)), file_bytes=size,
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
