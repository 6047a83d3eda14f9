"""Composed members (#18) on the real daemon with real llama.cpp workers: the checked-in plan
set's uniform q8_0 and q4_0 members (with the set's recorded predictor evidence), assembled
from the tiny fixture's shard store. A memory level between the two composes a q8_0/q4_0
recipe that is assembled, served, measured and shown as composed; `--no-compose` and a plan
set without evidence compose nothing; one whose evidence mispredicts it is dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apreqeld.client import Client
from apreqeld.manifest import load_planset, save_planset
from daemon_support import REPO, ctl, start_daemon, wait_until
from test_daemon import Events

pytestmark = pytest.mark.integration
CHECKED_IN = REPO / "plans" / "smollm2-135m"


@pytest.fixture
def composable(tiny_plans, tmp_path):
    """A folder with `plans/`: the checked-in set cut to the tiny fixture's two uniform
    members (same recipes, so the same shards), its evidence kept. No online section is left
    behind in the shared state dir."""
    online = tiny_plans.state_dir / "online"
    shutil.rmtree(online, ignore_errors=True)
    full = load_planset(CHECKED_IN)
    ids = {tiny_plans.by_label["q4_0"], tiny_plans.by_label["q8_0"]}
    members = [m.model_copy(update={"pareto": True, "dominated_by": []})
               for m in full.members if m.id in ids]
    assert len(members) == 2
    cut = full.model_copy(update={"members": members, "presets": [], "name": "composable"})

    def make(name: str = "d", *, edit=None) -> Path:
        folder = tmp_path / name
        planset = cut if edit is None else edit(cut)
        save_planset(planset.model_validate(planset.model_dump()), folder / "plans")
        return folder

    make.members = {m.label: m for m in members}
    yield make
    shutil.rmtree(online, ignore_errors=True)


def between(make) -> float:
    """A memory level half way between the two members' footprints."""
    q4, q8 = make.members["q4_0"], make.members["q8_0"]
    return (q4.measured.footprint_bytes + q8.measured.footprint_bytes) / 2


def serve_some(c: Client, n: int) -> list[str]:
    return [c.generate("Once upon a time", max_tokens=6, seed=1, temperature=0)["plan"]
            for _ in range(n)]


def serve_some_result(c: Client, plan: str) -> dict:
    """One result of `plan` (pinned for it, then unpinned)."""
    c.pin(plan, wait=True)
    try:
        return c.generate("Hi", max_tokens=2)
    finally:
        c.unpin(wait=True)


@pytest.mark.timeout(300)
def test_a_composed_member_is_assembled_served_measured_and_shown(
        tiny_plans, composable) -> None:
    folder = composable()
    d = start_daemon(tiny_plans, folder, "--priority", "accuracy", copy_plans=False)
    try:
        events = Events(d.socket)
        q4, q8 = composable.members["q4_0"], composable.members["q8_0"]
        level = between(composable)
        with Client(d.socket, timeout=120) as c:
            assert c.status()["plan"] == q8.id
            serve_some(c, 3)  # the measured member gives the served/measured ratio
            preview = c.compose(max_memory_bytes=level)
            assert preview["composed"] is not None and preview["would_serve"], preview
            c.set_priority("accuracy", max_memory_bytes=level, wait=True)
            s = c.status()
            composed = s["plan"]
            assert composed not in (q4.id, q8.id) and s["serving_composed"], s
            kept = {m["id"]: m for m in s["composition"]["kept"]}
            assert composed in kept
            predicted = kept[composed]["predicted"]
            assert predicted["footprint_bytes"] < level
            assert predicted["kld"] < q4.measured.kld  # better than the member that fits
            assert serve_some(c, 5) == [composed] * 5
            wait_until(lambda: "latency_ms" in c.status()["composition"]["kept"][0]["online"],
                       what="the composed member's ms/token measured")
            plans = c.plans()
            result = c.generate("Hi", max_tokens=2)  # the usage says what served it
            assert result["plan"] == composed
            assert result["composed"]["predicted"]["kld"] == pytest.approx(predicted["kld"])
            assert "footprint_bytes" in result["composed"]["online"]
            assert "composed" not in serve_some_result(c, q8.id)
        assert [m["id"] for m in plans["composed"]] == [composed]
        assert composed not in {m["id"] for m in plans["members"]}
        row = plans["composed"][0]
        assert row["serving"] and set(row["online"]) >= {"footprint_bytes", "latency_ms"}
        online = row["online"]
        assert row["measured"]["footprint_bytes"] == online["footprint_bytes"]
        assert row["measured"]["latency"]["median_ms"] == pytest.approx(online["latency_ms"])
        print(f"\ncomposed {row['label']}: predicted {predicted}, online {online}; level "
              f"{level / 2**20:.1f} MiB, q4_0 {q4.measured.footprint_bytes / 2**20:.1f} MiB "
              f"kld {q4.measured.kld:.4f}, q8_0 {q8.measured.footprint_bytes / 2**20:.1f} MiB "
              f"kld {q8.measured.kld:.4f}")
        # measured within the tolerance: kept, and the predictions were close
        assert abs(online["footprint_bytes"] / predicted["footprint_bytes"] - 1) < 0.05, online
        events.wait_for("composed_measured")
        kinds = [e["kind"] for e in events.events]
        assert "composed" in kinds and "composed_dropped" not in kinds
        saved = json.loads(next((tiny_plans.state_dir / "online").glob("composed-*.json"))
                           .read_text())
        assert [m["id"] for m in saved["kept"]] == [composed]
        preview = ctl("compose", "--budget", str(int(level)), socket=d.socket)
        lines = preview.stdout.splitlines()
        assert preview.returncode == 0 and lines[0] == f"budget     {level / 2**20:.1f} MiB"
        assert lines[1] == (f"members    1 fit, best {q4.id} ({q4.measured.kld:.4f})")
        assert lines[2].startswith(f"composed   {composed}  ") and "(predicted)" in lines[2]
        assert lines[3].startswith("tensors    q8_0 x") and ", q4_0 x" in lines[3]
        assert lines[4].startswith("verdict    would serve it: predicted better")
        shown = ctl("plans", socket=d.socket)
        assert shown.returncode == 0 and "composed (accuracy predicted" in shown.stdout
        assert f"* {composed}" in shown.stdout and "measured: footprint, ms/token" in shown.stdout
        events.close()
    finally:
        d.stop()
    # the manifest never holds a composed member
    assert composed not in {m.id for m in load_planset(folder / "plans").members}


