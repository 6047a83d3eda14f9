"""Memory pressure: when the daemon must give memory back now (shed), and how much.

The budget of core.budget shrinks only the free part: under real pressure (the machine is
reclaiming, stalling on memory, swapping) the serving member always still "fits". Shedding
lets the budget fall below it. Any one of these sheds:
  - PSI memory `some` at or above SHED_SOME_PCT over the last reading (from PSI's stall
    totals, or avg10 where the totals are not known), or `full` at or above SHED_FULL_PCT,
    for the system or for the daemon's own cgroup, or a PSI trigger that fired;
  - MemAvailable below the low watermark (LOW_WATERMARK of MemTotal);
  - the cgroup's memory.high reached (its `high` event count rose);
  - swap-ins at or above SWAPIN_PAGES_S pages a second.
Shedding asks for the serving footprint less the larger of the missing memory (low watermark
less MemAvailable) and SHED_STEP of the footprint; it is asked again after SETTLE_S while the
pressure lasts, and ends CLEAR_S after the last pressure seen. systemd-oomd's defaults act at
60 % for 30 s and the kernel's OOM killer when reclaim fails: both come later.
"""

from __future__ import annotations

from dataclasses import dataclass

SHED_SOME_PCT = 20.0
SHED_FULL_PCT = 5.0
LOW_WATERMARK = 0.05  # of MemTotal
SWAPIN_PAGES_S = 256.0  # 1 MiB/s of 4 KiB pages
SHED_STEP = 0.10  # share of the serving footprint given back at least
SETTLE_S = 3.0  # a shed needs this long to show in the signals before the next one
CLEAR_S = 10.0  # without pressure this long, shedding ends (then margin and dwell as usual)


@dataclass(frozen=True)
class Signals:
    """The pressure readings of one moment; None is unknown."""

    some_pct: float | None = None  # PSI memory some, % of the last reading's time (or avg10)
    full_pct: float | None = None
    cgroup_some_pct: float | None = None  # the same for the daemon's own cgroup
    cgroup_full_pct: float | None = None
    triggered: bool = False  # a PSI trigger fired since the last reading
    mem_available: float | None = None
    mem_total: float | None = None
    high_events: float | None = None  # memory.high reached, times since the last reading
    swapin_per_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    """Whether to shed now, why, and how much memory is missing."""

    pressure: bool
    reason: str
    deficit_bytes: float = 0.0


def verdict(s: Signals, /, *, shed_some: float = SHED_SOME_PCT, shed_full: float = SHED_FULL_PCT,
            low_watermark: float = LOW_WATERMARK,
            swapin_pages_s: float = SWAPIN_PAGES_S) -> Verdict:
    """The first reason to shed among the signals known, or no pressure."""
    low = low_watermark * s.mem_total if s.mem_total else None
    deficit = max(low - s.mem_available, 0.0) if low is not None and \
        s.mem_available is not None else 0.0
    checks = (
        (s.triggered, "a PSI memory trigger fired"),
        (_over(s.some_pct, shed_some), f"PSI memory some {s.some_pct}% >= {shed_some:g}%"),
        (_over(s.full_pct, shed_full), f"PSI memory full {s.full_pct}% >= {shed_full:g}%"),
        (_over(s.cgroup_some_pct, shed_some),
         f"the cgroup's PSI memory some {s.cgroup_some_pct}% >= {shed_some:g}%"),
        (_over(s.cgroup_full_pct, shed_full),
         f"the cgroup's PSI memory full {s.cgroup_full_pct}% >= {shed_full:g}%"),
        (deficit > 0, f"MemAvailable {_mib(s.mem_available)} is below the low watermark "
                      f"{_mib(low)}"),
        (bool(s.high_events), f"the cgroup reached memory.high ({s.high_events:g} times)"
         if s.high_events else ""),
        (_over(s.swapin_per_s, swapin_pages_s),
         f"swapping in {s.swapin_per_s} pages/s >= {swapin_pages_s:g}"),
    )
    for hit, why in checks:
        if hit:
            return Verdict(True, why, deficit)
    return Verdict(False, "no memory pressure")


def shed_budget(footprint: float, deficit: float, /, *, step: float = SHED_STEP) -> float:
    """What the served member may occupy while shedding: its footprint less the larger of
    the missing memory and `step` of the footprint."""
    return footprint - max(deficit, step * footprint)


@dataclass
class Shedding:
    """Shedding over time (clock readings in seconds): the last pressure seen, the last shed
    asked, and why."""

    last_pressure: float | None = None
    last_shed: float | None = None
    reason: str = ""

    def seen(self, v: Verdict, /, *, now: float) -> None:
        if v.pressure:
            self.last_pressure, self.reason = now, v.reason

    def active(self, *, now: float, clear_s: float = CLEAR_S) -> bool:
        """Pressure was seen less than `clear_s` ago: no member may grow meanwhile."""
        return self.last_pressure is not None and now - self.last_pressure < clear_s

    def due(self, v: Verdict, /, *, now: float, settle_s: float = SETTLE_S) -> bool:
        """Pressure now, and the last shed has had `settle_s` to show in the signals."""
        return v.pressure and (self.last_shed is None or now - self.last_shed >= settle_s)


def _over(value: float | None, limit: float) -> bool:
    return value is not None and value >= limit


def _mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value / 2**20:.0f} MiB"
