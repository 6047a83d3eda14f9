"""The one owner of workers and swaps (cf. ollama's server/sched.go).

Requests wait in a bounded FIFO queue (full: BusyError at once) and run one at a time on the
serving worker, under the *slot* lock. A swap takes the slot only to switch: make-before-break
loads the new worker while the old one serves, then switches between two requests;
break-before-make takes the slot (the in-flight request finishes first), stops the old worker,
loads the new one, and releases. Every accepted request is answered exactly once (`Job.answer`).
A worker that dies is restarted by whoever next needs it under the slot.

Triggers: the user's priority (`set_priority`), `pin`/`unpin`, a plan-set `reload`, and the
machine: with a monitor, a policy task reads one State per interval, computes the budget and
asks `Policy.decide`; a switch goes through `apply_decision` (at once when the serving plan no
longer fits, after margin and dwell for an upgrade). A decision is an event when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import psutil

from apreqeld.core.selection import (
    Candidate,
    Decision,
    Priority,
    choose,
    closeness,
    feasibility,
)
from apreqeld.errors import BusyError, DaemonError, InputError
from apreqeld.manifest import Member, PlanSet, load_planset
from apreqeld.runtime import wire
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.files import MemberFiles
from apreqeld.runtime.monitor import Recorder, Source, State, TraceSource
from apreqeld.runtime.policy import Policy, candidates_of
from apreqeld.runtime.workers import Job, Spawn, Worker

StartWorker = Callable[[str, Path, Spawn], Awaitable[Worker]]
MAKE, BREAK = "make-before-break", "break-before-make"
# Events also written to stderr (the journal under systemd); decisions are too frequent.
LOGGED = {"swap_done", "swap_failed", "load_failed", "planset_reloaded", "planset_rejected",
          "worker_died", "worker_restart", "build_start", "build_done", "build_failed",
          "monitor_start", "monitor_error"}


def log_line(event: dict) -> str:
    """One line for the journal: kind, from -> to, figures, reason."""
    parts = [event["kind"]]
    if "to" in event or "plan" in event:
        parts.append(f"{event.get('from')} -> {event['to']}" if "to" in event
                     else str(event["plan"]))
    parts += [f"{k}={event[k]}" for k in ("mode", "total_ms", "downtime_ms", "members", "code")
              if k in event]
    if event.get("reason"):
        parts.append(f"({event['reason']})")
    return " ".join(parts)


def priority_dict(priority: Priority) -> dict:
    return {"name": priority.name, "weights": list(priority.weights),
            "levels": {k: v for k, v in asdict(priority.levels).items() if v is not None}}


def _quantile(values: deque[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of the recent values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 4)


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


class Scheduler:
    """Queue, workers, swaps, events."""

    def __init__(self, config: DaemonConfig, planset: PlanSet, priority: Priority, *,
                 start_worker: StartWorker = Worker.start,
                 monitor: Source | None = None) -> None:
        self.config = config
        self.monitor = monitor
        self.policy = Policy(margin=config.swap_margin, min_dwell_s=config.min_dwell_s,
                             reserve_bytes=config.reserve_bytes, slack_bytes=config.slack_bytes)
        self.state: State | None = None  # the monitor's last reading
        self.watch = {"source": monitor.name if monitor else None, "started": None,
                      "ticks": 0, "cpu_s": 0.0, "decisions": 0, "decide_ms_sum": 0.0,
                      "decide_ms_max": 0.0, "errors": 0}
        self._decide_ms: deque[float] = deque(maxlen=1000)
        self._recorder: Recorder | None = None
        self._decision_key: tuple | None = None
        self.planset = planset
        self.priority = priority
        self.pinned: str | None = None
        self.spawn = Spawn(n_ctx=config.n_ctx or planset.serving.n_ctx,
                           threads=config.threads or planset.serving.threads,
                           gpu_layers=(config.gpu_layers if config.gpu_layers is not None
                                       else planset.serving.gpu_layers),
                           timeout_s=config.load_timeout_s)
        self._start_worker = start_worker
        self.active: Worker | None = None
        self.serving: str | None = None  # the plan the active worker serves
        self.target: str | None = None  # the plan the daemon wants to serve
        self.swap: dict | None = None  # the swap in progress, for status
        self.last_decision: dict | None = None
        self.closing = False
        self.broken: str | None = None
        self.counts = {"accepted": 0, "served": 0, "failed": 0, "cancelled": 0, "busy": 0,
                       "swaps": 0, "restarts": 0}
        self.history: deque[dict] = deque(maxlen=50)
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.queue_bound)
        self._slot = asyncio.Lock()
        self._kick = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._current: Job | None = None
        self._seq = itertools.count(1)
        self._subscribers: set[asyncio.Queue] = set()
        self._workers: set[Worker] = set()
        self._tasks: list[asyncio.Task] = []
        self._watchers: set[asyncio.Task] = set()
        self._swap_reason = ""
        self.files = MemberFiles(config.state_dir, config.plans, planset,
                                 emit=lambda kind, **f: self.emit(kind, **f))
        self._since_swap = time.monotonic()
        self._started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Choose the first plan, load it, and start serving (and watching the machine)."""
        if self.monitor is not None:
            if self.config.record is not None:
                try:
                    self._recorder = Recorder(self.config.record)
                except OSError as exc:
                    raise InputError(f"cannot record to {self.config.record}: "
                                     f"{exc.strerror}") from None
            self.state = self.monitor.read()
        decision = self.decide(source="start")
        first = self.pinned or decision.choice
        others = sorted((m for m in self.planset.members if m.id != first),
                        key=lambda m: m.measured.footprint_bytes)
        for plan in [first] + [m.id for m in others]:
            try:
                await self._ensure_file(self.planset.member(plan))  # built outside the slot
                async with self._slot:
                    self.active = await self._launch(plan)
            except DaemonError as exc:  # serve something rather than nothing
                self.emit("load_failed", plan=plan, reason=str(exc))
                failure = exc
                continue
            self.serving = self.target = plan
            break
        else:
            raise failure
        self._since_swap = time.monotonic()
        self._tasks = [asyncio.create_task(self._dispatch(), name="dispatch"),
                       asyncio.create_task(self._swapper(), name="swapper"),
                       asyncio.create_task(self._prefetch(), name="prefetch")]
        if self.monitor is not None:
            self._tasks.append(asyncio.create_task(self._follow(), name="policy"))

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let queued and in-flight requests finish within `grace_s`, then
        answer the rest with an error and stop every worker."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while (self._queue.qsize() or self._current) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        gone = DaemonError("the daemon is shutting down", code=wire.SHUTTING_DOWN)
        while not self._queue.empty():
            self._queue.get_nowait().answer(error=gone)
        if self._current is not None:
            self._current.answer(error=gone)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(w.stop() for w in list(self._workers)))
        await self.files.close()
        self.active = None
        self._workers.clear()
        if self.monitor is not None:
            self.monitor.close()
        if self._recorder is not None:
            self._recorder.close()

    # ------------------------------------------------------------------ requests

    def submit(self, kind: str, params: dict, on_token: Callable[[str], None]) -> Job:
        """Accept a request into the queue, or refuse it at once (busy, shutting down)."""
        if self.closing:
            raise DaemonError("the daemon is shutting down", code=wire.SHUTTING_DOWN)
        job = Job(next(self._seq), kind, params, on_token,
                  asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.counts["busy"] += 1
            raise BusyError(f"busy: the request queue is full ({self.config.queue_bound} "
                            "waiting); try again") from None
        self.counts["accepted"] += 1
        return job

    async def _dispatch(self) -> None:
        while True:
            job = await self._queue.get()
            if job.cancelled:
                if job.answer(error=DaemonError("cancelled: the client went away",
                                                code="cancelled")):
                    self.counts["cancelled"] += 1
                continue
            async with self._slot:
                self._current = job
                self.files.request_started()
                try:
                    worker = await self._revive()
                    result = await worker.run(job)
                    result |= {"plan": worker.plan,
                               "queued_ms": round((time.monotonic() - job.accepted) * 1000
                                                  - result["usage"].get("total_ms", 0), 3)}
                    if job.answer(result):
                        self.counts["cancelled" if job.cancelled else "served"] += 1
                    self._observe(worker.plan, result["usage"].get("ms_per_token"))
                except DaemonError as exc:
                    if job.answer(error=exc):
                        self.counts["failed"] += 1
                except Exception as exc:  # noqa: BLE001 - answer it; the queue keeps going
                    print(f"apreqeld: internal error serving a request: {exc!r}",
                          file=sys.stderr, flush=True)
                    if job.answer(error=DaemonError(f"internal error: {exc}")):
                        self.counts["failed"] += 1
                finally:
                    self._current = None
                    self.files.request_finished()

    async def _revive(self) -> Worker:
        """The serving worker, restarted if it died (call under the slot)."""
        if self.active is not None and self.active.alive:
            return self.active
        plan = self.serving or self.target
        if self.active is not None:
            self._workers.discard(self.active)
            await self.active.stop()
            self.counts["restarts"] += 1
            self.emit("worker_restart", plan=plan, reason="the worker died")
        self.active = None
        try:
            self.active = await self._launch(plan)
        except DaemonError as exc:
            self.broken = str(exc)
            raise
        self.broken = None
        return self.active

    async def _launch(self, plan: str) -> Worker:
        member = self._member(plan)
        if member is None:
            raise DaemonError(f"plan {plan} is not in the plan set", code=wire.UNAVAILABLE)
        path = await self._ensure_file(member)
        worker = await self._start_worker(plan, path, self.spawn)
        self._workers.add(worker)
        watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return worker

    async def _watch(self, worker: Worker) -> None:
        """Restart the serving worker when it dies while idle."""
        await worker.proc.wait()
        if worker.stopping or self.closing:
            return
        self.emit("worker_died", plan=worker.plan, pid=worker.pid,
                  code=worker.proc.returncode)
        if worker is self.active:
            async with self._slot:
                with contextlib.suppress(DaemonError):
                    await self._revive()

    # ------------------------------------------------------------------ files

    def path_of(self, member: Member) -> Path:
        return self.files.path(member)

    def _present(self, member: Member) -> bool:
        return self.files.present(member)

    async def _ensure_file(self, member: Member) -> Path:
        """The member's model assembled from the shard store (missing shards built by a child
        process, never here)."""
        return await self.files.ensure(member)

    async def _prefetch(self) -> None:
        """Make the members the policy can choose loadable, in the background."""
        await self.files.prefetch(self._members())

    # ------------------------------------------------------------------ decisions

    def _members(self) -> list[Member]:
        return self.planset.pareto_members or self.planset.members

    def candidates(self) -> list[Candidate]:
        """The plan set as the policy sees it, at the monitor's power mode."""
        mode = self.state.power_mode if self.state is not None else None
        return candidates_of(self._members(), accuracy=self.planset.accuracy, power_mode=mode)

    def _member(self, plan: str | None) -> Member | None:
        """The member with this exact id in the current plan set (a reload may drop it)."""
        return next((m for m in self.planset.members if m.id == plan), None)

    def footprint(self, plan: str | None) -> float:
        if self.active is not None and self.active.plan == plan and self.active.rss:
            return float(self.active.rss)
        member = self._member(plan)
        return float(member.measured.footprint_bytes) if member else 0.0

    def measured_footprint(self, plan: str | None) -> float:
        """The member's measured footprint (what the policy counts), 0 for none."""
        member = self._member(plan)
        return float(member.measured.footprint_bytes) if member else 0.0

    def budget_bytes(self) -> float | None:
        """Memory a variant may use now: min(MemAvailable, cgroup headroom), tightened by
        pressure, + the serving variant - the reserve (psutil's MemAvailable without monitor)."""
        if self.state is None:
            available = psutil.virtual_memory().available
            return available + self.footprint(self.serving) - self.config.reserve_bytes
        return self.policy.budget(self.state,
                                  current_footprint=self.measured_footprint(self.serving))

    def latency_scale(self) -> float:
        """How much slower than measured the serving plan runs now (1.0 when unknown)."""
        current = next((c for c in self.candidates() if c.id == self.serving), None)
        return self.policy.latency_scale(current)

    def decide(self, *, source: str, margin: float = 0.0, dwell: bool = True) -> Decision:
        """The user's priority over the plan set (user-initiated: no margin, no dwell)."""
        decision = choose(self.candidates(), self.priority, current=self.serving,
                          budget_bytes=self.budget_bytes(), latency_scale=self.latency_scale(),
                          margin=margin, dwell_elapsed=dwell,
                          slack_bytes=self.policy.slack_bytes if self.state else 0.0)
        self.last_decision = decision_dict(decision) | {"source": source}
        self._decision_key = self._key(decision)
        self.emit("decision", source=source, **{"from": self.serving, "to": decision.choice},
                  reason=decision.reason, switch=decision.switch,
                  budget_bytes=decision.budget_bytes, state=state_dict(self.state))
        return decision

    def dwell_elapsed(self) -> bool:
        return self.policy.dwell_elapsed(time.monotonic())

    # ------------------------------------------------------------------ the machine

    async def _follow(self) -> None:
        """Read the monitor every interval and act on the policy's decision."""
        if isinstance(self.monitor, TraceSource):
            self.monitor.restart()  # the trace starts when serving starts
        self.watch["started"] = time.time()
        self.emit("monitor_start", source=self.monitor.name,
                  interval_s=self.config.monitor_interval_s, adapt=self.config.adapt)
        while True:
            self.tick()
            await asyncio.sleep(self.config.monitor_interval_s)

    def tick(self) -> Decision | None:
        """One reading, one decision (none while a swap is pending); its CPU time counted."""
        cpu = time.thread_time()
        try:
            return self._tick()
        except Exception as exc:  # noqa: BLE001 - a bad reading must not stop the loop
            self.watch["errors"] += 1
            if self.watch["errors"] == 1:
                self.emit("monitor_error", reason=f"{type(exc).__name__}: {exc}")
            return None
        finally:
            self.watch["ticks"] += 1
            self.watch["cpu_s"] += time.thread_time() - cpu

    def _tick(self) -> Decision | None:
        footprint = self.measured_footprint(self.serving)
        if isinstance(self.monitor, TraceSource):
            self.monitor.loaded_bytes = footprint
        self.state = self.monitor.read()
        if self._recorder is not None:
            self._recorder.write(self.state, model_bytes=footprint)
        if self.swap is not None or self.target != self.serving or self.serving is None:
            return None
        t0 = time.perf_counter()
        decision = self.policy.decide(self.state, self._members(), self.priority,
                                      current=self.serving, now=time.monotonic(),
                                      accuracy=self.planset.accuracy)
        ms = (time.perf_counter() - t0) * 1000
        self.watch["decisions"] += 1
        self.watch["decide_ms_sum"] += ms
        self.watch["decide_ms_max"] = max(self.watch["decide_ms_max"], ms)
        self._decide_ms.append(ms)
        key = self._key(decision)
        if key != self._decision_key:  # only a changed choice or reason is an event
            self._decision_key = key
            self.last_decision = decision_dict(decision) | {"source": "monitor"}
            held = (" (pinned)" if self.pinned else " (not adapting)"
                    if not self.config.adapt else "")
            self.emit("decision", source="monitor",
                      **{"from": self.serving, "to": decision.choice},
                      reason=decision.reason + (held if decision.switch else ""),
                      switch=decision.switch, feasible=list(decision.feasible),
                      budget_bytes=decision.budget_bytes, state=state_dict(self.state),
                      decide_ms=round(ms, 3))
        if self.config.adapt:
            self.apply_decision(decision, source="monitor")
        return decision

    @staticmethod
    def _key(decision: Decision) -> tuple:
        return (decision.choice, decision.switch, decision.feasible,
                re.sub(r"[0-9.]+", "#", decision.reason))

    def _observe(self, plan: str, ms_per_token: float | None) -> None:
        """Feed a served ms/token to the policy (not while replaying a trace: the trace stands
        for the machine, and this machine's real speed would cancel its power modes)."""
        if ms_per_token and self.monitor is not None and not isinstance(self.monitor,
                                                                         TraceSource):
            self.policy.observe(plan, float(ms_per_token))

    def plan_fit(self) -> list[dict]:
        """Each candidate: footprint, live latency, accuracy, fits or why not, closeness."""
        budget, scale = self.budget_bytes(), self.latency_scale()
        slack = self.policy.slack_bytes if self.state else 0.0
        rows, fitting = [], []
        for c in self.candidates():
            limit = budget if budget is None or c.id == self.serving else budget - slack
            why = feasibility(c, self.priority.levels, budget_bytes=limit, latency_scale=scale)
            if why is None:
                fitting.append(c)
            rows.append({"id": c.id, "footprint_bytes": c.footprint_bytes,
                         "latency_ms": round(c.latency_ms * scale, 3), "accuracy": c.accuracy,
                         "fits": why is None, "why": why, "serving": c.id == self.serving})
        scores = closeness(fitting, self.priority.weights, latency_scale=scale)
        for row in rows:
            row["closeness"] = round(scores[row["id"]], 4) if row["id"] in scores else None
        return rows

    def apply_decision(self, decision: Decision, *, source: str) -> bool:
        """The hook for a periodic policy: swap to `decision.choice` unless pinned."""
        if self.pinned or not decision.switch or decision.choice is None:
            return False
        if decision.choice == self.target:
            return False
        self.request_swap(decision.choice, reason=f"{source}: {decision.reason}")
        return True

    def request_swap(self, plan: str, *, reason: str) -> None:
        """Make `plan` the target; the swapper converges to it."""
        self.target = self.planset.member(plan).id
        self._swap_reason = reason
        self._settled.clear()
        self._kick.set()

    async def settle(self) -> None:
        """Wait until no swap is pending or running."""
        await self._settled.wait()

    async def set_priority(self, priority: Priority, *, wait: bool = False) -> dict:
        self.priority = priority
        decision = self.decide(source="priority")
        if not self.pinned and decision.choice is not None:
            self.request_swap(decision.choice, reason=f"priority {priority.name or 'weights'}: "
                                                      f"{decision.reason}")
        if wait:
            await self.settle()
        return {"priority": priority_dict(priority), "decision": decision_dict(decision),
                "pinned": self.pinned, "plan": self.serving}

    async def pin(self, plan: str, *, wait: bool = False) -> dict:
        member = self.planset.member(plan)
        self.pinned = member.id
        self.emit("pin", plan=member.id)
        self.request_swap(member.id, reason=f"pinned to {member.id}")
        if wait:
            await self.settle()
        return {"pinned": self.pinned, "plan": self.serving}

    async def unpin(self, *, wait: bool = False) -> dict:
        self.pinned = None
        self.emit("unpin")
        decision = self.decide(source="unpin")
        if decision.choice is not None:
            self.request_swap(decision.choice, reason=f"unpinned: {decision.reason}")
        if wait:
            await self.settle()
        return {"pinned": None, "decision": decision_dict(decision), "plan": self.serving}

    async def reload(self, planset: PlanSet | None = None, *, wait: bool = False) -> dict:
        """Load the plan set again (validated); an invalid one is refused and the old kept."""
        try:
            planset = planset or await asyncio.to_thread(load_planset, self.config.plans)
        except InputError as exc:
            self.emit("planset_rejected", reason=str(exc))
            raise DaemonError(f"plan set refused, keeping the old one: {exc}",
                              code=wire.INVALID) from None
        try:
            self.files.use(planset)
        except DaemonError as exc:
            self.emit("planset_rejected", reason=str(exc))
            raise DaemonError(f"plan set refused, keeping the old one: {exc}",
                              code=wire.INVALID) from None
        old = {m.id for m in self.planset.members}
        self.planset = planset
        new = {m.id for m in planset.members}
        self.emit("planset_reloaded", name=planset.name, members=len(planset.members),
                  added=sorted(new - old), removed=sorted(old - new))
        if self.pinned and self.pinned not in new:
            self.emit("unpin", reason=f"pinned plan {self.pinned} left the plan set")
            self.pinned = None
        target = self.pinned or self.decide(source="reload").choice
        if target is not None:
            self.request_swap(target, reason="plan set reloaded")
        self._tasks.append(asyncio.create_task(self._prefetch(), name="prefetch"))
        if wait:
            await self.settle()
        return {"planset": planset.name, "members": len(planset.members), "plan": self.serving}

    # ------------------------------------------------------------------ swaps

    async def _swapper(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self.target is not None and self.target != self.serving and not self.closing:
                target = self.target
                try:
                    done = await self._swap(target, self._swap_reason)
                except (DaemonError, InputError) as exc:
                    done = self._swap_failed(self.serving, target, DaemonError(str(exc)))
                if not done:
                    if self.target == target:
                        self.target = self.serving
            if not self._kick.is_set():
                self._settled.set()

    def swap_mode(self, target: str) -> str:
        """Make-before-break when memory holds both variants, else break-before-make."""
        if self.config.swap_mode != "auto":
            return self.config.swap_mode
        need = self.planset.member(target).measured.footprint_bytes - self.shared_bytes(target)
        if self.state is not None:  # the budget less the serving variant still loaded
            budget = self.budget_bytes()
            free = (budget - self.measured_footprint(self.serving)) if budget is not None \
                else psutil.virtual_memory().available - self.config.reserve_bytes
        else:
            free = psutil.virtual_memory().available - self.config.reserve_bytes
        return MAKE if need <= free else BREAK

    def shared_bytes(self, target: str) -> int:
        """What the serving worker already holds of `target`'s shards (page cache a second
        worker shares): make-before-break counts only what the new worker adds."""
        active, member = self.active, self._member(target)
        loaded = self._member(active.plan) if active is not None else None
        if active is None or member is None or loaded is None or not active.alive:
            return 0
        try:
            return self.files.shared_bytes(active.pid, loaded, member)
        except (OSError, InputError):
            return 0

    async def _swap(self, target: str, reason: str) -> bool:
        member = self._member(target)
        if member is not None:  # shards are built before any slot is taken
            try:
                await self._ensure_file(member)
            except DaemonError as exc:
                return self._swap_failed(self.serving, target, exc)
        source, mode, t0 = self.serving, self.swap_mode(target), time.monotonic()
        self.swap = {"from": source, "to": target, "mode": mode, "phase": "loading",
                     "reason": reason, "since": time.time()}
        self.emit("swap_start", **{"from": source, "to": target}, mode=mode, reason=reason,
                  state=state_dict(self.state))
        try:
            if mode == MAKE:
                try:
                    new = await self._launch(target)
                except DaemonError as exc:
                    return self._swap_failed(source, target, exc)
                self.swap["phase"] = "switching"
                async with self._slot:  # the in-flight request finishes on the old worker
                    down = time.monotonic()
                    old, self.active, self.serving = self.active, new, target
                    down = time.monotonic() - down
                if old is not None:
                    self._workers.discard(old)
                    await old.stop()
            else:
                async with self._slot:
                    down = time.monotonic()
                    self.swap["phase"] = "stopping"
                    old, self.active = self.active, None
                    if old is not None:
                        self._workers.discard(old)
                        await old.stop()
                    self.swap["phase"] = "loading"
                    try:
                        self.active = await self._launch(target)
                    except DaemonError as exc:
                        with contextlib.suppress(DaemonError):
                            await self._revive()  # back to the old plan
                        return self._swap_failed(source, target, exc)
                    self.serving = target
                    down = time.monotonic() - down
        finally:
            self.swap = None
        self._since_swap = time.monotonic()
        self.policy.switched(now=self._since_swap)
        self.counts["swaps"] += 1
        self.emit("swap_done", **{"from": source, "to": target}, mode=mode, reason=reason,
                  total_ms=round((time.monotonic() - t0) * 1000, 1),
                  downtime_ms=round(down * 1000, 1), state=state_dict(self.state))
        return True

    def _swap_failed(self, source: str | None, target: str, exc: DaemonError) -> bool:
        self.emit("swap_failed", **{"from": source, "to": target}, reason=str(exc),
                  state=state_dict(self.state))
        return False

    # ------------------------------------------------------------------ events, status

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def emit(self, kind: str, **fields: object) -> dict:
        event = {"kind": kind, "time": round(time.time(), 3)} | fields
        self.history.append(event)
        if kind in LOGGED:
            print(f"apreqeld: {log_line(event)}", file=sys.stderr, flush=True)
        for queue in list(self._subscribers):
            if queue.full():  # a subscriber that does not read loses its oldest events
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    def status(self) -> dict:
        member = self._member(self.serving)
        return {
            "protocol": wire.PROTOCOL,
            "plan": self.serving,
            "label": member.label if member else None,
            "target": self.target,
            "swapping": self.swap is not None,
            "swap": dict(self.swap) if self.swap else None,
            "priority": priority_dict(self.priority),
            "pinned": self.pinned,
            "queue": self._queue.qsize(),
            "queue_bound": self.config.queue_bound,
            "in_flight": self._current is not None,
            "closing": self.closing,
            "broken": self.broken,
            "workers": [w.describe() for w in self._workers],
            "planset": {"name": self.planset.name, "members": len(self.planset.members),
                        "dir": str(self.config.plans)},
            "counts": dict(self.counts),
            "subscribers": len(self._subscribers),
            "last_decision": self.last_decision,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "monitor": self.monitor_status(),
            "state": state_dict(self.state),
            "budget_bytes": self.budget_bytes(),
            "plans": self.plan_fit(),
        }

    def monitor_status(self) -> dict | None:
        """The monitor's source, interval, readings and their CPU and decision cost."""
        if self.monitor is None:
            return None
        w = self.watch
        alive = time.time() - w["started"] if w["started"] else 0.0
        return {"source": w["source"], "interval_s": self.config.monitor_interval_s,
                "adapt": self.config.adapt, "started": w["started"], "ticks": w["ticks"],
                "errors": w["errors"], "cpu_s": round(w["cpu_s"], 6),
                "cpu_percent": round(100 * w["cpu_s"] / alive, 4) if alive > 0 else None,
                "decide_ms_mean": (round(w["decide_ms_sum"] / w["decisions"], 4)
                                   if w["decisions"] else None),
                "decide_ms_p50": _quantile(self._decide_ms, 0.5),
                "decide_ms_p99": _quantile(self._decide_ms, 0.99),
                "decide_ms_max": round(w["decide_ms_max"], 4),
                "dwell_elapsed": self.dwell_elapsed(),
                "trace_t": (round(self.monitor.elapsed(), 2)
                            if isinstance(self.monitor, TraceSource) else None)}

    def plans(self) -> dict:
        members = []
        for m in self.planset.members:
            members.append({"id": m.id, "label": m.label, "kind": m.kind, "pareto": m.pareto,
                            "serving": m.id == self.serving, "present": self._present(m),
                            "measured": m.measured.model_dump(mode="json")})
        return {"planset": self.planset.name, "accuracy": self.planset.accuracy,
                "members": members}
