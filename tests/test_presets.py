"""llama.cpp presets as plan-set candidates: the preset table, the dominance gaps against an
independent computation, and on the real model: which presets apply (tried through llama.cpp),
a tiny plan set with presets (replayed byte for byte, compared, re-timed without rebuilding)."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from apreqeld import engine
from apreqeld import planset as P
from apreqeld.core.frontier import dominance_gaps
from apreqeld.core.qtypes import PRESETS, parse_presets, preset_ftype
from apreqeld.errors import InputError
from apreqeld.evidence import footprint as FP
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.split import split_files
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.manifest import PlanSet, load_planset, parse_planset
from apreqeld.store.shards import model_identity
from support import PROTOCOL, TINY_TYPES

TINY_PRESETS = "Q4_K_M,Q4_0"

# --------------------------------------------------------------------------- pure parts


def test_preset_table() -> None:
    assert parse_presets(None) == parse_presets("all") == PRESETS and len(PRESETS) == 16
    assert parse_presets("none") == ()
    assert parse_presets("q4_k_m, Q8_0") == ("Q4_K_M", "Q8_0")
    assert preset_ftype("Q4_K_M") == 15 and preset_ftype("iq4_xs") == 30
    for bad in ("Q4_K_X", "F16", "Q8_0,Q8_0"):
        with pytest.raises(InputError):
            parse_presets(bad)


def brute_force_gaps(points: np.ndarray, targets: list[int],
                     others: list[int]) -> list[tuple[list[int], int | None, list[float]]]:
    out = []
    for t in targets:
        doms, best, best_worst, best_excess = [], None, None, []
        for o in others:
            if o == t:
                continue
            a, b = points[o], points[t]
            if all(a[k] <= b[k] for k in range(len(a))) and any(
                    a[k] < b[k] for k in range(len(a))):
                doms.append(o)
            excess = [(a[k] - b[k]) / (abs(b[k]) if b[k] != 0 else 1.0) for k in range(len(a))]
            if best_worst is None or max(excess) < best_worst:
                best, best_worst, best_excess = o, max(excess), excess
        out.append((doms, best, best_excess))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_dominance_gaps_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 5, size=(30, 3)).astype(float)  # ties, duplicates and zeros
    targets = sorted(rng.choice(30, size=8, replace=False).tolist())
    others = [i for i in range(30) if i not in targets[:5]]  # three targets are also others
    got = dominance_gaps(points, targets, others)
    want = brute_force_gaps(points, targets, others)
    for (d, c, m), (wd, wc, wm) in zip(got, want, strict=True):
        assert d == wd and c == wc and m == pytest.approx(wm)
        if d:
            assert max(m) <= 0  # a dominator is at least as close as the closest
    assert dominance_gaps(points, [0], [0]) == [([], None, [])]


def test_protect_recipe() -> None:
    ladder = ["q8_0", "q5_0", "q4_0"]
    recipe = {"blk.0.attn_v.weight": "q4_0", "blk.0.attn_q.weight": "q4_0",
              "blk.1.ffn_down.weight": "q8_0", "blk.1.ffn_up.weight": "q5_0",
              "token_embd.weight": "q4_0"}
    got = P.protect_recipe(recipe, ladder, ("attn_v", "ffn_down"))
    assert got == recipe | {"blk.0.attn_v.weight": "q5_0"}
    assert P.protect_recipe(recipe, ladder, ()) == recipe


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def probes(source_view: ModelView, reference: Reference, workspace: Workspace) -> dict:
    """Every preset of the table, and IQ2_XXS (needs an imatrix), tried on the F16 reference."""
    return {n: P.probe_preset(reference.path, n, source_view, workspace=workspace,
                              model_sha256=reference.source_sha256, threads=PROTOCOL.threads)
            for n in (*PRESETS, "IQ2_XXS")}


def test_only_presets_llama_cpp_accepts(probes: dict, source_view: ModelView) -> None:
    assert not probes["IQ2_XXS"]["applies"]
    assert "imatrix" in probes["IQ2_XXS"]["error"]
    applied = [n for n in PRESETS if probes[n]["applies"]]
    assert applied == list(PRESETS)  # every row of SmolLM2 has a fallback type
    quantizable = {t.name for t in source_view.tensors if t.quantizable}
    for n in applied:
        assert set(probes[n]["recipe"]) == quantizable
    # llama.cpp's own mixing, with its shape fallbacks (576-wide rows cannot hold q4_K)
    km = probes["Q4_K_M"]["recipe"]
    assert km["blk.0.attn_q.weight"] == "q5_0" and len(set(km.values())) > 2
    assert km != probes["Q4_K_S"]["recipe"]


@pytest.fixture(scope="session")
def preset_planset(source_model: Path, workspace: Workspace, device_profile: dict,
                   layer_profile: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("plans") / "presets"
    planset = P.run_planset(source_model, out, workspace=workspace, protocol=PROTOCOL,
                            types=TINY_TYPES, step=0.5, paper=False, calibration_tokens=256,
                            serving_ctx=384, presets=TINY_PRESETS, aim=False)
    return {"planset": planset, "out": out}


def test_presets_are_members_and_compared(preset_planset: dict) -> None:
    ps: PlanSet = preset_planset["planset"]
    assert [p.name for p in ps.presets] == ["Q4_K_M", "Q4_0"]
    kinds = {m.id: m for m in ps.members}
    for p in ps.presets:
        m = kinds[p.member]
        assert m.ftype == p.name and p.ftype == preset_ftype(p.name)
        assert m.kind == ("uniform" if p.name == "Q4_0" else "preset")  # Q4_0 is uniform q4_0
        own = [i for i, x in enumerate(ps.members) if x.kind != "preset"]
        points = np.array([P._objectives(x.measured, ps.accuracy) for x in ps.members])
        t = ps.members.index(m)
        ((doms, near, miss),) = brute_force_gaps(points, [t], own)
        assert p.dominated_by == [ps.members[i].id for i in doms]
        assert p.closest == ps.members[near].id
        assert list(p.miss.values()) == pytest.approx(miss, abs=1e-6)
    assert ps.protocol["planning"]["presets"] == {"asked": ["Q4_K_M", "Q4_0"], "rejected": {}}
    for m in ps.members:  # the detector's verdict is recorded for every member
        assert m.measured.latency.n == PROTOCOL.reps
        assert m.measured.latency.disturbed == (m.measured.latency.reason is not None)
    assert load_planset(preset_planset["out"]) == ps


def test_preset_assembled_from_the_store_is_the_preset(preset_planset: dict,
                                                       reference: Reference,
                                                       workspace: Workspace,
                                                       tmp_path: Path) -> None:
    """A preset member assembled from shards (quantized one tensor at a time, from an empty
    state dir) has the bytes llama.cpp's own preset (its own mixing, one quantization of the
    whole model) writes, tensor by tensor."""
    ps: PlanSet = preset_planset["planset"]
    m = next(m for m in ps.members if m.ftype == "Q4_K_M")
    fresh = Workspace(workspace.root, state_dir=tmp_path / "fresh")
    path = P.materialize(ps, workspace=fresh, members=[m])[m.id]
    assert model_identity(path) == m.assembly_sha256
    direct = tmp_path / "direct.gguf"
    engine.quantize(reference.path, direct, ftype=preset_ftype("Q4_K_M"), pure=False,
                    threads=PROTOCOL.threads)
    ours = {t.name: bytes(t.data) for f in split_files(path) for t in gguf.GGUFReader(f).tensors}
    theirs = {t.name: bytes(t.data) for t in gguf.GGUFReader(direct).tensors}
    assert ours == theirs
    assert read_model(direct).tensor_types() == read_model(path).tensor_types()


def test_retime_rebuilds_nothing(preset_planset: dict, workspace: Workspace,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = preset_planset["out"], preset_planset["planset"]

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("a re-time must not rebuild or re-score")

    for name in ("measure_file", "probe_preset"):
        monkeypatch.setattr(P, name, forbidden)
    monkeypatch.setattr(engine, "quantize_tensor", forbidden)
    monkeypatch.setattr(FP, "measure_footprint", forbidden)
    updated = P.retime_planset(out, workspace=workspace)
    assert updated.protocol["retimed"] == 1
    old = {m.id: m for m in before.members}
    for m in updated.members:
        assert m.measured.model_copy(update={"latency": old[m.id].measured.latency}) == \
            old[m.id].measured
        assert m.recipe == old[m.id].recipe
        assert m.assembly_sha256 == old[m.id].assembly_sha256
    assert [p.name for p in updated.presets] == [p.name for p in before.presets]
    assert load_planset(out) == updated
    assert any(m.measured.latency != old[m.id].measured.latency for m in updated.members)


def test_protect_names_model_tensors(source_view: ModelView) -> None:
    assert P.parse_protect("attn_v, ffn_down", source_view) == ("attn_v", "ffn_down")
    with pytest.raises(InputError, match="blk.N.attn_x"):
        P.parse_protect("attn_x", source_view)


def test_bad_preset_comparison_is_rejected(preset_planset: dict) -> None:
    data = preset_planset["planset"].model_dump(mode="json")
    data["presets"][0]["member"] = "f" * 12
    with pytest.raises(InputError, match="presets names member|preset Q4_K_M"):
        parse_planset(data)


def test_retime_judges_the_aiming_predictor_again(preset_planset: dict, workspace: Workspace,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(preset_planset["out"], out)
    ps = load_planset(out)
    predictions = {m.id: {"footprint_bytes": m.measured.footprint_bytes * 1.1,
                          "latency_ms": 1.0, "kld": m.measured.kld} for m in ps.members}
    planning = ps.protocol["planning"] | {"aim": {"predictions": predictions,
                                                  "prediction_error": {}}}
    P.write_planset(ps.model_copy(update={"protocol": ps.protocol | {"planning": planning}}),
                    out)
    updated = P.retime_planset(out, workspace=workspace)
    errors = updated.protocol["planning"]["aim"]["prediction_error"]
    latency = [abs(1.0 / m.measured.latency.median_ms - 1) for m in updated.members]
    assert errors["latency_ms"]["median"] == pytest.approx(float(np.median(latency)), abs=1e-4)
    assert errors["latency_ms"]["max"] == pytest.approx(max(latency), abs=1e-4)
    assert errors["footprint_bytes"] == {"median": pytest.approx(0.1), "max": pytest.approx(0.1)}
    assert errors["kld"]["max"] == 0.0
