"""Budget under pressure and the live latency scale, on pure inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apreqeld.core.budget import budget_bytes, condition_latency, pressure_factor
from apreqeld.errors import InputError

GIB = 1024**3


def test_budget_is_free_memory_plus_current_minus_reserve() -> None:
    assert budget_bytes(mem_available=6 * GIB, reserve=1 * GIB, current_footprint=3 * GIB) == (
        8 * GIB
    )
    # the cgroup headroom caps it when smaller
    b = budget_bytes(mem_available=6 * GIB, cgroup_headroom=2 * GIB, reserve=0.5 * GIB,
                     current_footprint=3 * GIB)
    assert b == 4.5 * GIB


def test_missing_signals_are_unknown_not_zero() -> None:
    assert budget_bytes(mem_available=None, reserve=GIB) is None
    assert budget_bytes(mem_available=None, cgroup_headroom=2 * GIB, reserve=0) == 2 * GIB
    assert budget_bytes(mem_available=4 * GIB, psi_some_avg10=None, mem_total=None,
                        reserve=0) == 4 * GIB


def test_psi_tightens_progressively() -> None:
    kw = dict(mem_available=8 * GIB, reserve=GIB, current_footprint=2 * GIB)
    calm = budget_bytes(psi_some_avg10=0.0, **kw)
    mid = budget_bytes(psi_some_avg10=30.0, **kw)
    high = budget_bytes(psi_some_avg10=80.0, **kw)
    assert calm == 9 * GIB and mid == 5 * GIB and high == 1 * GIB
    # under full pressure the current member no longer fits: downgrade first
    assert high < 2 * GIB


def test_watermarks_replace_psi_when_it_is_unknown() -> None:
    total = 16 * GIB
    assert pressure_factor(mem_available=4 * GIB, mem_total=total) == 1.0
    assert pressure_factor(mem_available=0.1 * total, mem_total=total) == pytest.approx(0.5)
    assert pressure_factor(mem_available=0.01 * total, mem_total=total) == 0.0
    # PSI, when known, wins over the watermarks
    assert pressure_factor(psi_some_avg10=0.0, mem_available=0.01 * total, mem_total=total) == 1
    assert pressure_factor() == 1.0


@given(psi=st.floats(0, 100), other=st.floats(0, 100))
def test_more_pressure_never_grows_the_budget(psi, other) -> None:
    lo, hi = sorted((psi, other))
    kw = dict(mem_available=8 * GIB, reserve=GIB, current_footprint=GIB)
    assert budget_bytes(psi_some_avg10=hi, **kw) <= budget_bytes(psi_some_avg10=lo, **kw)


def test_budget_rejects_bad_inputs() -> None:
    with pytest.raises(InputError, match="reserve must be a non-negative number of bytes"):
        budget_bytes(mem_available=GIB, reserve=-1)
    with pytest.raises(InputError, match="mem_available must be finite"):
        budget_bytes(mem_available=float("nan"), reserve=0)
    with pytest.raises(InputError, match="a pressure ramp needs two different ends"):
        pressure_factor(psi_some_avg10=5, psi_low=10, psi_high=10)


def test_condition_column_when_the_power_mode_matches() -> None:
    assert condition_latency(20.0, {"15W": 45.0}, "15W") == (45.0, True)
    assert condition_latency(20.0, {"15W": 45.0}, "MAXN") == (20.0, False)
    assert condition_latency(20.0, {}, None) == (20.0, False)
