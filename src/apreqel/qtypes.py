"""Quantization types: a small registry by name, with llama.cpp's block sizes and fallbacks.

The registry mirrors what `llama_model_quantize` really writes, so sizes and bits per weight
are computed for the type each tensor gets, not the type that was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from .errors import InputError


@dataclass(frozen=True)
class QType:
    """One ggml tensor type that llama.cpp can quantize to without an importance matrix."""

    name: str  # llama.cpp's spelling, e.g. "q4_K"
    ggml: GGMLQuantizationType
    ftype: LlamaFileType  # the file type whose default tensor type this is

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def tensor_bytes(self, n_elements: int) -> int:
        """Bytes of `n_elements` weights in this type (a whole number of blocks)."""
        return n_elements // self.block_size * self.type_size

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of `n_cols` weights in this type (n_cols a multiple of the block)."""
        return n_cols // self.block_size * self.type_size


_G = GGMLQuantizationType
_F = LlamaFileType
_REGISTRY: dict[str, QType] = {
    q.name.lower(): q
    for q in (
        QType("f32", _G.F32, _F.ALL_F32),
        QType("f16", _G.F16, _F.MOSTLY_F16),
        QType("bf16", _G.BF16, _F.MOSTLY_BF16),
        QType("q8_0", _G.Q8_0, _F.MOSTLY_Q8_0),
        QType("q6_K", _G.Q6_K, _F.MOSTLY_Q6_K),
        QType("q5_1", _G.Q5_1, _F.MOSTLY_Q5_1),
        QType("q5_0", _G.Q5_0, _F.MOSTLY_Q5_0),
        QType("q5_K", _G.Q5_K, _F.MOSTLY_Q5_K_S),
        QType("q4_1", _G.Q4_1, _F.MOSTLY_Q4_1),
        QType("q4_0", _G.Q4_0, _F.MOSTLY_Q4_0),
        QType("q4_K", _G.Q4_K, _F.MOSTLY_Q4_K_S),
        QType("iq4_nl", _G.IQ4_NL, _F.MOSTLY_IQ4_NL),
        QType("iq4_xs", _G.IQ4_XS, _F.MOSTLY_IQ4_XS),
        QType("q3_K", _G.Q3_K, _F.MOSTLY_Q3_K_S),
        QType("q2_K", _G.Q2_K, _F.MOSTLY_Q2_K),
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
    found = _BY_GGML.get(GGMLQuantizationType(ggml_type))
    if found is None:
        return QType(GGMLQuantizationType(ggml_type).name.lower(), GGMLQuantizationType(ggml_type),
                     _F.GUESSED)
    return found


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
