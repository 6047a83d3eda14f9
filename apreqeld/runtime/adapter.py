"""The adapter: the machine (monitor, PSI triggers and recorder), the user's priority and pin,
and the one decision path (`Policy.decide`) that turns them into the plan to serve.

The monitor is read every interval, and at once when a PSI trigger fires (runtime.psi): under
real memory pressure the budget falls below the serving member (core.pressure) and a smaller
one serves within one reading. Live latency comes from the machine's state (GPU clock and the
GPU's use by other processes, CPU frequency and steal; a measured power-mode column where there
is one) times a correction from the tokens served, kept across swaps (core.latency). A signal
this machine does not give is said once (`signals_unavailable`) and in status.

A pin is honoured while the pinned member fits the budget (with the slack when it is not the
one serving) and can be started; when it does not, the best plan that fits serves instead
(`pin_suspended`), and the pin comes back as soon as it fits again (`pin_restored`). A pin
whose swap fails is cleared (`pin_cleared`). Members that are quarantined or backing off are
not candidates, except the one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil

from apreqeld.core import pressure
from apreqeld.core.latency import Conditions, slowdown
from apreqeld.core.selection import (
    Candidate,
    Decision,
    Priority,
    ServiceLevels,
    choose,
    feasibility,
)
from apreqeld.errors import InputError
from apreqeld.manifest import Member, PlanSet
from apreqeld.runtime.backoff import Health
from apreqeld.runtime.compose import Composer
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.monitor import (
    JtopSource,
    ProcfsSource,
    Recorder,
    Source,
    State,
    TraceSource,
)
from apreqeld.runtime.policy import Policy, candidates_of
from apreqeld.runtime.psi import PressureWatch
from apreqeld.runtime.swapper import swap_mode


@dataclass(frozen=True)
class Choice:
    """A decision and the plan to serve after the pin is applied."""

    decision: Decision
    target: str | None
    reason: str
    pin_held: bool = False  # a pin is set and does not fit: `target` serves meanwhile


def pin_target(pinned: str | None, misfit: str | None, decision: Decision, /) -> Choice:
    """Pure: the pinned member while it fits (`misfit` None), else the decision's choice."""
    if pinned is None:
        return Choice(decision, decision.choice, decision.reason)
    if misfit is None:
        return Choice(decision, pinned, f"pinned to {pinned}")
    return Choice(decision, decision.choice, f"pinned {pinned} does not fit ({misfit}); "
                  f"{decision.choice} serves until it does", pin_held=True)


def _key(decision: Decision) -> tuple:
    return (decision.choice, decision.switch, decision.feasible,
            re.sub(r"[0-9.]+", "#", decision.reason))


