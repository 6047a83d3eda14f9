"""Plan sets: the manifest schema, merging of identical plans, the measured front against an
independent computation, and on the real model: an interrupted run resumed without measuring
anything twice, materialization from the shard store, export byte for byte as `apreqel build`,
and a recorded device condition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apreqeld import engine
from apreqeld import planset as P
from apreqeld.build import build_gguf
from apreqeld.core.frontier import dominated_by, simplex_grid, unique_vectors
from apreqeld.core.metrics import latency_stats
from apreqeld.core.pareto import nondominated
from apreqeld.errors import InputError, PlanError
from apreqeld.evidence import footprint as FP
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.manifest import Member, PlanSet, load_planset, member_shards, parse_planset
from apreqeld.store.shards import Assembly, model_identity
from support import CLI_PROTOCOL_ARGS, PROTOCOL, TINY_TYPES, CliRunner

# Three types: with only two, every TOPSIS plan on this model is a uniform one.
PLANSET_TYPES = "q4_0,q5_0,q8_0"

# --------------------------------------------------------------------------- pure parts


def brute_force_dominators(points: np.ndarray) -> list[list[int]]:
    n = len(points)
    out = []
    for b in range(n):
        doms = []
        for a in range(n):
            if all(points[a][k] <= points[b][k] for k in range(points.shape[1])) and any(
                    points[a][k] < points[b][k] for k in range(points.shape[1])):
                doms.append(a)
        out.append(doms)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_front_matches_brute_force_and_moocore(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 4, size=(40, 3)).astype(float)  # many ties and duplicates
    found = dominated_by(points)
    assert found == brute_force_dominators(points)
    assert [not d for d in found] == nondominated(points).tolist()


def test_grid_and_unique_vectors() -> None:
    assert len(simplex_grid(0.1)) == 66
    assert all(abs(sum(v) - 1) < 1e-12 for v in simplex_grid(0.125))
    for bad in (0, -0.1, 0.3, 1.5, float("nan")):
        with pytest.raises(InputError, match="step"):
            simplex_grid(bad)
    assert unique_vectors([(1, 0, 0), (1.0, 0.0, 0.0), (0, 1, 0)]) == [(1, 0, 0), (0, 1, 0)]
    assert len(P.weight_vectors(step=0.1)) == 79  # 66 + 28, 15 of the paper's on the grid


def test_latency_stats_are_robust() -> None:
    s = latency_stats(np.array([5.0, 5.2, 5.1, 4.9, 60.0]))
    assert s["median_ms"] == 5.1 and s["n"] == 5 and s["iqr_ms"] == pytest.approx(0.2)
    assert s["mean_ms"] > 15


def test_bad_weights_file(tmp_path: Path) -> None:
    bad = tmp_path / "w.txt"
    bad.write_text("0.5,0.5\n")
    with pytest.raises(InputError, match=r"weights file .*line 1"):
        P.weight_vectors(weights_file=bad)
    with pytest.raises(InputError, match="not found"):
        P.weight_vectors(weights_file=tmp_path / "missing.txt")


def manifest_dict() -> dict:
    latency = {"median_ms": 5.0, "iqr_ms": 0.1, "mean_ms": 5.0, "std_ms": 0.1, "n": 3}
    member = {"id": "a" * 12, "kind": "mix", "label": "q8_0×60", "base_type": "q8_0",
              "recipe": {"blk.0.attn_q.weight": "q8_0"}, "file_sha256": "b" * 64,
              "file_bytes": 10, "weights": [[1, 0, 0]], "pareto": True,
              "measured": {"parameter_bytes": 9, "footprint_bytes": 20, "latency": latency,
                           "ppl": 20.0, "ppl_se": 1.0, "kld": 0.01, "kld_se": 0.001}}
    return {"format": 1, "name": "x", "created": "2026", "engine": "e", "device": {},
            "protocol": {},
            "model": {"name": "m", "sha256": "c" * 64, "path": "/m", "architecture": "llama"},
            "serving": {"n_ctx": 512, "threads": 1, "gpu_layers": 0}, "members": [member]}


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d["members"][0].update(file_sha256="B" * 64), "members.0.file_sha256"),
    (lambda d: d.pop("serving"), "serving"),
    (lambda d: d["members"][0]["measured"].update(footprint_bytes=-1),
     "members.0.measured.footprint_bytes"),
    (lambda d: d["members"][0].update(kind="other"), "members.0.kind"),
    (lambda d: d["members"].append(dict(d["members"][0])), "members"),
    (lambda d: d.update(format=3), "format"),
    (lambda d: d["members"][0].update(surprise=1), "members.0.surprise"),
])
def test_bad_manifests_are_rejected_naming_the_field(edit, field: str) -> None:
    data = manifest_dict()
    parse_planset(data)
    edit(data)
    with pytest.raises(InputError) as exc:
        parse_planset(data)
    assert f": {field}:" in str(exc.value) and "\n" not in str(exc.value)


def test_format_2_needs_members_that_assemble() -> None:
    data = manifest_dict()
    member = data["members"][0]
    table = {"engine": "e", "tensors": ["blk.0.attn_q.weight", "blk.0.attn_norm.weight"],
             "metadata": {"q8_0": "1" * 64}, "fixed": {"blk.0.attn_norm.weight": "2" * 64},
             "shards": {"blk.0.attn_q.weight": {"q8_0": "3" * 64}}}
    data |= {"format": 2, "store": table}
    member["assembly_sha256"] = Assembly(("1" * 64, "2" * 64, "3" * 64)).identity
    with pytest.raises(InputError, match="member a{12}: assembly_sha256 is not that of its"):
        parse_planset(data)  # the shards are in split order: metadata, attn_q, the norm
    member["assembly_sha256"] = Assembly(("1" * 64, "3" * 64, "2" * 64)).identity
    assert parse_planset(data).members[0].assembly_sha256 == member["assembly_sha256"]
    member["recipe"] = {"blk.0.attn_q.weight": "q4_0"}
    with pytest.raises(InputError, match="cannot be assembled: no shard of "
                                         "blk.0.attn_q.weight as q4_0"):
        parse_planset(data)
    data.pop("store")
    with pytest.raises(InputError, match="needs its shard table"):
        parse_planset(data)


def test_cli_reports_a_bad_manifest_in_one_line(tmp_path: Path, run_cli: CliRunner) -> None:
    data = manifest_dict()
    data["members"][0]["file_sha256"] = "xyz"
    (tmp_path / "planset.json").write_text(json.dumps(data))
    done = run_cli("planset", "materialize", tmp_path)
    assert done.returncode == 1
    assert len(done.error_lines) == 1 and "members.0.file_sha256" in done.error_lines[0]
    done = run_cli("planset", "-o", tmp_path / "new", "--step", "0.3")
    assert done.returncode == 1 and "does not divide 1" in done.error_lines[0]
    done = run_cli("planset", "-o", tmp_path / "new", "--types", "q4_0,nope")
    assert done.returncode == 1 and len(done.error_lines) == 1
    done = run_cli("planset", "-o", tmp_path / "new", "--aim-members", "-1")
    assert done.returncode == 1 and done.error_lines == [
        "error: aim bounds must be >= 0, got rounds 3, members -1"]
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- merging


def test_identical_plans_are_merged(source_view: ModelView, reference: Reference,
                                    device_profile: dict, layer_profile: dict) -> None:
    vectors = P.weight_vectors(step=0.25)
    cands = P.candidates(source_view, reference.source_sha256, device_profile, layer_profile,
                         vectors)
    ids = [c.id for c in cands]
    assert len(set(ids)) == len(ids)
    assert {c.label for c in cands if c.kind == "uniform"} == set(TINY_TYPES.split(","))
    chosen = [w for c in cands for w in c.weights]
    assert sorted(chosen) == sorted(tuple(round(x, 6) for x in v) for v in vectors)
    assert len([c for c in cands if c.kind == "mix"]) < len(vectors)  # some plans coincide
    recipes = [json.dumps(c.recipe, sort_keys=True) for c in cands]
    assert len(set(recipes)) == len(recipes)


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def tiny_planset(source_model: Path, workspace: Workspace, reference: Reference,
                 device_profile: dict, layer_profile: dict,
                 tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An interrupted run (stopped at the third footprint), then the same run resumed, with
    every measurement recorded."""
    out = tmp_path_factory.mktemp("plans") / "tiny"
    calls: dict[str, list[str]] = {"accuracy": [], "footprint": [], "latency": []}
    real = {"accuracy": P.measure_file, "footprint": FP.measure_footprint}
    stop_after = [2]

    def accuracy(path: Path, /, **kw: object) -> dict:
        calls["accuracy"].append(Path(path).name)
        return real["accuracy"](path, **kw)

    def footprint(path: Path, /, **kw: object) -> dict:
        if stop_after and len(calls["footprint"]) == stop_after[0]:
            stop_after.clear()
            raise KeyboardInterrupt
        calls["footprint"].append(Path(path).name)
        return real["footprint"](path, **kw)

    fractions: list = []

    def run() -> PlanSet:
        fractions.clear()
        return P.run_planset(source_model, out, workspace=workspace, protocol=PROTOCOL,
                             types=PLANSET_TYPES, step=0.5, paper=False,
                             calibration_tokens=256, serving_ctx=256,
                             presets="none",  # presets: tests/test_presets.py
                             progress=lambda what, f: fractions.append((f, what)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "measure_file", accuracy)
        mp.setattr(FP, "measure_footprint", footprint)
        with pytest.raises(KeyboardInterrupt):
            run()
        first = {k: list(v) for k, v in calls.items()}
        written_after_interrupt = sorted(p.name for p in out.parent.rglob("*") if p.is_file())
        for v in calls.values():
            v.clear()
        planset = run()
    return {"planset": planset, "out": out, "first": first,
            "fractions": list(fractions),
            "second": calls, "written_after_interrupt": written_after_interrupt}


def test_interrupted_run_resumes_without_measuring_twice(tiny_planset: dict) -> None:
    first, second = tiny_planset["first"], tiny_planset["second"]
    assert len(first["footprint"]) == 2 and second["footprint"]
    assert tiny_planset["written_after_interrupt"] == []  # nothing partial in the output
    for kind in ("accuracy", "footprint"):
        assert not set(first[kind]) & set(second[kind]), kind
    planset = tiny_planset["planset"]
    measured_files = set(first["footprint"]) | set(second["footprint"])
    assert {first_split(planset, m).name for m in planset.members} == measured_files


def test_progress_only_moves_forward(tiny_planset: dict) -> None:
    fractions = [f for f, _ in tiny_planset["fractions"]]
    assert fractions and all(0 <= f <= 1 for f in fractions)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_manifest_and_recipes(tiny_planset: dict) -> None:
    planset, out = tiny_planset["planset"], tiny_planset["out"]
    assert load_planset(out) == planset
    recipes = sorted(p.stem for p in (out / "recipes").glob("*.txt"))
    assert recipes == sorted(m.id for m in planset.members)
    assert len([m for m in planset.members if m.kind == "uniform"]) == 3
    points = np.array([P._objectives(m.measured, "kld") for m in planset.members])
    for m, doms in zip(planset.members, brute_force_dominators(points), strict=True):
        assert m.pareto == (not doms)
        assert sorted(m.dominated_by) == sorted(planset.members[i].id for i in doms)
    for m in planset.members:
        assert m.measured.latency.n == PROTOCOL.reps
        assert m.measured.footprint_bytes > 0 and m.measured.parameter_bytes > 0
        assert Assembly(tuple(member_shards(planset, m))).identity == m.assembly_sha256
    assert planset.format == 2 and planset.serving.n_ctx == 256
    assert planset.serving.baseline_rss_bytes > 0


def first_split(planset: PlanSet, member: Member) -> Path:
    """The file a member is loaded from (the first split of its assembly)."""
    assembly = Assembly(tuple(member_shards(planset, member)))
    name = assembly.identity[:16]
    return Path(name) / f"{name}-00001-of-{assembly.count:05d}.gguf"


def test_materialize_assembles_the_measured_models(tiny_planset: dict, workspace: Workspace,
                                                   tmp_path: Path) -> None:
    """Into an empty state dir: every shard quantized again from the reference and checked
    against the manifest, every member the model that was measured (same identity)."""
    planset = tiny_planset["planset"]
    fresh = Workspace(workspace.root, state_dir=tmp_path / "fresh")
    paths = P.materialize(planset, workspace=fresh)
    for m in planset.members:
        assert model_identity(paths[m.id]) == m.assembly_sha256
        assert paths[m.id] == fresh.state_dir / "members" / first_split(planset, m)
    quantized = dict(engine.QUANTIZED)
    assert P.materialize(planset, workspace=fresh) == paths  # all there: links only
    assert engine.QUANTIZED == quantized


def test_materialize_front_builds_only_the_front(tiny_planset: dict, run_cli: CliRunner,
                                                 tmp_path: Path) -> None:
    planset, out = tiny_planset["planset"], tiny_planset["out"]
    done = run_cli("planset", "materialize", out, "--front", "--state-dir", tmp_path / "front")
    assert done.returncode == 0, done.stderr
    built = sorted(p.name for p in (tmp_path / "front" / "members").iterdir())
    assert built == sorted(first_split(planset, m).parent.name for m in planset.pareto_members)


def test_materialize_refuses_a_shard_that_comes_out_different(
        tiny_planset: dict, workspace: Workspace, tmp_path: Path) -> None:
    planset = tiny_planset["planset"]
    name, by = next(iter(planset.store.shards.items()))
    wrong = planset.store.model_copy(update={"shards": planset.store.shards | {
        name: {q: "0" * 64 for q in by}}})
    broken = planset.model_copy(update={"store": wrong})
    fresh = Workspace(workspace.root, state_dir=tmp_path / "state")
    with pytest.raises(PlanError, match="came out with sha256 .* the plan set says 000000"):
        P.materialize(broken, workspace=fresh)
    assert list((tmp_path / "state" / "members").iterdir()) == []  # nothing assembled
    with pytest.raises(InputError, match="not the plan set's model"):
        P.materialize(planset, workspace=fresh,
                      source=workspace.state_dir / "members" / first_split(planset,
                                                                           planset.members[0]))


def test_export_is_the_file_apreqel_build_writes(tiny_planset: dict, workspace: Workspace,
                                                 reference: Reference, run_cli: CliRunner,
                                                 tmp_path: Path) -> None:
    """A member exported from the store is byte for byte the single GGUF `apreqel build` (one
    llama.cpp quantization of the reference) writes for its recipe."""
    planset, out = tiny_planset["planset"], tiny_planset["out"]
    member = next(m for m in planset.members if m.kind == "mix")
    done = run_cli("planset", "export", out, member.id[:6], "-o", tmp_path / "one.gguf")
    assert done.returncode == 0, done.stderr
    plan = P.member_plan(reference.source, planset.model.sha256, member.recipe,
                         member.base_type)
    built = build_gguf(plan, reference.path, tmp_path / "built.gguf", threads=1)
    assert (tmp_path / "one.gguf").read_bytes() == built.read_bytes()
    assert read_model(tmp_path / "one.gguf").plan_id == plan["plan_id"]
    bad = run_cli("planset", "export", out, "ffff", "-o", tmp_path / "x.gguf")
    assert bad.returncode == 1 and "no single plan-set member 'ffff'" in bad.error_lines[0]


def test_condition_retimes_without_rebuilding(tiny_planset: dict, workspace: Workspace,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tiny_planset["out"]

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("a condition must not rebuild or re-score")

    monkeypatch.setattr(P, "measure_file", forbidden)
    monkeypatch.setattr(engine, "quantize_tensor", forbidden)
    monkeypatch.setattr(engine, "quantize", forbidden)
    monkeypatch.setattr(FP, "measure_footprint", forbidden)
    updated = P.record_condition(out, "busy", workspace=workspace)
    assert all(m.conditions["busy"].n == PROTOCOL.reps for m in updated.members)
    before = {m.id: m.measured for m in tiny_planset["planset"].members}
    assert all(m.measured == before[m.id] for m in updated.members)
    assert load_planset(out) == updated
    with pytest.raises(InputError, match="condition name"):
        P.record_condition(out, "bad name!", workspace=workspace)


def test_recipes_are_checked_before_anything_is_built(source_model: Path, source_view: ModelView,
                                                      workspace: Workspace,
                                                      tmp_path: Path) -> None:
    q4 = {t.name: "q4_0" for s in source_view.sublayers for t in s.tensors if t.quantizable}
    out = tmp_path / "out"
    cases = [({"x": {"blk.99.attn_q.weight": "q4_0"}},
              "recipe 'x': no quantizable tensor blk.99.attn_q.weight"),
             ({"a": q4, "b": dict(q4)}, "recipes 'a' and 'b' are the same"),
             ({"c": {"blk.0.attn_q.weight": "q9"}}, "unknown quantization type 'q9'")]
    for recipes, message in cases:
        with pytest.raises(InputError, match=message):
            P.planset_from_recipes(source_model, recipes, out, workspace=workspace,
                                   protocol=PROTOCOL)
    assert not out.exists()


def test_recipes_command_measures_hand_written_recipes(run_cli: CliRunner,
                                                       tmp_path: Path) -> None:
    (tmp_path / "all-q4_0.txt").write_text("# everything\n.*=q4_0\n")
    (tmp_path / "protected.txt").write_text("attn_v|ffn_down=q8_0\n.*=q4_0\n")
    out = tmp_path / "mine"
    done = run_cli("planset", "recipes", f"q4={tmp_path / 'all-q4_0.txt'}",
                   f"protected={tmp_path / 'protected.txt'}", "-o", out, *CLI_PROTOCOL_ARGS,
                   "--serving-ctx", "256", "--state-dir", tmp_path / "state")
    assert done.returncode == 0, done.stderr
    ps = load_planset(out)
    by = {m.label: m for m in ps.members}
    assert list(by) == ["q4", "protected"] and "2 members" in done.stdout
    assert set(by["q4"].recipe.values()) == {"q4_0"} and by["q4"].kind == "uniform"
    assert by["protected"].kind == "mix"
    assert by["protected"].recipe["blk.3.attn_v.weight"] == "q8_0"
    assert by["protected"].recipe["blk.3.attn_q.weight"] == "q4_0"
    # the protected mix holds more parameter bytes (exact); its resident footprint need not
    # be larger (llama.cpp repacks q4_0 for the CPU and not q8_0: a CI run measured 130.31
    # MB for q4 against 130.02 for protected)
    assert by["q4"].measured.parameter_bytes < by["protected"].measured.parameter_bytes
    assert by["q4"].measured.footprint_bytes > 0 and by["protected"].measured.footprint_bytes > 0
    for args, message in [(("x=" + str(tmp_path / "none.txt"),), "recipe file not found"),
                          (("justafile",), "expected LABEL=FILE, got 'justafile'"),
                          ((f"a={tmp_path / 'all-q4_0.txt'}", f"a={tmp_path / 'all-q4_0.txt'}"),
                           "recipe label 'a' is given twice")]:
        bad = run_cli("planset", "recipes", *args, "-o", tmp_path / "bad")
        assert bad.returncode == 1 and len(bad.error_lines) == 1, bad.stderr
        assert message in bad.error_lines[0]
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- composed members


def test_composed_members_kept_online_are_scored_as_ordinary_members(
        tiny_planset: dict, source_model: Path, workspace: Workspace, tmp_path: Path) -> None:
    """`--measure-composed`: a recipe the daemon composed and kept in a state dir's online
    section joins the plan set as a measured mix; none kept is a one-line error."""
    from apreqeld.errors import InputError
    from apreqeld.store.online import composed_recipes, write_composed

    planset = tiny_planset["planset"]
    sha = planset.model.sha256
    with pytest.raises(InputError, match=r"no composed members in .*composed-.*\.json"):
        composed_recipes(tmp_path, sha)
    uniform = sorted((m for m in planset.members if m.kind == "uniform"),
                     key=lambda m: m.measured.footprint_bytes)
    low, high = uniform[0].recipe, uniform[-1].recipe
    names = sorted(low)
    recipe = {t: (high if k % 3 == 0 else low)[t] for k, t in enumerate(names)}
    write_composed(tmp_path, sha, kept=[{"id": "0123456789ab", "label": "composed 150.0 MiB",
                                         "recipe": recipe, "predicted": {"kld": 0.1}}],
                   dropped=[], online={})
    extra = composed_recipes(tmp_path, sha)
    assert [label for label, _, _ in extra] == ["composed 150.0 MiB (served online)"]
    again = P.run_planset(source_model, tiny_planset["out"], workspace=workspace,
                          protocol=PROTOCOL, types=PLANSET_TYPES, step=0.5, paper=False,
                          calibration_tokens=256, serving_ctx=256, presets="none",
                          extra=extra)
    (new,) = [m for m in again.members if m.label == "composed 150.0 MiB (served online)"]
    assert new.kind == "mix" and new.recipe == recipe and new.measured.kld > 0
    assert {m.id for m in planset.members} < {m.id for m in again.members}
    assert load_planset(tiny_planset["out"]) == again
