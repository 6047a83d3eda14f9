"""GGUF headers and split files, read and written without gguf-py (plain struct).

A model may be spread over N GGUF files named `PREFIX-%05d-of-%05d.gguf` (llama.cpp's loader,
src/llama-model-loader.cpp): the first holds the metadata (`split.count` = N), each file says
its place (`split.no`, 0-based) and all say `split.tensors.count`. The shard store writes one
tensor per split file, so that any recipe is a list of files made loadable by links.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
FILE_TYPE = "general.file_type"
DEFAULT_ALIGNMENT = 32
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# GGUF value types (gguf.h): id -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U16, _U32, _I32 = 2, 4, 5


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a GGUF header; `offset` is from the start of the file."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class Header:
    """What a GGUF file's header says: scalar metadata (arrays are skipped), where each scalar
    value and the whole metadata section lie, the tensors, and where the data starts."""

    version: int
    kv: dict[str, object]
    kv_count: int
    kv_span: tuple[int, int]  # byte range of the key-value pairs
    scalar_at: dict[str, tuple[int, int]]  # key -> (value type, offset of its value)
    tensors: tuple[TensorInfo, ...]
    data_start: int
    alignment: int
    file_bytes: int

    @property
    def split_count(self) -> int:
        return int(self.kv.get(SPLIT_COUNT) or 1)


def read_header(path: str | Path, /) -> Header:
    """Parse the header of a GGUF v2/v3 file (ValueError or struct.error when it is not one)."""
    p = Path(path)
    with p.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(buf):
                raise ValueError("a string runs past the end of the file")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

        def value(kind: int):
            nonlocal pos
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, count = take("<I"), take("<Q")
                if item in _SCALARS:
                    pos += count * struct.calcsize(_SCALARS[item])
                else:
                    for _ in range(count):
                        value(item)
                return None  # arrays are skipped: nothing here needs them
            raise ValueError(f"unknown metadata value type {kind}")

        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ValueError("bad magic")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = take("<Q"), take("<Q")
        kv: dict[str, object] = {}
        scalar_at: dict[str, tuple[int, int]] = {}
        kv_start = pos
        for _ in range(n_kv):
            key = string()
            kind = take("<I")
            if kind in _SCALARS:
                scalar_at[key] = (kind, pos)
            kv[key] = value(kind)
        kv_end = pos
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(take("<Q") for _ in range(take("<I")))
            infos.append((name, dims, take("<I"), take("<Q")))
        alignment = int(kv.get("general.alignment") or DEFAULT_ALIGNMENT)
        data_start = _align(pos, alignment)
        size = len(buf)
    tensors = tuple(TensorInfo(n, d, t, data_start + off) for n, d, t, off in infos)
    return Header(version, kv, n_kv, (kv_start, kv_end), scalar_at, tensors, data_start,
                  alignment, size)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def split_path(prefix: str | Path, no: int, count: int, /) -> Path:
    """The file of split `no` (0-based) of `count`: `PREFIX-%05d-of-%05d.gguf`, as llama.cpp."""
    p = Path(prefix)
    return p.with_name(f"{p.name}-{no + 1:05d}-of-{count:05d}.gguf")


def split_files(path: str | Path, /) -> list[Path]:
    """Every file of the model whose (first) file is `path`: itself alone when it is not split."""
    p = Path(path)
    m = _SPLIT_NAME.match(p.name)
    if m is None or int(m.group("no")) != 1 or int(m.group("count")) == 1:
        return [p]
    count = int(m.group("count"))
    prefix = p.with_name(m.group("prefix"))
    return [split_path(prefix, i, count) for i in range(count)]


def _kv_scalar(key: str, kind: int, value: int) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", kind) + struct.pack(
        _SCALARS[kind], value)


def _split_keys(no: int, count: int, total: int) -> bytes:
    """The three keys llama-quantize writes into every split (u16, u16, i32)."""
    return (_kv_scalar(SPLIT_NO, _U16, no) + _kv_scalar(SPLIT_COUNT, _U16, count)
            + _kv_scalar(SPLIT_TENSORS, _I32, total))


def tensor_split_bytes(info: TensorInfo, data: bytes | memoryview, /, *, no: int, count: int,
                       total: int) -> bytes:
    """A split file holding one tensor (`info`'s name, shape and type; `data` its bytes) at
    place `no` of `count`, in a model of `total` tensors."""
    name = info.name.encode()
    head = (GGUF_MAGIC + struct.pack("<IQQ", 3, 1, 3) + _split_keys(no, count, total)
            + struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.shape))
            + b"".join(struct.pack("<Q", d) for d in info.shape)
            + struct.pack("<IQ", info.ggml_type, 0))
    return head + bytes(_align(len(head), DEFAULT_ALIGNMENT) - len(head)) + bytes(data)


def metadata_split_bytes(source: str | Path, /, *, count: int, total: int,
                         set_u32: Mapping[str, int] | None = None) -> bytes:
    """The first split of a model: `source`'s metadata (copied byte for byte, the u32 keys in
    `set_u32` given new values in place), the three split keys, and no tensor."""
    header = read_header(source)
    start, end = header.kv_span
    with Path(source).open("rb") as f:
        f.seek(start)
        kv = bytearray(f.read(end - start))
    for key, value in (set_u32 or {}).items():
        kind, at = header.scalar_at.get(key, (None, 0))
        if kind != _U32:
            raise ValueError(f"{source} has no u32 key {key} to set")
        struct.pack_into("<I", kv, at - start, value)
    head = (GGUF_MAGIC + struct.pack("<IQQ", 3, 0, header.kv_count + 3) + bytes(kv)
            + _split_keys(0, count, total))
    return head + bytes(_align(len(head), header.alignment) - len(head))
