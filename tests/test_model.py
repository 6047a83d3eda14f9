"""The model view: a GGUF's tensors grouped into attention/FFN sublayers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from apreqeld.errors import InputError, ModelError
from apreqeld.gguf.view import ModelView, check_gguf_path, file_sha256, read_model
from support import TINY_BLOCK, write_tiny_gguf

# --------------------------------------------------------------------------- the default model


@pytest.mark.integration
def test_thirty_blocks_give_sixty_ordered_sublayers(source_view: ModelView) -> None:
    assert source_view.architecture == "llama"
    assert source_view.n_blocks == 30
    assert [s.name for s in source_view.sublayers] == [
        f"blk.{b}.{kind}" for b in range(30) for kind in ("attn", "ffn")]
    assert [(s.block, s.kind) for s in source_view.sublayers[:3]] == [
        (0, "attn"), (0, "ffn"), (1, "attn")]


@pytest.mark.integration
def test_sublayer_tensors_belong_to_their_block_and_kind(source_view: ModelView) -> None:
    for s in source_view.sublayers:
        prefix = f"blk.{s.block}.{s.kind}_"
        assert s.tensors, s.name
        assert all(t.name.startswith(prefix) for t in s.tensors), s.name
    attn = {t.name.split(".", 2)[2] for t in source_view.sublayers[0].tensors}
    ffn = {t.name.split(".", 2)[2] for t in source_view.sublayers[1].tensors}
    assert {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
            "attn_norm.weight"} == attn
    assert {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "ffn_norm.weight"} == ffn


@pytest.mark.integration
def test_outside_tensors_and_byte_totals(source_view: ModelView) -> None:
    outside = {t.name for t in source_view.outside}
    assert "token_embd.weight" in outside
    assert not any(name.startswith("blk.") for name in outside)
    assert source_view.parameter_bytes == sum(t.n_bytes for t in source_view.tensors)
    assert source_view.parameter_bytes == (sum(s.n_bytes for s in source_view.sublayers)
                                           + sum(t.n_bytes for t in source_view.outside))
    names = [t.name for t in source_view.tensors]
    assert len(names) == len(set(names)) == 272
    assert source_view.file_type is not None and source_view.file_type.name == "q4_1"
    assert source_view.parameter_bytes <= source_view.file_bytes


@pytest.mark.integration
def test_bytes_as_is_exact_for_the_stored_type(source_view: ModelView) -> None:
    """A tensor's size computed from its shape and type equals what the file stores."""
    for t in source_view.tensors:
        assert t.bytes_as(t.qtype) == t.n_bytes, t.name


@pytest.mark.integration
def test_to_dict_is_json_and_consistent(source_view: ModelView) -> None:
    data = json.loads(json.dumps(source_view.to_dict()))
    assert data["n_sublayers"] == len(data["sublayers"]) == 60
    assert data["parameter_bytes"] == source_view.parameter_bytes
    assert sum(s["bytes"] for s in data["sublayers"]) + sum(
        t["bytes"] for t in data["outside"]) == data["parameter_bytes"]


# --------------------------------------------------------------------------- files it refuses


def test_architecture_without_blocks_cannot_be_mapped(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "noblocks.gguf", ["token_embd.weight", "output.weight"],
                           arch="mamba-like")
    with pytest.raises(ModelError, match=r"architecture 'mamba-like' cannot be mapped"):
        read_model(path)


def test_a_block_without_ffn_cannot_be_mapped(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "half.gguf",
                           ["blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_q.weight"])
    with pytest.raises(ModelError, match=r"cannot map 'llama' onto sublayers: missing blk\.1\.ffn"):
        read_model(path)


def test_block_count_metadata_must_be_covered(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "short.gguf", TINY_BLOCK, block_count=2)
    with pytest.raises(ModelError, match=r"missing blk\.1\.attn, blk\.1\.ffn"):
        read_model(path)


def test_tiny_model_maps_onto_two_sublayers(tiny_model: Path) -> None:
    view = read_model(tiny_model)
    assert [s.name for s in view.sublayers] == ["blk.0.attn", "blk.0.ffn"]
    assert {t.name for t in view.outside} == {"token_embd.weight", "output_norm.weight"}
    assert view.parameter_bytes == 6 * 8 * 32 * 4


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^model file not found: .*nothing\.gguf$"):
        check_gguf_path(tmp_path / "nothing.gguf")
    with pytest.raises(InputError, match=r"^model path is not a file: "):
        read_model(tmp_path)


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelError, match=r"^not a GGUF file \(bad magic\): .*model\.gguf$"):
        read_model(path)


@pytest.mark.parametrize("keep", [12, 200, -100])
def test_truncated_gguf(tiny_model: Path, tmp_path: Path, keep: int) -> None:
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelError, match=r"truncated"):
        read_model(cut)


def test_file_sha256_is_remembered(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"apreqel" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path, cache_dir=tmp_path) == expected
    index = json.loads((tmp_path / "sha256.json").read_text())
    assert list(index.values()) == [expected]
    assert file_sha256(path) == expected
