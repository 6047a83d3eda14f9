"""The serving footprint, measured in a child process on a real built model."""

from __future__ import annotations

from pathlib import Path

from apreqeld.evidence.footprint import measure_footprint
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from support import BuiltPlan, uniform_path


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


def test_only_the_file_pages_a_decode_reads_are_counted(device_profile: dict,
                                                         workspace: Workspace,
                                                         reference: Reference) -> None:
    """In uniform q4_0 llama.cpp repacks every sublayer weight for the CPU; a decode then reads
    from the file only the (tied) token embedding and the norms. The kernel maps cached
    neighbours of each faulting page too (fault-around): without evicting the page cache this
    model counted 34 MiB of file pages beyond those."""
    path = uniform_path(workspace, reference, "q4_0")
    m = measure_footprint(path, n_ctx=256, threads=1)
    read_by_decode = sum(t.n_bytes for t in read_model(path).tensors
                         if t.qtype.name in ("q8_0", "f32"))
    assert read_by_decode - 2**20 < m["model_file_rss_bytes"] < read_by_decode + 2**20