@pytest.mark.timeout(240)
def test_no_compose_and_no_evidence_compose_nothing(tiny_plans, composable,
                                                    daemon_factory) -> None:
    level = between(composable)
    q4 = composable.members["q4_0"]
    d = start_daemon(tiny_plans, composable("off"), "--priority", "accuracy", "--no-compose",
                     copy_plans=False)
    try:
        with Client(d.socket, timeout=120) as c:
            c.set_priority("accuracy", max_memory_bytes=level, wait=True)
            s = c.status()
            assert s["plan"] == q4.id and not s["serving_composed"]
            assert s["composition"]["on"] is False
            assert "--no-compose" in s["composition"]["off_reason"]
            assert c.compose(max_memory_bytes=level)["composed"] is None
    finally:
        d.stop()
    assert "composed" not in d.stderr()
    bare = daemon_factory("--priority", "accuracy")  # the tiny set records no evidence
    with Client(bare.socket, timeout=120) as c:
        tiny_q4 = tiny_plans.by_label["q4_0"]
        c.set_priority("accuracy", max_memory_bytes=(
            tiny_plans.planset.member(tiny_q4).measured.footprint_bytes + 1), wait=True)
        s = c.status()
        assert s["plan"] == tiny_q4 and s["composition"]["kept"] == []
        assert "no predictor evidence" in s["composition"]["off_reason"]
    out = ctl("compose", "--budget", "150MiB", socket=bare.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "budget     150.0 MiB", "members    1 fit, best "
        f"{tiny_q4} ({tiny_plans.planset.member(tiny_q4).measured.kld:.4f})",
        "composed   none: composition is off: no predictor evidence in the plan set; "
        "`apreqel planset --presets` records it"]


def halved_latency(planset):
    """The evidence's latency figures halved: the predictor promises a composed member twice
    as fast as it is (evidence from a faster machine)."""
    data = planset.model_dump(mode="json")
    cal = data["protocol"]["planning"]["aim"]["calibration"]
    cal["figures"]["latency_ms"] = {q: v / 2 for q, v in cal["figures"]["latency_ms"].items()}
    return type(planset).model_validate(data)


@pytest.mark.timeout(300)
def test_a_composed_member_that_measures_far_worse_than_predicted_is_dropped(
        tiny_plans, composable) -> None:
    d = start_daemon(tiny_plans, composable("slow", edit=halved_latency), "--priority",
                     "accuracy", copy_plans=False)
    try:
        events = Events(d.socket)
        q4 = composable.members["q4_0"]
        with Client(d.socket, timeout=120) as c:
            serve_some(c, 3)
            c.set_priority("accuracy", max_memory_bytes=between(composable), wait=True)
            composed = c.status()["plan"]
            assert composed != q4.id
            served = []
            for _ in range(12):
                served += serve_some(c, 1)
                if served[-1] == q4.id:
                    break
            dropped = events.wait_for("composed_dropped")
            assert dropped[0]["plan"] == composed
            assert "latency_ms" in dropped[0]["reason"], dropped
            wait_until(lambda: c.status()["plan"] == q4.id and not c.status()["swapping"],
                       what="back on the q4_0 member")
            s = c.status()
            assert composed in s["composition"]["dropped"] and s["composition"]["kept"] == []
            # never composed again under the same limits
            c.set_priority("accuracy", max_memory_bytes=between(composable), wait=True)
            assert c.status()["plan"] == q4.id
        events.close()
    finally:
        d.stop()
