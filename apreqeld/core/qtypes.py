"""Quantization types: a small registry by name, with llama.cpp's block sizes and fallbacks.

The registry mirrors what `llama_model_quantize` really writes, so sizes and bits per weight
are computed for the type each tensor gets, not the type that was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from apreqeld.errors import InputError

# ggml's tensor types: id -> (name, weights per block, bytes per block). The same table as
# ggml.h / gguf-py's GGML_QUANT_SIZES (a test checks it against gguf-py), kept here so that the
# pure core needs no file-format library.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34), 9: ("q8_1", 32, 40),
    10: ("q2_K", 256, 84), 11: ("q3_K", 256, 110), 12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176), 14: ("q6_K", 256, 210), 15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66), 17: ("iq2_xs", 256, 74), 18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50), 20: ("iq4_nl", 32, 18), 21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82), 23: ("iq4_xs", 256, 136), 24: ("i8", 1, 1), 25: ("i16", 1, 2),
    26: ("i32", 1, 4), 27: ("i64", 1, 8), 28: ("f64", 1, 8), 29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2), 34: ("tq1_0", 256, 54), 35: ("tq2_0", 256, 66), 39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36), 41: ("q1_0", 128, 18),
}
# llama.cpp's llama_ftype ids of the file types named below (llama.h).
FTYPE_IDS: dict[str, int] = {
    "ALL_F32": 0, "MOSTLY_F16": 1, "MOSTLY_Q4_0": 2, "MOSTLY_Q4_1": 3, "MOSTLY_Q8_0": 7,
    "MOSTLY_Q5_0": 8, "MOSTLY_Q5_1": 9, "MOSTLY_Q2_K": 10, "MOSTLY_Q3_K_S": 11,
    "MOSTLY_Q3_K_M": 12, "MOSTLY_Q3_K_L": 13, "MOSTLY_Q4_K_S": 14, "MOSTLY_Q4_K_M": 15,
    "MOSTLY_Q5_K_S": 16, "MOSTLY_Q5_K_M": 17, "MOSTLY_Q6_K": 18, "MOSTLY_IQ4_NL": 25,
    "MOSTLY_IQ2_XXS": 19, "MOSTLY_IQ4_XS": 30, "MOSTLY_BF16": 32, "GUESSED": 1024,
}
# llama.cpp's presets (llama-quantize's file-type names) a user would pick that need no
# importance matrix; whether one applies to a model is found by trying it.
PRESETS: tuple[str, ...] = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS",
)


@dataclass(frozen=True)
class QType:
    """One ggml tensor type that llama.cpp can quantize to without an importance matrix."""

    name: str  # llama.cpp's spelling, e.g. "q4_K"
    ggml: int  # ggml_type id
    ftype: int  # the llama_ftype whose default tensor type this is (GUESSED when none)
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def tensor_bytes(self, n_elements: int) -> int:
        """Bytes of `n_elements` weights in this type (a whole number of blocks)."""
        return n_elements // self.block_size * self.type_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of `n_cols` weights in this type (n_cols a multiple of the block)."""
        return n_cols // self.block_size * self.type_size


def _make(ggml: int, ftype: str = "GUESSED") -> QType:
    name, block, size = GGML_TYPES[ggml]
    return QType(name, ggml, FTYPE_IDS[ftype], block, size)


_REGISTRY: dict[str, QType] = {
    q.name.lower(): q
    for q in (
        _make(0, "ALL_F32"), _make(1, "MOSTLY_F16"), _make(30, "MOSTLY_BF16"),
        _make(8, "MOSTLY_Q8_0"), _make(14, "MOSTLY_Q6_K"), _make(7, "MOSTLY_Q5_1"),
        _make(6, "MOSTLY_Q5_0"), _make(13, "MOSTLY_Q5_K_S"), _make(3, "MOSTLY_Q4_1"),
        _make(2, "MOSTLY_Q4_0"), _make(12, "MOSTLY_Q4_K_S"), _make(20, "MOSTLY_IQ4_NL"),
        _make(23, "MOSTLY_IQ4_XS"), _make(11, "MOSTLY_Q3_K_S"), _make(10, "MOSTLY_Q2_K"),
    )
}
_BY_GGML = {q.ggml: q for q in _REGISTRY.values()}

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): what a 256-block type becomes when a
# tensor's row length is not a multiple of 256.
_FALLBACK = {
    "iq4_xs": "iq4_nl",
    "q2_K": "q4_0",
    "q3_K": "q4_0",
    "q4_K": "q5_0",
    "q5_K": "q5_1",
    "q6_K": "q8_0",
}

