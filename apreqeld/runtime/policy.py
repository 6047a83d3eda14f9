"""The timing around the pure plan choice: budget from the monitor's State, live latency scale,
dwell time since the last switch. No asyncio. `decide` is the daemon's one decision path: the
monitor's (margin and dwell) and a user's (priority, pin, reload: neither) go through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Literal

from apreqeld.core.budget import budget_bytes, condition_latency, latency_scale
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


class Policy:
    """Margin, dwell, reserve, the last switch time and the served-latency samples."""

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
        self._served: deque[float] = deque(maxlen=window)
        self._served_by: str | None = None

    def observe(self, member_id: str, ms_per_token: float, /) -> None:
        """Record the loaded member's served ms/token (samples of another member are dropped)."""
        if member_id != self._served_by:
            self._served.clear()
            self._served_by = member_id
        self._served.append(ms_per_token)

    def switched(self, *, now: float) -> None:
        """Note that a swap happened at `now` (decide() does so itself when it says switch)."""
        self.last_switch = now

    def latency_scale(self, current: Candidate | None, /) -> float:
        """How much slower than measured the loaded member serves now (1.0 when unknown)."""
        if current is None or self._served_by != current.id:
            return 1.0
        return latency_scale(list(self._served), current.latency_ms)

    def budget(self, state: State, /, *, current_footprint: float) -> float | None:
        """Bytes the served member may occupy in this state (None: no memory signal)."""
        return budget_bytes(
            mem_available=state.mem_available_bytes,
            cgroup_headroom=state.cgroup_headroom_bytes,
            current_footprint=current_footprint,
            reserve=self.reserve_bytes,
            psi_some_avg10=state.psi_memory_some_avg10,
            mem_total=state.mem_total_bytes,
        )

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
        accuracy: Literal["kld", "ppl"] = "kld",
        user: bool = False,
    ) -> Decision:
        """The member to serve in this state. The monitor's decision (`user=False`) needs the
        margin and the dwell time, and a switch starts the dwell at `now`; a user's decision
        (a new priority, an unpin, a reload) needs neither."""
        cands = candidates_of(members, accuracy=accuracy, power_mode=state.power_mode)
        loaded = next((c for c in cands if c.id == current), None)
        budget = self.budget(state, current_footprint=loaded.footprint_bytes if loaded else 0.0)
        decision = choose(
            cands, priority, current=current, budget_bytes=budget,
            latency_scale=self.latency_scale(loaded), margin=0.0 if user else self.margin,
            dwell_elapsed=user or self.dwell_elapsed(now), slack_bytes=self.slack_bytes,
        )
        if decision.switch and not user:
            self.switched(now=now)
        return decision
