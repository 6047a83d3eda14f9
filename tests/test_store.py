"""The shard store: content addressing, checks that find corrupt shards, assembly by links,
the split-file format against gguf-py and llama.cpp, shards equal to llama.cpp's own
quantization of the whole model, two processes filling at once, pruning that never removes a
shard a plan set uses, and state dirs other users could write refused."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest

from apreqeld import engine
from apreqeld.core.qtypes import qtype
from apreqeld.errors import InputError
from apreqeld.evidence.reference import Reference
from apreqeld.gguf.split import (
    TensorInfo,
    metadata_split_bytes,
    read_header,
    split_files,
    split_path,
    tensor_split_bytes,
)
from apreqeld.gguf.view import read_model
from apreqeld.manifest import PlanSet, assembly_of
from apreqeld.store.fill import assembled, fill
from apreqeld.store.shards import Assembly, MissingShards, ShardStore, check_private
from support import THREADS

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the format


def test_a_tensor_split_reads_back_with_gguf_py(tmp_path: Path) -> None:
    data = np.arange(32 * 4, dtype=np.float32)
    info = TensorInfo("blk.0.attn_q.weight", (32, 4), 0, 0)
    path = tmp_path / "x-00002-of-00003.gguf"
    path.write_bytes(tensor_split_bytes(info, data.tobytes(), no=1, count=3, total=2))
    header = read_header(path)
    assert header.kv == {"split.no": 1, "split.count": 3, "split.tensors.count": 2}
    assert [(t.name, t.shape, t.ggml_type) for t in header.tensors] == [
        ("blk.0.attn_q.weight", (32, 4), 0)]
    assert header.tensors[0].offset % 32 == 0
    reader = gguf.GGUFReader(path)
    (tensor,) = reader.tensors
    assert np.array_equal(np.asarray(tensor.data).reshape(-1), data)
    assert reader.fields["split.no"].types[0] == gguf.GGUFValueType.UINT16
    assert reader.fields["split.tensors.count"].types[0] == gguf.GGUFValueType.INT32


def test_split_names_follow_llama_cpp(tmp_path: Path) -> None:
    first = split_path(tmp_path / "m", 0, 3)
    assert first.name == "m-00001-of-00003.gguf"
    assert [p.name for p in split_files(first)] == [
        "m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    assert split_files(tmp_path / "single.gguf") == [tmp_path / "single.gguf"]
    assert split_files(tmp_path / "m-00002-of-00003.gguf") == [
        tmp_path / "m-00002-of-00003.gguf"]


@pytest.mark.integration
def test_the_metadata_split_is_the_references_metadata(reference: Reference,
                                                       tmp_path: Path) -> None:
    blob = metadata_split_bytes(reference.path, count=273, total=272,
                                set_u32={"general.file_type": qtype("q8_0").ftype})
    path = tmp_path / "meta.gguf"
    path.write_bytes(blob)
    ours, theirs = gguf.GGUFReader(path).fields, gguf.GGUFReader(reference.path).fields
    assert [k for k in ours if not k.startswith("split.")] == list(theirs)
    assert ours["general.file_type"].contents() == qtype("q8_0").ftype
    assert ours["split.count"].contents() == 273
    tokens = "tokenizer.ggml.tokens"
    assert ours[tokens].contents()[:50] == theirs[tokens].contents()[:50]
    assert not gguf.GGUFReader(path).tensors


# --------------------------------------------------------------------------- shards


def test_shards_are_content_addressed_read_only_and_stamped(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "state")
    sha = store.add(b"one shard")
    assert sha == hashlib.sha256(b"one shard").hexdigest()
    path = store.shard_path(sha)
    assert path.read_bytes() == b"one shard" and path.stat().st_mode & 0o777 == 0o444
    assert store.add(b"one shard") == sha and store.has(sha)
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "deleted"])
def test_a_damaged_shard_is_found_by_its_sha256_and_removed(tmp_path: Path,
                                                             damage: str) -> None:
    store = ShardStore(tmp_path / "state")
    sha = store.add(b"x" * 10_000)
    path = store.shard_path(sha)
    path.chmod(0o644)
    if damage == "overwritten":
        with path.open("r+b") as f:
            f.seek(5000)
            f.write(b"y")
    elif damage == "truncated":
        os.truncate(path, 5000)
    else:
        path.unlink()
    missing, corrupt = store.check([sha])
    assert missing == [sha] and corrupt == ([] if damage == "deleted" else [sha])
    assert not path.exists()


def test_a_touched_but_intact_shard_is_hashed_once_and_kept(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "state")
    sha = store.add(b"intact")
    path = store.shard_path(sha)
    os.utime(path)  # a new mtime: the stamp no longer matches
    before = path.stat().st_mtime_ns
    assert store.has(sha)  # hashed, found intact, stamped again
    assert path.stat().st_mtime_ns != before and store.check([sha]) == ([], [])


def test_assembly_links_every_shard_in_order(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "state")
    shas = tuple(store.add(f"part {i}".encode()) for i in range(4))
    assembly = Assembly(shas)
    first = store.assemble(assembly)
    assert first == store.member_path(assembly) and first.name.endswith("-00001-of-00004.gguf")
    assert [f.read_bytes() for f in split_files(first)] == [f"part {i}".encode()
                                                            for i in range(4)]
    assert all(f.is_symlink() and not Path(os.readlink(f)).is_absolute()
               for f in split_files(first))
    assert store.assemble(assembly) == first and store.assembled(assembly)
    store.shard_path(shas[2]).unlink()
    assert not store.assembled(assembly)
    with pytest.raises(MissingShards, match="1 shard\\(s\\) missing") as err:
        store.assemble(assembly)
    assert err.value.missing == (shas[2],)
    assert Assembly(shas).identity == hashlib.sha256("\n".join(shas).encode()).hexdigest()


def test_many_threads_assembling_the_same_model_agree(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "state")
    assembly = Assembly(tuple(store.add(f"s{i}".encode()) for i in range(20)))
    found, errors = [], []

    def one() -> None:
        try:
            found.append(ShardStore(tmp_path / "state").assemble(assembly))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(found)) == 1
    assert [p.name for p in store.members.iterdir()] == [found[0].parent.name]


# --------------------------------------------------------------------------- ownership


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(InputError, match=r"state dir .* is writable by other users \(mode "
                                         r"0777\)"):
        ShardStore(state)
    state.chmod(0o755)
    store = ShardStore(state)
    store.root.chmod(0o775)
    with pytest.raises(InputError, match="shard store .* writable by other users"):
        ShardStore(state)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path, run_cli) -> None:
    state = tmp_path / "theirs"
    state.mkdir()
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(state, nobody, -1)
    with pytest.raises(InputError, match=f"belongs to uid {nobody}, not to this user"):
        check_private(state, "state dir")
    done = run_cli("cache", "--state-dir", state)
    assert done.returncode == 1 and len(done.error_lines) == 1
    assert f"belongs to uid {nobody}" in done.error_lines[0]


# --------------------------------------------------------------------------- real shards


def _uniform(view, type_name: str) -> dict[str, str]:
    """Every quantizable tensor at `type_name` (the token embedding too)."""
    return {t.name: type_name for t in view.tensors if t.quantizable}


@pytest.mark.integration
def test_shards_are_the_bytes_llama_cpp_writes_for_the_whole_model(
        reference: Reference, tmp_path: Path) -> None:
    """Every tensor of a whole-model llama.cpp quantization (q4_K, with its fallbacks on
    576-wide rows) is byte for byte the store's shard of that tensor and type."""
    view = reference.source
    recipe = _uniform(view, "q4_K")
    whole = tmp_path / "whole.gguf"
    engine.quantize(reference.path, whole, tensor_types=recipe, base="q4_K", threads=THREADS)
    store = ShardStore(tmp_path / "state")
    _, found = assembled(store, reference.path, reference.source_sha256,
                         {"m": (recipe, "q4_K")}, threads=2)
    first, _ = found["m"]
    theirs = {t.name: (int(t.tensor_type), bytes(t.data))
              for t in gguf.GGUFReader(whole).tensors}
    ours = {t.name: (int(t.tensor_type), bytes(t.data))
            for f in split_files(first) for t in gguf.GGUFReader(f).tensors}
    assert ours == theirs
    assert {q for q, _ in ours.values()} >= {qtype("q4_K").ggml, qtype("q5_0").ggml}
    assert read_model(first).tensor_types() == read_model(whole).tensor_types()