PAPER_TYPES: tuple[str, ...] = ("q3_K", "q4_K", "q5_K", "q6_K", "q8_0")
# Candidates for `--types auto`: the ladder is the subset a model's tensors accept as asked.
AUTO_CANDIDATES: tuple[str, ...] = (
    "q8_0", "q6_K", "q5_K", "q5_1", "q5_0", "q4_K", "q4_1", "q4_0", "iq4_nl", "q3_K", "q2_K",
)


def qtype(name: str) -> QType:
    """Look a type up by llama.cpp name, case-insensitively (`q4_k` and `Q4_K` are `q4_K`)."""
    found = _REGISTRY.get(name.strip().lower())
    if found is None:
        known = ", ".join(q.name for q in _REGISTRY.values())
        raise InputError(f"unknown quantization type '{name}' (known: {known})")
    return found


def from_ggml(ggml_type: int) -> QType:
    """The registry entry of a ggml type id as stored in a GGUF file."""
    found = _BY_GGML.get(int(ggml_type))
    if found is not None:
        return found
    if int(ggml_type) not in GGML_TYPES:
        raise InputError(f"unknown ggml tensor type id {ggml_type}")
    return _make(int(ggml_type))


def parse_types(text: str | Iterable[str]) -> tuple[QType, ...]:
    """Parse a comma-separated list of type names; duplicates and empty lists are errors."""
    names = [n for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise InputError("no quantization types given")
    types = tuple(qtype(n) for n in names)
    seen: set[str] = set()
    for q in types:
        if q.name in seen:
            raise InputError(f"quantization type '{q.name}' is listed twice")
        seen.add(q.name)
    return types


def effective_type(requested: QType, n_cols: int) -> QType:
    """The type llama.cpp really writes for a tensor with rows of `n_cols` (its fallback rule)."""
    if n_cols % requested.block_size == 0:
        return requested
    fallback = _FALLBACK.get(requested.name)
    if fallback is None or n_cols % qtype(fallback).block_size != 0:
        return _REGISTRY["f16"]
    return qtype(fallback)


_NOT_QUANTIZED = re.compile(r"_norm\.weight$|ffn_gate_inp\.weight$|altup|laurel|ssm_conv1d"
                            r"|shortconv\.conv\.weight|per_layer_model_proj|^position_embd"
                            r"|^token_types")


def quantizable(name: str, n_dims: int) -> bool:
    """Whether llama.cpp's quantizer touches this tensor (tensor_allows_quantization)."""
    return n_dims >= 2 and name.endswith("weight") and _NOT_QUANTIZED.search(name) is None


def preset_ftype(name: str) -> int:
    """The llama_ftype id of a preset name such as `Q4_K_M` (case-insensitive)."""
    key = f"MOSTLY_{name.strip().upper()}"
    if key not in FTYPE_IDS or key in ("MOSTLY_F16", "MOSTLY_BF16"):
        raise InputError(f"unknown llama.cpp preset '{name}' (known: {', '.join(PRESETS)})")
    return FTYPE_IDS[key]


def parse_presets(spec: str | None) -> tuple[str, ...]:
    """`all` (or None): every preset of PRESETS; `none`: no preset; else a comma list."""
    text = "all" if spec is None else spec.strip()
    if text.lower() == "all":
        return PRESETS
    if text.lower() in ("none", ""):
        return ()
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    for n in names:
        preset_ftype(n)
    if len(set(names)) != len(names):
        raise InputError(f"a preset is listed twice in '{spec}'")
    return tuple(names)
