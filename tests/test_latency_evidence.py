"""Latency evidence on the real default model: a CPU hog is detected and re-timed, the cache
never serves its figure as clean, and plans steer only by clean latency.

The hog is real: one busy-looping child per core, each bounded in time, started and stopped
by the test. This machine's other work is never assumed quiet: nothing here asserts that an
unhogged run is clean (re-timing uses bounds loose enough to accept any machine).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from apreqeld import engine
from apreqeld.core.disturbance import CLEAN, DISTURBED, UNCHECKED, Bounds
from apreqeld.core.plans import make_plan
from apreqeld.errors import PlanError
from apreqeld.evidence.measurement import measure_file, retime_file, time_latency
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import ModelView
from support import CLI_PROTOCOL_ARGS, PROTOCOL, TINY_TYPES, CliRunner, uniform_path

pytestmark = pytest.mark.timeout(300)
# Long enough runs (tg16) that /proc/stat's 10 ms ticks resolve the hog's share.
TIMED = Protocol(n_ctx=512, chunks=1, n_gen=16, reps=3, threads=1)
ANY_MACHINE = Bounds(max_stolen=100.0, max_spread=100.0)


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


@contextmanager
def cpu_hog(seconds: float = 60.0) -> Iterator[None]:
    """One busy loop per core, each ending by itself after `seconds`; stopped on exit."""
    ctx = multiprocessing.get_context("fork")  # nothing to import: the loop runs at once
    procs = [ctx.Process(target=_spin, args=(time.monotonic() + seconds,), daemon=True)
             for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    _wait_spinning(procs)
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def _wait_spinning(procs: list, *, cpu_s: float = 0.3, timeout_s: float = 20.0) -> None:
    """Return once every hog has burnt `cpu_s` of CPU (it is really spinning), else fail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        burnt = [psutil.Process(p.pid).cpu_times().user if p.is_alive() else -1.0 for p in procs]
        if min(burnt) < 0:
            pytest.fail(f"a CPU hog died before the measurement (exit codes "
                        f"{[p.exitcode for p in procs]})")
        if min(burnt) >= cpu_s:
            return
        time.sleep(0.1)
    pytest.fail(f"the CPU hogs did not start spinning within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def q4_0(device_profile: dict, workspace: Workspace, reference: Reference) -> Path:
    return uniform_path(workspace, reference, "q4_0")


@pytest.fixture(scope="module")
def hogged(q4_0: Path, reference: Reference) -> dict:
    """q4_0 measured (accuracy and latency) while every core runs a busy loop."""
    with cpu_hog():
        return measure_file(q4_0, protocol=TIMED, reference=reference, tries=2)


def test_a_hogged_measurement_is_detected_and_retimed(hogged: dict) -> None:
    lat = hogged["latency"]
    assert hogged["latency_quality"] == DISTURBED and lat["quality"] == DISTURBED
    assert lat["attempts"] == 2  # timed again before it was kept as disturbed
    assert lat["stolen"] > lat["bounds"]["max_stolen"] and "cores" in lat["reason"]
    assert any(lat["samples_disturbed"])
    cond = lat["conditions"]
    assert cond["others_cpu_s"] > 0 and cond["cores"] == os.cpu_count()
    assert {"load_avg_1m", "cpu_mhz", "power_mode"} <= set(cond)
    # robust figures beside llama-bench's mean, old keys kept
    assert hogged["latency_median_ms"] > 0 and hogged["latency_iqr_ms"] >= 0
    assert hogged["latency_ms"] == pytest.approx(lat["mean_ms"])


def test_time_latency_keeps_the_clean_attempt(q4_0: Path) -> None:
    with engine.open_session(q4_0, n_ctx=512, threads=1) as s:
        rec = time_latency(s, protocol=TIMED, bounds=ANY_MACHINE, tries=3)
    assert rec["quality"] == CLEAN and rec["attempts"] == 1 and rec["n"] == TIMED.reps


def test_the_cache_never_serves_a_disturbed_latency_as_clean(
        hogged: dict, q4_0: Path, reference: Reference, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "home")
    key = measurement_key({"test": "hogged"}, reference, TIMED)
    stored = cached_measurement(ws, key, lambda: hogged)

    def forbidden() -> dict:
        raise AssertionError("a cached measurement was measured again")

    assert cached_measurement(ws, key, forbidden)["latency_quality"] == DISTURBED
    retimed = cached_measurement(
        ws, key, forbidden, retime=lambda old: old | retime_file(q4_0, protocol=TIMED,
                                                                  bounds=ANY_MACHINE))
    assert retimed["latency_quality"] == CLEAN
    assert retimed["ppl"] == stored["ppl"] and retimed["kld"] == stored["kld"]  # not re-scored
    on_disk = json.loads(next((ws.root / "measurements").glob("*.json")).read_text())
    assert on_disk["result"]["latency_quality"] == CLEAN and "latency_timed" in on_disk
    # a measurement stored before the detector comes back unchecked, never clean
    old = {k: v for k, v in hogged.items() if not k.startswith("latency_quality")}
    key2 = measurement_key({"test": "old"}, reference, TIMED)
    cached_measurement(ws, key2, lambda: old)
    assert cached_measurement(ws, key2, forbidden)["latency_quality"] == UNCHECKED


def test_plans_steer_only_by_clean_latency(hogged: dict, device_profile: dict,
                                           layer_profile: dict, source_view: ModelView,
                                           reference: Reference) -> None:
    def profile(q4_0_measured: dict, quality: str) -> dict:
        p = json.loads(json.dumps(device_profile))
        for name in p["types"]:
            p["uniform"][name]["measured"]["latency_quality"] = quality
        p["uniform"]["q4_0"]["measured"] = q4_0_measured
        return p

    busy = profile(hogged, CLEAN)
    with pytest.raises(PlanError, match="q4_0 disturbed"):
        make_plan(source_view, reference.source_sha256, busy, layer_profile, (0.2, 0.6, 0.2),
                  disturbed="refuse")
    flagged = make_plan(source_view, reference.source_sha256, busy, layer_profile,
                        (0.2, 0.6, 0.2), disturbed="flag")
    assert flagged["evidence"]["latency"]["quality"] == DISTURBED
    assert "q4_0 disturbed" in flagged["evidence"]["latency"]["warning"]
    clean = make_plan(source_view, reference.source_sha256,
                      profile(hogged | {"latency_quality": CLEAN}, CLEAN), layer_profile,
                      (0.2, 0.6, 0.2), disturbed="refuse")
    ev = clean["evidence"]["latency"]
    assert ev["quality"] == CLEAN and ev["steers_plan"] and ev["warning"] is None
    assert set(ev["types"]) == set(device_profile["types"])


def test_remeasure_latency_retimes_without_rescoring(run_cli: CliRunner, device_profile: dict,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    result = run_cli("measure-types", "--types", TINY_TYPES, *CLI_PROTOCOL_ARGS,
                     "--remeasure", "latency", "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    profile = json.loads(out.read_text())
    for name in device_profile["types"]:
        before = device_profile["uniform"][name]["measured"]
        after = profile["uniform"][name]["measured"]
        assert after["ppl"] == before["ppl"] and after["kld"] == before["kld"]
        assert after["latency_quality"] in (CLEAN, DISTURBED)
        assert after["latency"]["n"] == PROTOCOL.reps
    bad = run_cli("measure-types", "--types", TINY_TYPES, *CLI_PROTOCOL_ARGS,
                  "--remeasure", "accuracy", "-o", out, cwd=tmp_path)
    assert bad.returncode != 0 and "cannot remeasure 'accuracy'" in bad.stdout + bad.stderr