@pytest.mark.integration
def test_filling_twice_quantizes_nothing_the_second_time(reference: Reference,
                                                         tmp_path: Path) -> None:
    view = reference.source
    names = [t.name for t in view.sublayers[0].tensors if t.quantizable]
    store = ShardStore(tmp_path / "state")
    first = fill(store, reference.path, reference.source_sha256, {n: {"q4_0"} for n in names},
                 bases={"q8_0"})
    assert first.quantized == len(names) and first.reused == 0
    again = fill(store, reference.path, reference.source_sha256, {n: {"q4_0"} for n in names},
                 bases={"q8_0"})
    assert again.quantized == again.copied == 0 and again.table == first.table
    index = json.loads(store.index_path(reference.source_sha256,
                                        engine.engine_version()).read_text())
    assert all(index["shards"][n]["q4_0"] == first.table.shards[n]["q4_0"] for n in names)


FILL_SCRIPT = """
import json, sys
from pathlib import Path
from apreqeld.store.fill import fill
from apreqeld.store.shards import ShardStore
state, ref, sha = sys.argv[1:4]
names = json.loads(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()
done = fill(ShardStore(Path(state)), Path(ref), sha, {n: {"q5_0"} for n in names},
            bases={"q8_0"})
print(json.dumps({"quantized": done.quantized, "table": done.table.model_dump()}))
"""