class Adapter:
    """State, priority, pin, decisions; `tick` is one monitor step."""

    def __init__(self, config: DaemonConfig, planset: PlanSet, priority: Priority, *,
                 monitor: Source | None, health: Health, emit: Callable[..., dict],
                 serving: Callable[[], str | None],
                 shared: Callable[[str], float] = lambda _plan: 0.0,
                 busy: Callable[[], bool] = lambda: False, offload: bool = False,
                 composer: Composer | None = None) -> None:
        self.config, self.planset, self.priority = config, planset, priority
        self.composer = composer
        self.monitor = monitor
        self.health = health
        self.policy = Policy(margin=config.swap_margin, min_dwell_s=config.min_dwell_s,
                             reserve_bytes=config.reserve_bytes, slack_bytes=config.slack_bytes)
        self.state: State | None = None  # the monitor's last reading
        self.pinned: str | None = None
        self.pin_held = False
        self.pin_error: str | None = None
        self.last_decision: dict | None = None
        self.watch = {"source": monitor.name if monitor else None, "started": None,
                      "ticks": 0, "cpu_s": 0.0, "decisions": 0, "decide_ms_sum": 0.0,
                      "decide_ms_max": 0.0, "errors": 0}
        self.decide_ms: deque[float] = deque(maxlen=1000)
        self._emit, self._serving, self._shared = emit, serving, shared
        self._busy, self.offload = busy, offload
        self._recorder: Recorder | None = None
        self._decision_key: tuple | None = None
        self.watch_psi: PressureWatch | None = None
        self._triggered = False
        self._kick: asyncio.Event | None = None
        self.gpu_others: float | None = None  # GPU load seen while this daemon was idle
        self.reaction: dict | None = None  # the last shed: onset to decision

    def open(self) -> None:
        """The recorder (when asked for) and a first reading."""
        if self.monitor is None:
            return
        if self.config.record is not None:
            try:
                self._recorder = Recorder(self.config.record)
            except OSError as exc:
                raise InputError(f"cannot record to {self.config.record}: "
                                 f"{exc.strerror}") from None
        self.state = self.monitor.read()
        self.policy.see(self.state, now=time.monotonic())

    def close(self) -> None:
        if self.watch_psi is not None:
            self.watch_psi.close()
        if self.monitor is not None:
            self.monitor.close()
        if self._recorder is not None:
            self._recorder.close()

    def _watch_pressure(self) -> None:
        """PSI triggers on the system's and the daemon cgroup's memory pressure (live sources
        only), each one waking the monitor loop at once."""
        procfs = self.monitor.procfs if isinstance(self.monitor, JtopSource) else self.monitor
        if not isinstance(procfs, ProcfsSource):
            return
        cgroup = procfs.cgroup
        loop = asyncio.get_running_loop()
        files = ["/proc/pressure/memory"] + ([str(cgroup / "memory.pressure")] if cgroup else [])
        self.watch_psi = PressureWatch(
            files, share=pressure.SHED_SOME_PCT / 100,
            on_event=lambda path: loop.call_soon_threadsafe(self._triggered_by, path))

    def _triggered_by(self, _path: str) -> None:
        self._triggered = True
        if self._kick is not None:
            self._kick.set()

    # ------------------------------------------------------------------ the plan set

    def members(self) -> list[Member]:
        """The candidates: the plan set's front and the composed members kept."""
        kept = self.composer.members() if self.composer is not None else []
        return (self.planset.pareto_members or self.planset.members) + kept

    def member(self, plan: str | None) -> Member | None:
        """The member with this exact id in the current plan set (a reload may drop it), or a
        composed one."""
        found = next((m for m in self.planset.members if m.id == plan), None)
        if found is None and self.composer is not None:
            return self.composer.member(plan)
        return found

    def footprint(self, plan: str | None) -> float:
        """The member's measured footprint (what the policy counts), 0 for none."""
        member = self.member(plan)
        return float(member.measured.footprint_bytes) if member else 0.0

    def available(self) -> list[Member]:
        """Members that may be chosen: not quarantined nor backing off, or serving."""
        serving = self._serving()
        return [m for m in self.members() if m.id == serving or self.health.available(m.id)]

    def candidates(self, members: list[Member] | None = None) -> list[Candidate]:
        """The members as the policy sees them, at the monitor's power mode."""
        mode = self.reading().power_mode
        return candidates_of(self.members() if members is None else members,
                             accuracy=self.planset.accuracy, power_mode=mode)

    # ------------------------------------------------------------------ budget, decisions

    def reading(self) -> State:
        """The monitor's last State; without a monitor, psutil's memory now."""
        if self.state is not None:
            return self.state
        vm = psutil.virtual_memory()
        return State(t=0.0, source="psutil", mem_available_bytes=float(vm.available),
                     mem_total_bytes=float(vm.total))

    def budget_bytes(self) -> float | None:
        """Memory a variant may use now (the policy's budget; the one path)."""
        return self.policy.budget(self.reading(), current_footprint=self.footprint(
            self._serving()), now=time.monotonic())

    def conditions(self) -> Conditions:
        """What the latency model reads of the machine now."""
        state = self.reading()
        mode = state.power_mode
        return Conditions(
            offload=self.offload, gpu_clock_ratio=state.gpu_clock_ratio,
            gpu_others=self.gpu_others, cpu_freq_ratio=state.cpu_freq_ratio,
            cpu_steal=state.cpu_steal,
            mode_column=mode is not None and any(mode in m.conditions for m in self.members()))

    def latency_scale(self) -> float:
        return self.policy.latency_scale(self.conditions())

    def observe(self, plan: str, ms_per_token: float) -> None:
        """A served ms/token of `plan`, for the latency correction (a measured member's: a
        composed one's latency is what is being measured)."""
        member = self.member(plan)
        if member is not None and member.kind != "composed":
            (c,) = self.candidates([member])
            self.policy.observe(ms_per_token, c.latency_ms, slowdown(self.conditions()))

    def dwell_elapsed(self) -> bool:
        return self.policy.dwell_elapsed(time.monotonic())

    def mode_of(self, target: str) -> str:
        """How to swap to `target`: both variants in memory only when the budget holds both
        (what the serving worker already holds of the target's shards is not counted twice)."""
        if self.config.swap_mode != "auto":
            return self.config.swap_mode
        budget = self.budget_bytes()
        free = None if budget is None else budget - self.footprint(self._serving())
        need = self.footprint(target) - self._shared(target)
        return swap_mode(self.config.swap_mode, need=need, free=free)

    def decide(self, *, source: str, user: bool, event: bool = True) -> Choice:
        """One decision over the available members, then the pin; a decision event when it
        changed (always for a user's, unless `event` is False)."""
        t0 = time.perf_counter()
        members = self.available()
        proposal = self._proposal(members)
        if proposal is not None and all(m.id != proposal.id for m in members):
            members = [*members, proposal]
        decision = self.policy.decide(self.reading(), members, self.priority,
                                      current=self._serving(), now=time.monotonic(),
                                      conditions=self.conditions(),
                                      accuracy=self.planset.accuracy, user=user)
        if proposal is not None and decision.choice == proposal.id:
            self.composer.admit(proposal, protect=(self._serving(), self.pinned))
        choice = pin_target(self.pinned, self._pin_misfit(), decision)
        ms = (time.perf_counter() - t0) * 1000
        if not user:
            self.watch["decisions"] += 1
            self.watch["decide_ms_sum"] += ms
            self.watch["decide_ms_max"] = max(self.watch["decide_ms_max"], ms)
            self.decide_ms.append(ms)
        self._note_pin(choice)
        key = _key(decision)
        if (user and event) or (not user and key != self._decision_key):
            self._decision_key = key
            self.last_decision = decision_dict(decision) | {"source": source}
            held = (" (pinned)" if self.pinned and not choice.pin_held else
                    " (not adapting)" if not user and not self.config.adapt else "")
            self._emit("decision", source=source,
                       **{"from": self._serving(), "to": decision.choice},
                       reason=decision.reason + (held if decision.switch else ""),
                       switch=decision.switch, feasible=list(decision.feasible),
                       budget_bytes=decision.budget_bytes, state=state_dict(self.state),
                       decide_ms=round(ms, 3))
        return choice

    @staticmethod
    def _limits(budget: float | None, levels: ServiceLevels,
                scale: float) -> dict[str, float | None]:
        """What a composed member must fit: `budget` and the max memory level; the max
        latency level over the live scale (ms/token as measured). None: no limit."""
        found = [b for b in (budget, levels.max_memory_bytes) if b is not None]
        return {"max_footprint_bytes": min(found) if found else None,
                "max_latency_ms": (levels.max_latency_ms / scale
                                   if levels.max_latency_ms is not None else None)}

    def _fitting(self, members: list[Member], levels: ServiceLevels, budget: float | None,
                 scale: float, *, slack: float = 0.0) -> list[Member]:
        """The members that fit the levels and `budget` (less `slack`, except the serving
        one)."""
        serving, fitting = self._serving(), []
        for m, c in zip(members, self.candidates(members), strict=True):
            limit = budget if budget is None or m.id == serving else budget - slack
            if feasibility(c, levels, budget_bytes=limit, latency_scale=scale) is None:
                fitting.append(m)
        return fitting

    def _proposal(self, available: list[Member]) -> Member | None:
        """A composed member worth adding to the candidates now (not while pinned, nor when
        nothing limits the choice: the largest member serves)."""
        if self.composer is None or self.pinned is not None:
            return None
        budget, scale = self.budget_bytes(), self.latency_scale()
        slack = self.policy.slack_bytes
        limits = self._limits(None if budget is None else budget - slack,
                              self.priority.levels, scale)
        if all(v is None for v in limits.values()):
            return None
        fitting = self._fitting(available, self.priority.levels, budget, scale, slack=slack)
        accuracy = self.planset.accuracy
        top = min(self.planset.pareto_members or self.planset.members,
                  key=lambda m: getattr(m.measured, accuracy))
        if any(m.id == top.id for m in fitting):
            return None  # the most accurate member fits: nothing to compose for
        return self.composer.propose(**limits, fitting=fitting)

    def preview(self, priority: Priority, /, *, budget_bytes: float | None) -> dict:
        """What would be composed under this priority (its weights and levels) and memory
        budget against the plan set's members, and whether the policy would serve it; nothing
        is served or kept."""
        levels, scale = priority.levels, self.latency_scale()
        members = [m for m in self.available() if m.kind != "composed"]
        fitting = self._fitting(members, levels, budget_bytes, scale)
        best = min(fitting, key=lambda m: getattr(m.measured, self.planset.accuracy),
                   default=None)
        out = {"budget_bytes": budget_bytes, "fitting": [m.id for m in fitting],
               "best_member": best.id if best else None,
               "best_member_accuracy": (getattr(best.measured, self.planset.accuracy)
                                        if best else None)}
        off = self.composer.off_reason if self.composer else "no composer"
        if off is not None:
            return out | {"composed": None, "reason": f"composition is off: {off}"}
        limits = self._limits(budget_bytes, levels, scale)
        composition = self.composer.composition(**limits)
        if composition is None:
            return out | {"composed": None, "reason": "no recipe of the shards at hand is "
                          "predicted to fit these limits"}
        proposal = self.composer.propose(**limits, fitting=fitting)
        shown = proposal or self.composer.member_of(composition)
        chosen = None
        if proposal is not None:
            chosen = choose(self.candidates([*members, proposal]), priority,
                            budget_bytes=budget_bytes, latency_scale=scale).choice
        return out | {
            "composed": {"id": shown.id, "label": shown.label, "predicted": shown.predicted,
                         "types": dict(Counter(shown.recipe.values()))},
            "worth_serving": proposal is not None, "would_serve": chosen == shown.id,
            "chosen": chosen,
            "reason": ("predicted better than every member that fits beyond the predictor's "
                       "median error" if proposal is not None else
                       "not predicted better than the best member that fits beyond the "
                       "predictor's median error")}

    def _pin_misfit(self) -> str | None:
        """Why the pinned member cannot serve now (None: it can)."""
        if self.pinned is None:
            return None
        if self.member(self.pinned) is None:
            return "not in the plan set"
        if self.pinned != self._serving() and not self.health.available(self.pinned):
            return "quarantined" if self.health.quarantined(self.pinned) else "backing off"
        (c,) = self.candidates([self.member(self.pinned)])
        budget = self.budget_bytes()
        if budget is not None and c.id != self._serving():
            budget -= self.policy.slack_bytes
        return feasibility(c, ServiceLevels(), budget_bytes=budget, latency_scale=1.0)

    def _note_pin(self, choice: Choice) -> None:
        if choice.pin_held and not self.pin_held:
            self._emit("pin_suspended", plan=self.pinned, to=choice.target, reason=choice.reason)
        elif self.pinned and self.pin_held and not choice.pin_held:
            self._emit("pin_restored", plan=self.pinned, to=self.pinned,
                       reason=f"{self.pinned} fits again")
        self.pin_held = choice.pin_held

    def pin(self, plan: str) -> None:
        self.pinned, self.pin_held, self.pin_error = plan, False, None
        self.health.succeeded(plan)  # the user asks for it: one more try

    def unpin(self) -> None:
        self.pinned, self.pin_held = None, False

    def pin_failed(self, plan: str, reason: str) -> bool:
        """A swap to `plan` failed: a pin to it is cleared (True) and reported."""
        if self.pinned != plan:
            return False
        self.pin_error = f"pinned plan {plan} failed: {reason}"
        self.unpin()
        self._emit("pin_cleared", plan=plan, reason=f"{self.pin_error}; following the "
                   "priority again")
        return True

    def restart_plan(self, plan: str | None) -> str | None:
        """The plan to restart when no worker serves: `plan` unless it is quarantined or gone,
        else the best plan by the priority among those not quarantined."""
        if plan is not None and self.member(plan) is not None and \
                not self.health.quarantined(plan):
            return plan
        usable = [m for m in self.members() if not self.health.quarantined(m.id)]
        if not usable:
            return None
        return self.policy.decide(self.reading(), usable, self.priority, current=None,
                                  now=time.monotonic(), conditions=self.conditions(),
                                  accuracy=self.planset.accuracy, user=True).choice

    # ------------------------------------------------------------------ the machine

    async def follow(self, step: Callable[[], object]) -> None:
        """Call `step` (one reading, one decision, acted on) every monitor interval, and at
        once when a PSI trigger fires."""
        if isinstance(self.monitor, TraceSource):
            self.monitor.restart()  # the trace starts when serving starts
        self.watch["started"] = time.time()
        self._kick = asyncio.Event()
        if self.watch_psi is None:
            self._watch_pressure()
        self._emit("monitor_start", source=self.monitor.name,
                   interval_s=self.config.monitor_interval_s, adapt=self.config.adapt,
                   psi_triggers=self.watch_psi.status() if self.watch_psi else None)
        self._say_unavailable()
        while True:
            step()
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.config.monitor_interval_s)

    def unavailable(self) -> list[str]:
        """The signals this machine does not give (None in its readings)."""
        state = self.reading()
        wanted = {"psi": state.psi_memory_some_avg10, "psi totals": state.psi_memory_some_recent,
                  "cgroup memory limit": state.cgroup_headroom_bytes,
                  "cgroup memory.pressure": state.cgroup_psi_some_recent,
                  "cgroup memory.events": state.cgroup_high_events,
                  "swap-in rate": state.swapin_per_s, "cpu frequency": state.cpu_freq_ratio,
                  "cpu steal": state.cpu_steal, "gpu load": state.gpu_load,
                  "gpu clock": state.gpu_clock_ratio, "power mode": state.power_mode,
                  "temperature": state.temperature_c}
        missing = [k for k, v in wanted.items() if v is None]
        if self.watch_psi is not None and not self.watch_psi.active:
            missing.append("psi triggers")
        return missing

    def _say_unavailable(self) -> None:
        missing = self.unavailable()
        if missing:
            self._emit("signals_unavailable", signals=missing,
                       reason="this machine does not give " + ", ".join(missing))

    def tick(self, swapping: bool = False) -> Choice | None:
        """One reading, one decision (none while a swap is pending); its CPU time counted."""
        cpu = time.thread_time()
        try:
            footprint = self.footprint(self._serving())
            if isinstance(self.monitor, TraceSource):
                self.monitor.loaded_bytes = footprint
            self.state = self.monitor.read()
            triggered, self._triggered = self._triggered, False
            now = time.monotonic()
            was = self.policy.shedding.active(now=now)
            verdict = self.policy.see(self.state, now=now, triggered=triggered)
            if verdict.pressure and not was:
                self._emit("pressure", reason=verdict.reason, trigger=triggered,
                           state=state_dict(self.state))
                self.reaction = {"seen": now, "at": time.time(), "trigger": triggered,
                                 "reason": verdict.reason}
            elif was and not self.policy.shedding.active(now=now):
                self._emit("pressure_cleared", reason="no memory pressure for "
                           f"{pressure.CLEAR_S:g} s: members may grow again")
            if self.state.gpu_load_others is not None:
                self.gpu_others = self.state.gpu_load_others
            elif not self._busy():  # idle: what keeps the GPU busy is someone else
                self.gpu_others = self.state.gpu_load
            if self._recorder is not None:
                self._recorder.write(self.state, model_bytes=footprint)
            if swapping or self._serving() is None:
                return None
            choice = self.decide(source="monitor", user=False)
            if self.reaction is not None and "decide_ms" not in self.reaction and \
                    choice.decision.switch and verdict.pressure:
                self.reaction["decide_ms"] = round((time.monotonic() - self.reaction["seen"])
                                                   * 1000, 1)
            return choice
        except Exception as exc:  # noqa: BLE001 - a bad reading must not stop the loop
            self.watch["errors"] += 1
            if self.watch["errors"] == 1:
                self._emit("monitor_error", reason=f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.watch["ticks"] += 1
            self.watch["cpu_s"] += time.thread_time() - cpu


def state_dict(state: State | None) -> dict | None:
    """The known fields of a State (None fields are unknown and left out)."""
    if state is None:
        return None
    return {k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in asdict(state).items() if v is not None}


def decision_dict(decision: Decision) -> dict:
    return {"choice": decision.choice, "switch": decision.switch, "reason": decision.reason,
            "feasible": list(decision.feasible),
            "closeness": {k: round(v, 6) for k, v in decision.closeness.items()},
            "budget_bytes": decision.budget_bytes}
