"""The latency detector on recorded samples and conditions (pure: no model, no clock)."""

from __future__ import annotations

import pytest

from apreqeld.core.disturbance import (
    CLEAN,
    DISTURBED,
    UNCHECKED,
    Bounds,
    judge,
    latency_record,
    profile_latency_evidence,
    sample_disturbed,
    stolen_share,
    worst,
)
from apreqeld.core.plans import latency_evidence
from apreqeld.errors import PlanError

QUIET = [5.1, 5.0, 5.2, 5.1, 5.0]
# Recorded on this project's 2-core machine, tg32, 1 thread: two busy-loop hogs for the middle
# three runs (others took ~1.3 cores), a quiet machine before and after.
HOGGED = [5.2, 14.8, 15.1, 14.6, 5.1]


def test_stolen_share_counts_only_what_the_free_cores_could_not_absorb() -> None:
    # 2 cores, 1 thread: one other busy process fits on the free core
    assert stolen_share(1.0, 1.0, cores=2, threads=1) == 0.0
    assert stolen_share(1.5, 1.0, cores=2, threads=1) == pytest.approx(0.5)
    # all cores in use by the run: anything others take is stolen
    assert stolen_share(0.4, 1.0, cores=2, threads=2) == pytest.approx(0.2)
    assert stolen_share(None, 1.0, cores=2, threads=1) is None
    assert stolen_share(1.0, 0.0, cores=2, threads=1) is None


def test_clean_samples_are_clean() -> None:
    assert judge(QUIET, 0.02) == (CLEAN, None)
    assert judge(QUIET, None) == (CLEAN, None)  # no /proc: judged on spread alone


def test_contention_makes_a_steady_measurement_disturbed() -> None:
    # a run slowed evenly all through has a small spread: only contention reveals it
    quality, reason = judge([15.0, 15.1, 14.9], 0.6)
    assert quality == DISTURBED and "60%" in reason


def test_spread_makes_a_measurement_disturbed() -> None:
    quality, reason = judge(HOGGED, 0.0)
    assert quality == DISTURBED and "spread" in reason
    assert judge(HOGGED, 0.0, Bounds(max_spread=10.0))[0] == CLEAN


def test_record_flags_each_sample() -> None:
    stolen = [0.0, 0.66, 0.7, 0.64, 0.01]
    conditions = {"wall_s": 1.0, "others_cpu_s": 1.4, "cores": 2, "load_avg_1m": 2.1}
    rec = latency_record(HOGGED, stolen, conditions, threads=1)
    assert rec["samples_disturbed"] == [False, True, True, True, False]
    assert rec["quality"] == DISTURBED and rec["stolen"] == pytest.approx(0.4)
    assert rec["median_ms"] == 14.6 and rec["n"] == 5
    assert rec["conditions"]["load_avg_1m"] == 2.1
    assert sample_disturbed(None) is False


def _profile(**qualities: str | None) -> dict:
    uniform = {}
    for name, q in qualities.items():
        m = {"latency_ms": 5.0}
        if q is not None:
            m |= {"latency_quality": q, "latency": {"reason": "busy", "stolen": 0.5}}
        uniform[name] = {"measured": m}
    return {"types": list(qualities), "uniform": uniform}


def test_profile_evidence_takes_the_worst_quality() -> None:
    assert profile_latency_evidence(_profile(q8_0=CLEAN, q4_0=CLEAN))["quality"] == CLEAN
    assert profile_latency_evidence(_profile(q8_0=CLEAN, q4_0=None))["quality"] == UNCHECKED
    ev = profile_latency_evidence(_profile(q8_0=DISTURBED, q4_0=None))
    assert ev["quality"] == DISTURBED and ev["types"]["q8_0"]["reason"] == "busy"
    assert worst([CLEAN, UNCHECKED, DISTURBED]) == DISTURBED


def test_planning_refuses_disturbed_latency_only_where_it_steers() -> None:
    busy = _profile(q8_0=DISTURBED, q4_0=CLEAN)
    with pytest.raises(PlanError, match="q8_0 disturbed"):
        latency_evidence(busy, (0.2, 0.6, 0.2), {}, disturbed="refuse")
    with pytest.raises(PlanError):
        latency_evidence(busy, (1, 0, 1), {"latency_ms": 9.0}, disturbed="refuse")
    quiet = latency_evidence(busy, (1, 0, 1), {}, disturbed="refuse")
    assert quiet["steers_plan"] is False and quiet["warning"].startswith("latency q8_0")
    flagged = latency_evidence(busy, (0.2, 0.6, 0.2), {}, disturbed="flag")
    assert flagged["quality"] == DISTURBED and flagged["warning"]
    clean = latency_evidence(_profile(q8_0=CLEAN), (0, 1, 0), {}, disturbed="refuse")
    assert clean["quality"] == CLEAN and clean["warning"] is None