@pytest.mark.integration
def test_two_processes_filling_at_once_build_each_shard_once(reference: Reference,
                                                              tmp_path: Path) -> None:
    names = [t.name for s in reference.source.sublayers[:4] for t in s.tensors
             if t.quantizable]
    args = [sys.executable, "-c", FILL_SCRIPT, str(tmp_path / "state"), str(reference.path),
            reference.source_sha256, json.dumps(names)]
    procs = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # both go at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["quantized"] for r in results) == [0, len(names)]
    assert results[0]["table"] == results[1]["table"]
    store = ShardStore(tmp_path / "state")
    assert list((store.root / "tmp").iterdir()) == []


def _fake_planset(store: ShardStore, name: str, blobs: list[bytes]) -> PlanSet:
    """A one-member plan set whose shards are `blobs` (metadata first), saved beside `store`."""
    from apreqeld.manifest import (
        LatencyStats,
        Member,
        Metrics,
        ModelInfo,
        Serving,
        ShardTable,
        assembly_sha256,
        save_planset,
    )

    shas = [store.add(b) for b in blobs]
    tensors = [f"t{i}.weight" for i in range(len(blobs) - 1)]
    table = ShardTable(engine="e", tensors=tensors, metadata={"q8_0": shas[0]}, fixed={},
                       shards={t: {"q8_0": s} for t, s in zip(tensors, shas[1:], strict=True)})
    recipe = {t: "q8_0" for t in tensors}
    stats = LatencyStats(median_ms=1, iqr_ms=0, mean_ms=1, std_ms=0, n=1)
    member = Member(id="a" * 12, kind="uniform", label="x", base_type="q8_0", recipe=recipe,
                    assembly_sha256=assembly_sha256(assembly_of(table, recipe, "q8_0")),
                    measured=Metrics(parameter_bytes=1, footprint_bytes=1, latency=stats,
                                     ppl=1, ppl_se=0, kld=0, kld_se=0), pareto=True)
    planset = PlanSet(name=name, created="2026", model=ModelInfo(
        name="m", sha256="c" * 64, path="/m", architecture="llama"), engine="e", device={},
        protocol={}, serving=Serving(n_ctx=8, threads=1, gpu_layers=0), members=[member],
        store=table)
    folder = store.state_dir.parent / "plans" / name
    save_planset(planset, folder)
    store.register(planset, folder / "planset.json")
    return planset


def test_pruning_never_removes_a_shard_a_plan_set_uses(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "state")
    a = _fake_planset(store, "a", [b"meta", b"shared", b"only a"])
    _fake_planset(store, "b", [b"meta", b"shared", b"only b"])
    unused = store.add(b"nobody's")
    assert store.usage()["unused_shards"] == 1
    with store.filling():  # a fill in progress: pruning waits for none, it refuses
        with pytest.raises(InputError, match="being built right now"):
            store.prune()
    result = store.prune()
    assert result["removed_shards"] == 1 and not store.shard_path(unused).exists()
    (tmp_path / "plans" / "b" / "planset.json").unlink()  # b is gone: its own shard goes
    assert [r["stale"] for r in store.usage()["plansets"]] == [False, True]
    assert store.prune()["removed_shards"] == 0  # kept until forgotten
    result = store.prune(forget_stale=True)
    assert result["removed_shards"] == 1
    kept = {m.assembly_sha256 for m in a.members}
    first = store.assemble(Assembly(tuple(assembly_of(a.store, a.members[0].recipe,
                                                      "q8_0"))))
    assert Assembly(tuple(Path(os.readlink(f)).stem for f in split_files(first))).identity \
        in kept
