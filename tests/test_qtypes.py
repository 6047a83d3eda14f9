"""Quantization types: lookup, parsing, llama.cpp's shape fallbacks and exact sizes."""

from __future__ import annotations

import pytest

from apreqeld.core.qtypes import (
    AUTO_CANDIDATES,
    PAPER_TYPES,
    effective_type,
    from_ggml,
    parse_types,
    qtype,
    quantizable,
)
from apreqeld.errors import InputError


@pytest.mark.parametrize("spelling", ["q4_K", "q4_k", "Q4_K", " Q4_k "])
def test_lookup_is_case_insensitive_and_returns_llama_cpp_spelling(spelling: str) -> None:
    assert qtype(spelling).name == "q4_K"


def test_unknown_name_is_named_and_known_types_are_listed() -> None:
    with pytest.raises(InputError, match=r"^unknown quantization type 'q9_9' \(known: .*q4_K.*\)$"):
        qtype("q9_9")


def test_every_advertised_type_is_in_the_registry() -> None:
    for name in PAPER_TYPES + AUTO_CANDIDATES:
        assert qtype(name).name == name


def test_parse_types_keeps_order_and_skips_blank_items() -> None:
    assert [q.name for q in parse_types("q8_0, Q4_0,,q5_k")] == ["q8_0", "q4_0", "q5_K"]
    assert [q.name for q in parse_types(["q6_K", "q3_K"])] == ["q6_K", "q3_K"]


@pytest.mark.parametrize("text", ["q4_0,q8_0,Q4_0", "q4_K,q4_k"])
def test_parse_types_rejects_duplicates_case_insensitively(text: str) -> None:
    with pytest.raises(InputError, match=r"^quantization type 'q4_(0|K)' is listed twice$"):
        parse_types(text)


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_parse_types_rejects_an_empty_list(text: str) -> None:
    with pytest.raises(InputError, match="^no quantization types given$"):
        parse_types(text)


def test_parse_types_names_the_unknown_type() -> None:
    with pytest.raises(InputError, match="unknown quantization type 'q9_9'"):
        parse_types("q4_0,q9_9")


@pytest.mark.parametrize(
    ("requested", "n_cols", "written"),
    [
        # SmolLM2's hidden size 576 is a multiple of 32 but not of 256: K-quants fall back.
        ("q4_K", 576, "q5_0"),
        ("q3_K", 576, "q4_0"),
        ("q2_K", 576, "q4_0"),
        ("q6_K", 576, "q8_0"),
        ("q5_K", 576, "q5_1"),
        ("iq4_xs", 576, "iq4_nl"),
        ("q8_0", 576, "q8_0"),
        ("q4_0", 576, "q4_0"),
        # ffn_down rows have 1536 = 6 x 256 weights: every K-quant is written as asked.
        ("q2_K", 1536, "q2_K"),
        ("q3_K", 1536, "q3_K"),
        ("q4_K", 1536, "q4_K"),
        ("q5_K", 1536, "q5_K"),
        ("q6_K", 1536, "q6_K"),
        ("iq4_xs", 1536, "iq4_xs"),
        # Neither the type nor its fallback fits: llama.cpp writes F16.
        ("q4_K", 48, "f16"),
        ("q4_0", 48, "f16"),
    ],
)
def test_effective_type_follows_llama_cpp_fallbacks(requested: str, n_cols: int,
                                                    written: str) -> None:
    assert effective_type(qtype(requested), n_cols).name == written


@pytest.mark.parametrize(
    ("name", "bpw", "block", "type_size"),
    [("q4_0", 4.5, 32, 18), ("q8_0", 8.5, 32, 34), ("q4_K", 4.5, 256, 144),
     ("q6_K", 6.5625, 256, 210), ("q5_0", 5.5, 32, 22), ("f16", 16.0, 1, 2)],
)
def test_bits_per_weight_and_block_layout(name: str, bpw: float, block: int,
                                          type_size: int) -> None:
    q = qtype(name)
    assert (q.bits_per_weight, q.block_size, q.type_size) == (bpw, block, type_size)
    assert q.row_bytes(576 if block < 256 else 1536) == (576 if block < 256 else 1536) \
        // block * type_size


def test_from_ggml_round_trips_registry_types() -> None:
    for name in ("q4_0", "q8_0", "q6_K", "f32", "bf16"):
        assert from_ggml(int(qtype(name).ggml)) is qtype(name)


@pytest.mark.parametrize(
    ("name", "n_dims", "expected"),
    [("blk.0.attn_q.weight", 2, True), ("token_embd.weight", 2, True),
     ("blk.0.attn_norm.weight", 1, False), ("output_norm.weight", 2, False),
     ("blk.3.ffn_gate_inp.weight", 2, False), ("blk.0.attn_q.bias", 2, False)],
)
def test_quantizable_mirrors_llama_cpp(name: str, n_dims: int, expected: bool) -> None:
    assert quantizable(name, n_dims) is expected
