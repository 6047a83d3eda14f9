"""The serving footprint, measured in a child process on a real built model."""

from __future__ import annotations

from pathlib import Path

from apreqeld.evidence.footprint import measure_footprint
from apreqeld.gguf.view import read_model
from support import BuiltPlan


def test_footprint_counts_what_a_decode_needs(built_plan: BuiltPlan) -> None:
    m = measure_footprint(built_plan.gguf, n_ctx=256, threads=1)
    params = read_model(built_plan.gguf).parameter_bytes
    # the file's pages were dropped from the page tables and a decode mapped back what it reads
    assert m["mapped_bytes_dropped"] >= params
    assert m["footprint_bytes"] == m["rss_loaded_bytes"] - m["baseline_rss_bytes"]
    assert m["footprint_bytes"] <= m["rss_after_load_bytes"] - m["baseline_rss_bytes"] + 2**20
    # weights a decode reads are resident, plus a KV cache and buffers of some MiB
    assert params * 0.5 < m["footprint_bytes"] < params + 256 * 2**20
    assert m["n_ctx"] == 256 and m["baseline_rss_bytes"] > 0


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    import pytest

    from apreqeld.errors import EngineError

    with pytest.raises(EngineError, match="footprint of nothing.gguf could not be measured"):
        measure_footprint(tmp_path / "nothing.gguf", n_ctx=64, threads=1)


def test_the_same_tensors_measure_the_same_in_any_file(built_plan: BuiltPlan,
                                                        tmp_path: Path) -> None:
    """Metadata that shifts the tensors in the file changes which cached neighbours the kernel
    maps with a faulting page (fault-around); the page cache is evicted so it cannot count."""
    from apreqeld.build import _copy_with_metadata

    moved = tmp_path / "moved.gguf"
    _copy_with_metadata(built_plan.gguf, moved, {"test.padding": "x" * 70_000})
    a = measure_footprint(built_plan.gguf, n_ctx=256, threads=1)
    b = measure_footprint(moved, n_ctx=256, threads=1)
    assert abs(a["footprint_bytes"] - b["footprint_bytes"]) < 2 * 2**20
