"""The timing around the pure plan choice: budget from the monitor's State (shedding under
real pressure, core.pressure), live latency scale (the machine's state and a correction from
served tokens, core.latency), dwell time since the last switch. No asyncio. `decide` is the
daemon's one decision path: the monitor's (margin and dwell) and a user's (priority, pin,
reload: neither) go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from apreqeld.core import pressure
from apreqeld.core.budget import budget_bytes, condition_latency
from apreqeld.core.latency import Conditions, Correction, Slowdown, scale, slowdown
from apreqeld.core.selection import Candidate, Decision, Priority, choose
from apreqeld.errors import InputError
from apreqeld.manifest import Member
from apreqeld.runtime.config import DEFAULT_DWELL_S, DEFAULT_MARGIN, DEFAULT_RESERVE, DEFAULT_SLACK
from apreqeld.runtime.monitor import State


def candidates_of(
    members: Sequence[Member], /, *, accuracy: Literal["kld", "ppl"] = "kld",
    power_mode: str | None = None,
) -> list[Candidate]:
    """Members as Candidates: measured footprint, ms/token for this power mode, KLD or PPL."""
    out = []
    for m in members:
        conditions = {k: v.median_ms for k, v in m.conditions.items()}
        ms, _ = condition_latency(m.measured.latency.median_ms, conditions, power_mode)
        acc = m.measured.kld if accuracy == "kld" else m.measured.ppl
        out.append(Candidate(m.id, float(m.measured.footprint_bytes), ms, acc))
    return out


def signals(state: State, /, *, triggered: bool = False) -> pressure.Signals:
    """The pressure signals of a State: PSI since the last reading where the totals are
    known, else avg10."""
    return pressure.Signals(
        some_pct=_first(state.psi_memory_some_recent, state.psi_memory_some_avg10),
        full_pct=_first(state.psi_memory_full_recent, state.psi_memory_full_avg10),
        cgroup_some_pct=state.cgroup_psi_some_recent,
        cgroup_full_pct=state.cgroup_psi_full_recent, triggered=triggered,
        mem_available=state.mem_available_bytes, mem_total=state.mem_total_bytes,
        high_events=state.cgroup_high_events, swapin_per_s=state.swapin_per_s)


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


class Policy:
    """Margin, dwell, reserve, shedding, the last switch time and the latency correction."""

    def __init__(
        self,
        *,
        margin: float = DEFAULT_MARGIN,
        min_dwell_s: float = DEFAULT_DWELL_S,
        reserve_bytes: float = DEFAULT_RESERVE,
        slack_bytes: float = DEFAULT_SLACK,
        window: int = 16,
    ) -> None:
        if min_dwell_s < 0 or window < 1:
            raise InputError(f"dwell must be >= 0 s and window >= 1, got {min_dwell_s}, {window}")
        self.margin = margin
        self.min_dwell_s = min_dwell_s
        self.reserve_bytes = reserve_bytes
        self.slack_bytes = slack_bytes
        self.last_switch: float | None = None
        self.shedding = pressure.Shedding()
        self.verdict = pressure.Verdict(False, "no reading yet")
        self.correction = Correction(window=window)

    def see(self, state: State, /, *, now: float, triggered: bool = False) -> pressure.Verdict:
        """Take one reading's pressure (once per reading: shedding keeps time by it)."""
        self.verdict = pressure.verdict(signals(state, triggered=triggered))
        self.shedding.seen(self.verdict, now=now)
        return self.verdict

    def observe(self, served_ms: float, measured_ms: float, model: Slowdown, /) -> None:
        """A served ms/token of a member measured at `measured_ms`, under `model`."""
        self.correction.observe(served_ms, measured_ms, model.factor)

    def switched(self, *, now: float) -> None:
        """Note that a swap happened at `now` (decide() does so itself when it says switch)."""
        self.last_switch = now

    def latency_scale(self, conditions: Conditions, /) -> float:
        """How much slower than measured every member serves now (1.0 when unknown)."""
        return scale(slowdown(conditions), self.correction)

    def shed_now(self, *, now: float) -> bool:
        """Pressure now and the last shed has had time to show: the budget falls below the
        serving member."""
        return self.shedding.due(self.verdict, now=now)

    def budget(self, state: State, /, *, current_footprint: float,
               now: float) -> float | None:
        """Bytes the served member may occupy in this state (None: no memory signal). While
        pressure was seen in the last CLEAR_S no member may grow; under pressure now, the
        serving member is shed (core.pressure)."""
        free = budget_bytes(
            mem_available=state.mem_available_bytes,
            cgroup_headroom=state.cgroup_headroom_bytes,
            current_footprint=current_footprint,
            reserve=self.reserve_bytes,
            psi_some_avg10=state.psi_memory_some_avg10,
            mem_total=state.mem_total_bytes,
        )
        if not self.shedding.active(now=now):
            return free
        cap = current_footprint
        if self.shed_now(now=now):
            cap = pressure.shed_budget(current_footprint, self.verdict.deficit_bytes)
        return cap if free is None else min(free, cap)

    def dwell_elapsed(self, now: float, /) -> bool:
        """True when the last switch is at least the dwell time before `now`."""
        return self.last_switch is None or now - self.last_switch >= self.min_dwell_s

    def decide(
        self,
        state: State,
        members: Sequence[Member],
        priority: Priority,
        /,
        *,
        current: str | None,
        now: float,
        conditions: Conditions,
        accuracy: Literal["kld", "ppl"] = "kld",
        user: bool = False,
    ) -> Decision:
        """The member to serve in this state. The monitor's decision (`user=False`) needs the
        margin and the dwell time, and a switch starts the dwell at `now`; a user's decision
        (a new priority, an unpin, a reload) needs neither. Shedding needs neither either."""
        cands = candidates_of(members, accuracy=accuracy, power_mode=state.power_mode)
        loaded = next((c for c in cands if c.id == current), None)
        shed = self.shed_now(now=now)
        budget = self.budget(state, current_footprint=loaded.footprint_bytes if loaded else 0.0,
                             now=now)
        decision = choose(
            cands, priority, current=current, budget_bytes=budget,
            latency_scale=self.latency_scale(conditions),
            margin=0.0 if user else self.margin,
            dwell_elapsed=user or self.dwell_elapsed(now),
            slack_bytes=0.0 if shed else self.slack_bytes,  # the cap is the bound, no flapping
        )
        if decision.switch and shed:
            self.shedding.last_shed = now
            decision = replace(decision, reason=f"shedding memory ({self.verdict.reason}): "
                                                f"{decision.reason}")
        if decision.switch and not user:
            self.switched(now=now)
        return decision
