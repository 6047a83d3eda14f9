"""The scheduler: what the daemon's front doors talk to (cf. ollama's server/sched.go).

It owns no lifetime itself; each has one owner:
  files       MemberFiles: each member assembled from the shard store (missing shards built by
              a child process, never under the slot; a background build paused while a
              request is served)
  pool        WorkerPool: worker processes (spawn, load, health, stop) and their backoff
  dispatcher  Dispatcher: the bounded queue and the serving slot, one request at a time
  swapper     Swapper: which worker serves, as a state machine (see swapper.py)
  adapter     Adapter: monitor, priority, pin, the one decision path (Policy.decide)
  events      EventBus: every decision, transition and failure
  supervisor  Supervisor: restarts a failed loop (or fails the daemon) and tells the watchdog
Front doors call `submit(kind, params, on_token) -> Job`, await `job.future` (answered exactly
once) and set `job.cancelled = True` when their client goes away; controllers call
`set_priority`, `pin`, `unpin`, `reload`; `status()` and `plans()` are snapshots.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from apreqeld.core.selection import Priority
from apreqeld.errors import ApreqelError, DaemonError, InputError
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.manifest import PlanSet, load_planset
from apreqeld.runtime import wire
from apreqeld.runtime.adapter import Adapter, Choice, decision_dict, state_dict
from apreqeld.runtime.backoff import Health
from apreqeld.runtime.compose import Composer
from apreqeld.runtime.config import DaemonConfig
from apreqeld.runtime.dispatch import Dispatcher
from apreqeld.runtime.events import EventBus
from apreqeld.runtime.files import MemberFiles
from apreqeld.runtime.monitor import Source, TraceSource
from apreqeld.runtime.pool import StartWorker, WorkerPool
from apreqeld.runtime.status import plans_view, priority_dict, status_view
from apreqeld.runtime.swapper import Swapper
from apreqeld.runtime.tasks import Supervisor
from apreqeld.runtime.workers import Job, Spawn, Worker

__all__ = ["Scheduler", "StartWorker"]


class Scheduler:
    """Requests, control, events and status over the owners above."""

    def __init__(self, config: DaemonConfig, planset: PlanSet, priority: Priority, *,
                 start_worker: StartWorker = Worker.start,
                 monitor: Source | None = None) -> None:
        self.config = config
        self.started = time.monotonic()
        self.closing = False
        self.counts = {"accepted": 0, "served": 0, "failed": 0, "cancelled": 0, "busy": 0,
                       "swaps": 0, "restarts": 0}
        self.events = EventBus()
        self.health = Health(base_s=config.backoff_s, cap_s=max(config.backoff_cap_s,
                                                                config.backoff_s),
                             quarantine_after=config.quarantine_after,
                             quarantine_s=config.quarantine_s)
        self.supervisor = Supervisor(self.emit)
        self.files = MemberFiles(config.state_dir, config.plans, planset, emit=self.emit)
        spawn = Spawn(n_ctx=config.n_ctx or planset.serving.n_ctx,
                      threads=config.threads or planset.serving.threads,
                      gpu_layers=(config.gpu_layers if config.gpu_layers is not None
                                  else planset.serving.gpu_layers),
                      timeout_s=config.load_timeout_s, stall_s=config.stall_timeout_s)
        self.pool = WorkerPool(spawn, start_worker=start_worker, health=self.health,
                               emit=self.emit, on_death=self._died)
        self.pool.add_listener(self.files)
        self.composer = Composer(planset, self.files.store, config.state_dir,
                                 enabled=config.compose, keep=config.max_composed,
                                 emit=self.emit, view_of=self._model_view)
        self.adapter = Adapter(config, planset, priority, monitor=monitor, health=self.health,
                               emit=self.emit, serving=lambda: self.pool.serving,
                               shared=self.shared_bytes,
                               busy=lambda: self.dispatcher.current is not None,
                               offload=spawn.gpu_layers > 0, composer=self.composer)
        self.dispatcher = Dispatcher(
            self.pool, bound=config.queue_bound, counts=self.counts,
            progress=self.supervisor.progress, need_worker=lambda: self.swapper.repair(),
            observe=self._observe, unavailable_s=config.load_timeout_s + config.backoff_cap_s,
            deadline_s=config.stall_timeout_s + config.load_timeout_s + 30,
            about=self._about)
        self.swapper = Swapper(
            self.pool, self.files, self.dispatcher, emit=self.emit,
            progress=self.supervisor.progress, counts=self.counts, member_of=self.adapter.member,
            mode_of=self.adapter.mode_of, restart_plan=self.adapter.restart_plan,
            on_done=self._swapped, on_failed=self._swap_failed,
            prepare_s=config.prepare_timeout_s, drain_s=config.drain_timeout_s,
            load_s=config.load_timeout_s, context=lambda: {"state": state_dict(self.adapter.state)})

    # ------------------------------------------------------------------ views of the owners

    @property
    def planset(self) -> PlanSet:
        return self.adapter.planset

    @property
    def serving(self) -> str | None:
        return self.pool.serving

    @property
    def priority(self) -> Priority:
        return self.adapter.priority

    @property
    def pinned(self) -> str | None:
        return self.adapter.pinned

    @property
    def monitor(self) -> Source | None:
        return self.adapter.monitor

    # the views front doors (HTTP /health, /metrics) read
    @property
    def target(self) -> str | None:
        return self.swapper.target

    @property
    def swap(self) -> dict | None:
        return self.swapper.swap

    @property
    def broken(self) -> str | None:
        """Why no worker serves now, when starting one failed (None: one serves, or one is
        on its way)."""
        return None if self.pool.alive() is not None else self.dispatcher.last_error

    @property
    def spawn(self) -> Spawn:
        return self.pool.spawn

    def latency_scale(self) -> float:
        return self.adapter.latency_scale()

    def shared_bytes(self, target: str) -> int:
        """What the serving worker already holds of `target`'s shards (page cache a second
        worker shares): make-before-break counts only what the new worker adds."""
        active, member = self.pool.alive(), self.adapter.member(target)
        loaded = self.adapter.member(active.plan) if active is not None else None
        if active is None or member is None or loaded is None:
            return 0
        try:
            return self.files.shared_bytes(active.pid, loaded, member)
        except (OSError, InputError):
            return 0

    def _model_view(self) -> ModelView | None:
        """The model's tensors as the serving member's assembled files show them (every
        member has the same tensors), for the composer's predictor."""
        member = self.adapter.member(self.pool.serving)
        if member is None:
            return None
        try:
            return read_model(self.files.path(member))
        except (OSError, ApreqelError):
            return None

    @property
    def failed(self) -> asyncio.Event:
        """Set when a loop could not be kept running: the daemon must exit non-zero."""
        return self.supervisor.failed

    def healthy(self) -> bool:
        """Every loop runs and none is stuck (the watchdog's condition)."""
        return self.supervisor.healthy()

    def emit(self, kind: str, **fields: object) -> dict:
        return self.events.emit(kind, **fields)

    def subscribe(self) -> asyncio.Queue:
        return self.events.subscribe()

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.events.unsubscribe(queue)

    def status(self) -> dict:
        return status_view(self)

    def plans(self) -> dict:
        return plans_view(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Choose the first plan, load it (else the others, smallest first), start the loops."""
        self.adapter.open()
        first = self.adapter.decide(source="start", user=True).target
        others = sorted((m for m in self.planset.members if m.id != first),
                        key=lambda m: m.measured.footprint_bytes)
        failure: DaemonError | None = None
        chosen = [m for m in [self.adapter.member(first)] if m is not None]
        for member in chosen + others:
            try:
                worker = await self.pool.start(member.id, await self.files.ensure(member))
            except DaemonError as exc:  # serve something rather than nothing
                self.emit("load_failed", plan=member.id, reason=str(exc))
                failure = exc
                continue
            self.pool.activate(worker)
            self.swapper.target = member.id
            self.composer.loaded(member, worker.rss)
            break
        else:
            raise failure or DaemonError("the plan set has no member", code=wire.UNAVAILABLE)
        self.dispatcher.worker_ready()
        sup = self.supervisor
        sup.start("dispatcher", self.dispatcher.run)
        sup.start("swapper", self.swapper.run)
        sup.start("prefetch", lambda: self.files.prefetch(self.adapter.members()),
                  restart=False)
        if self.monitor is not None:
            sup.start("monitor", lambda: self.adapter.follow(self.tick))

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let queued and in-flight requests finish within `grace_s`, then
        answer the rest with an error and stop every worker."""
        self.closing = self.dispatcher.closing = self.swapper.closing = True
        deadline = time.monotonic() + grace_s
        while self.dispatcher.pending() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        gone = DaemonError("the daemon is shutting down", code=wire.SHUTTING_DOWN)
        self.dispatcher.answer_all(gone)
        await self.supervisor.stop()
        self.dispatcher.answer_all(gone)
        await self.pool.stop_all()
        await self.files.close()
        self.adapter.close()

    # ------------------------------------------------------------------ requests

    def submit(self, kind: str, params: dict, on_token: Callable[[str], None]) -> Job:
        """Accept a request into the queue, or refuse it at once (busy, shutting down)."""
        return self.dispatcher.submit(kind, params, on_token)

    def _about(self, plan: str) -> dict:
        """A composed plan is marked so in every result, with its figures (predicted, or
        measured online) and its label."""
        member = self.adapter.member(plan)
        if member is None or member.kind != "composed":
            return {}
        return {"composed": {"label": member.label, "predicted": member.predicted,
                             "online": dict(self.composer.online.get(plan, {}))}}

    def _observe(self, plan: str, ms_per_token: float | None) -> None:
        """A served ms/token for the composer (always: it compares members served alike) and
        for the policy (not while replaying a trace: the trace stands for the machine, and
        this machine's real speed would cancel its power modes)."""
        member = self.adapter.member(plan)
        if ms_per_token and member is not None:
            self.composer.served(member, float(ms_per_token))
            self._leave_dropped(plan)
        if ms_per_token and self.monitor is not None and not isinstance(self.monitor,
                                                                         TraceSource):
            self.adapter.observe(plan, float(ms_per_token))

    # ------------------------------------------------------------------ control

    def request_swap(self, plan: str, *, reason: str) -> None:
        """Make `plan` the target; the swapper converges to it."""
        member = self.adapter.member(plan) or self.planset.member(plan)
        self.swapper.request(member.id, reason=reason)

    async def settle(self) -> None:
        """Wait until no swap is pending or running."""
        await self.swapper.settle()

    async def set_priority(self, priority: Priority, *, wait: bool = False) -> dict:
        self.adapter.priority = priority
        choice = self.adapter.decide(source="priority", user=True)
        self._follow(choice, f"priority {priority.name or 'weights'}: {choice.reason}")
        if wait:
            await self.settle()
        return {"priority": priority_dict(priority), "decision": decision_dict(choice.decision),
                "pinned": self.pinned, "plan": self.serving}

    async def pin(self, plan: str, *, wait: bool = False) -> dict:
        member = self.planset.member(plan)
        self.adapter.pin(member.id)
        self.emit("pin", plan=member.id)
        choice = self.adapter.decide(source="pin", user=True, event=False)
        self._follow(choice, f"pinned to {member.id}" if not choice.pin_held else choice.reason)
        if wait:
            await self.settle()
            if self.pinned is None and self.adapter.pin_error:
                raise DaemonError(f"{self.adapter.pin_error}; the pin is cleared, serving "
                                  f"{self.serving}", code=wire.UNAVAILABLE)
        return {"pinned": self.pinned, "pin_held": self.adapter.pin_held, "plan": self.serving}

    async def unpin(self, *, wait: bool = False) -> dict:
        self.adapter.unpin()
        self.emit("unpin")
        choice = self.adapter.decide(source="unpin", user=True)
        self._follow(choice, f"unpinned: {choice.reason}")
        if wait:
            await self.settle()
        return {"pinned": None, "decision": decision_dict(choice.decision), "plan": self.serving}

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
        self.adapter.planset = planset
        self.composer.use(planset)
        self.health.clear()  # files may have been repaired: every member gets a new chance
        new = {m.id for m in planset.members}
        self.emit("planset_reloaded", name=planset.name, members=len(planset.members),
                  added=sorted(new - old), removed=sorted(old - new))
        if self.pinned and self.pinned not in new:
            self.emit("unpin", reason=f"pinned plan {self.pinned} left the plan set")
            self.adapter.unpin()
        choice = self.adapter.decide(source="reload", user=True)
        self._follow(choice, "plan set reloaded")
        self.supervisor.start("prefetch", lambda: self.files.prefetch(self.adapter.members()),
                              restart=False)
        if wait:
            await self.settle()
        return {"planset": planset.name, "members": len(planset.members), "plan": self.serving}

    def tick(self) -> Choice | None:
        """One monitor reading and decision (none while a swap is pending), acted on unless
        the daemon only decides (`adapt = false`)."""
        choice = self.adapter.tick(self._swapping())
        if choice is not None and self.config.adapt:
            self._act(choice)
        return choice

    # ------------------------------------------------------------------ callbacks

    def _follow(self, choice: Choice, reason: str) -> None:
        if choice.target is not None:
            self.request_swap(choice.target, reason=reason)

    def _act(self, choice: Choice) -> None:
        """(the monitor) a decision that switches, or a pin suspended or restored."""
        if choice.target is None or choice.target == self.swapper.target:
            return
        if choice.decision.switch or self.pinned is not None:
            self.request_swap(choice.target, reason=f"monitor: {choice.reason}")

    def _swapping(self) -> bool:
        return self.swapper.swap is not None or self.swapper.target != self.serving

    def _swapped(self, _source: str | None, target: str) -> None:
        self.adapter.policy.switched(now=time.monotonic())
        member, worker = self.adapter.member(target), self.pool.active
        if member is not None and worker is not None and worker.plan == target:
            self.composer.loaded(member, worker.rss)
            self._leave_dropped(target)

    def _leave_dropped(self, plan: str) -> None:
        """The serving composed member measured worse than predicted: serve the best other."""
        if plan == self.serving and plan in self.composer.dropped:
            choice = self.adapter.decide(source="composed_dropped", user=True)
            if choice.target not in (None, plan):
                self.request_swap(choice.target, reason=f"composed {plan} dropped: "
                                  f"{choice.reason}")

    def _swap_failed(self, target: str, reason: str) -> None:
        if self.adapter.pin_failed(target, reason):
            choice = self.adapter.decide(source="pin_cleared", user=True)
            if choice.target not in (None, target):
                self.request_swap(choice.target, reason=f"pin cleared: {choice.reason}")

    def _died(self, worker: Worker) -> None:
        if worker is self.pool.active:
            self.swapper.repair()
