"""Shedding under memory pressure: each signal's verdict against its threshold, the budget
while shedding, and the hysteresis over time (settle between sheds, clear before growing)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apreqeld.core.pressure import (
    CLEAR_S,
    SETTLE_S,
    SHED_STEP,
    Shedding,
    Signals,
    Verdict,
    shed_budget,
    verdict,
)

GIB = 1024**3


@pytest.mark.parametrize(("signals", "why"), [
    (Signals(triggered=True), "a PSI memory trigger fired"),
    (Signals(some_pct=20.0), "PSI memory some 20.0% >= 20%"),
    (Signals(full_pct=7.5), "PSI memory full 7.5% >= 5%"),
    (Signals(cgroup_some_pct=40.0), "the cgroup's PSI memory some 40.0% >= 20%"),
    (Signals(mem_available=0.5 * GIB, mem_total=16 * GIB),
     "MemAvailable 512 MiB is below the low watermark 819 MiB"),
    (Signals(high_events=3), "the cgroup reached memory.high (3 times)"),
    (Signals(swapin_per_s=300.0), "swapping in 300.0 pages/s >= 256"),
])
def test_each_signal_sheds_and_says_why(signals: Signals, why: str) -> None:
    v = verdict(signals)
    assert v.pressure and v.reason == why


def test_below_every_threshold_or_unknown_is_no_pressure() -> None:
    calm = Signals(some_pct=19.9, full_pct=4.9, cgroup_some_pct=0.0, high_events=0,
                   swapin_per_s=10.0, mem_available=4 * GIB, mem_total=16 * GIB)
    assert verdict(calm) == Verdict(False, "no memory pressure")
    assert not verdict(Signals()).pressure  # nothing known is not pressure


def test_the_deficit_is_what_the_low_watermark_misses() -> None:
    v = verdict(Signals(some_pct=50.0, mem_available=0.3 * GIB, mem_total=10 * GIB))
    assert v.reason.startswith("PSI memory some") and v.deficit_bytes == pytest.approx(0.2 * GIB)


@given(footprint=st.floats(1e6, 1e11), deficit=st.floats(0, 1e11))
def test_shedding_gives_back_at_least_the_step_and_the_deficit(footprint: float,
                                                              deficit: float) -> None:
    budget = shed_budget(footprint, deficit)
    assert budget <= footprint * (1 - SHED_STEP) + 1e-6
    assert budget <= footprint - deficit + 1e-6
    assert budget == pytest.approx(footprint - max(deficit, SHED_STEP * footprint))


def test_hysteresis_settles_between_sheds_and_clears_after_calm() -> None:
    s, hot, calm = Shedding(), Verdict(True, "hot"), Verdict(False, "calm")
    s.seen(hot, now=0.0)
    assert s.active(now=0.0) and s.due(hot, now=0.0)
    s.last_shed = 0.0  # the policy switched
    assert not s.due(hot, now=SETTLE_S - 0.1) and s.due(hot, now=SETTLE_S)
    assert not s.due(calm, now=SETTLE_S)  # no pressure now: nothing to shed
    s.seen(calm, now=5.0)  # calm since the last pressure at 0 s
    assert s.active(now=CLEAR_S - 0.1) and not s.active(now=CLEAR_S)
    s.seen(hot, now=CLEAR_S + 1)
    assert s.active(now=CLEAR_S + 1) and s.reason == "hot"
