"""Reading `llama-quantize --tensor-type-file` recipes: what apreqel writes reads back, the
first matching line wins, and bad lines are one-line errors naming file and line."""

from __future__ import annotations

import pytest

from apreqeld.core.recipes import llama_quantize_recipe, parse_tensor_type_file
from apreqeld.errors import InputError

TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight",
           "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.10.ffn_down.weight"]


def test_what_apreqel_writes_reads_back() -> None:
    recipe = {t: ["q8_0", "q4_0", "q4_K"][i % 3] for i, t in enumerate(TENSORS)}
    assert parse_tensor_type_file(llama_quantize_recipe(recipe), TENSORS) == recipe


def test_first_match_wins_and_unmatched_tensors_are_left_out() -> None:
    text = ("# protect the first blocks\n\n"
            "blk\\.[01]\\.FFN_DOWN=q6_K\n"   # patterns are lower-cased, like llama.cpp's
            "ffn_down=q4_K\n"
            "attn_.*=Q5_0\n")
    assert parse_tensor_type_file(text, TENSORS) == {
        "blk.0.attn_q.weight": "q5_0", "blk.0.attn_v.weight": "q5_0",
        "blk.0.ffn_down.weight": "q6_K", "blk.1.ffn_down.weight": "q6_K",
        "blk.10.ffn_down.weight": "q4_K"}


@pytest.mark.parametrize(("text", "message"), [
    ("attn_v=q4_0\nffn_down\n", r"r\.txt:2: expected PATTERN=TYPE, got 'ffn_down'"),
    ("attn_v=q9_9\n", r"r\.txt:1: unknown quantization type 'q9_9'"),
    ("attn_(v=q4_0\n", r"r\.txt:1: bad pattern 'attn_\(v'"),
    ("# nothing\n\n", r"r\.txt: no PATTERN=TYPE line"),
])
def test_bad_lines_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_tensor_type_file(text, TENSORS, name="r.txt")
