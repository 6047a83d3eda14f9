"""Pure budget arithmetic of the policy (DESIGN.md "Policy", step 2; shedding under real
pressure is core.pressure, live latency core.latency).

Budget = min(MemAvailable, cgroup headroom) + the current member's footprint - reserve, where
the free part (the min) shrinks under pressure: progressively as PSI memory "some" avg10 rises
from `psi_low` to `psi_high` (percent), or, where PSI is unknown, as MemAvailable falls from
`watermark_high` to `watermark_low` of MemTotal. A missing signal is unknown, never zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from apreqeld.errors import InputError

PSI_LOW = 10.0  # % of time some task stalled on memory (avg10) where tightening starts
PSI_HIGH = 50.0  # ... and where the free memory counts as nothing
WATERMARK_HIGH = 0.15  # MemAvailable / MemTotal where tightening starts (no PSI)
WATERMARK_LOW = 0.05  # ... and where the free memory counts as nothing


def pressure_factor(
    *,
    psi_some_avg10: float | None = None,
    mem_available: float | None = None,
    mem_total: float | None = None,
    psi_low: float = PSI_LOW,
    psi_high: float = PSI_HIGH,
    watermark_low: float = WATERMARK_LOW,
    watermark_high: float = WATERMARK_HIGH,
) -> float:
    """Share in [0, 1] of the free memory the budget may count on; 1.0 without pressure."""
    if psi_some_avg10 is not None:
        return _ramp_down(psi_some_avg10, psi_low, psi_high)
    if mem_available is not None and mem_total:
        return _ramp_down(mem_available / mem_total, watermark_high, watermark_low)
    return 1.0


def budget_bytes(
    *,
    mem_available: float | None,
    reserve: float,
    cgroup_headroom: float | None = None,
    current_footprint: float = 0.0,
    psi_some_avg10: float | None = None,
    mem_total: float | None = None,
    psi_low: float = PSI_LOW,
    psi_high: float = PSI_HIGH,
    watermark_low: float = WATERMARK_LOW,
    watermark_high: float = WATERMARK_HIGH,
) -> float | None:
    """Bytes the served model may occupy now; None when no memory signal is known."""
    for name, value in (("mem_available", mem_available), ("cgroup_headroom", cgroup_headroom)):
        if value is not None and not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value}")
    if not math.isfinite(reserve) or reserve < 0:
        raise InputError(f"reserve must be a non-negative number of bytes, got {reserve}")
    if not math.isfinite(current_footprint) or current_footprint < 0:
        raise InputError(f"current footprint must be non-negative, got {current_footprint}")
    known = [v for v in (mem_available, cgroup_headroom) if v is not None]
    if not known:
        return None
    free = max(min(known), 0.0)
    factor = pressure_factor(
        psi_some_avg10=psi_some_avg10, mem_available=mem_available, mem_total=mem_total,
        psi_low=psi_low, psi_high=psi_high,
        watermark_low=watermark_low, watermark_high=watermark_high,
    )
    return free * factor + current_footprint - reserve


def condition_latency(
    median_ms: float, conditions: Mapping[str, float], /, power_mode: str | None
) -> tuple[float, bool]:
    """The member's ms/token for this power mode when measured (True), else its median."""
    if power_mode is not None and power_mode in conditions:
        return conditions[power_mode], True
    return median_ms, False


def _ramp_down(value: float, start: float, end: float) -> float:
    """1.0 before `start`, 0.0 past `end`, linear between (works for either direction)."""
    if start == end:
        raise InputError(f"a pressure ramp needs two different ends, got {start} and {end}")
    share = (value - start) / (end - start)
    return 1.0 - min(max(share, 0.0), 1.0)
