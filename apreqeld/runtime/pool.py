"""The worker pool: the only owner of worker processes (spawn, load, health, stop).

`start` refuses a member that is quarantined or backing off (`Health`) and records every
failed start; a watcher per worker notices a process that exits unasked, records it as a
failure of its member and calls `on_death`. `active` is the worker that serves; only the
swapper changes it (`activate`), under the serving slot. Listeners hear `request_started` and
`request_finished` around every request, so background work can pause meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from apreqeld.errors import DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.backoff import Health
from apreqeld.runtime.workers import Spawn, Worker

StartWorker = Callable[[str, Path, Spawn], Awaitable[Worker]]


class RequestListener(Protocol):
    def request_started(self) -> None: ...

    def request_finished(self) -> None: ...


class WorkerPool:
    """Worker processes, which one serves, and the members' failure records."""

    def __init__(self, spawn: Spawn, *, start_worker: StartWorker, health: Health,
                 emit: Callable[..., object], on_death: Callable[[Worker], None]) -> None:
        self.spawn = spawn
        self.health = health
        self.workers: set[Worker] = set()
        self.active: Worker | None = None
        self._serving: str | None = None
        self.closing = False
        self._start_worker = start_worker
        self._emit = emit
        self._on_death = on_death
        self._watchers: set[asyncio.Task] = set()
        self._listeners: list[RequestListener] = []

    @property
    def serving(self) -> str | None:
        """The plan served: the last worker activated (kept while a break-before-make swap
        or a restart has no worker yet; None before the first load)."""
        return self._serving

    def alive(self) -> Worker | None:
        """The active worker when its process runs."""
        return self.active if self.active is not None and self.active.alive else None

    def add_listener(self, listener: RequestListener) -> None:
        self._listeners.append(listener)

    def request_started(self) -> None:
        for listener in self._listeners:
            listener.request_started()

    def request_ended(self, plan: str, *, ok: bool) -> None:
        if ok and self.health.succeeded(plan):
            self._emit("recovered", plan=plan, reason="served a request")
        for listener in self._listeners:
            listener.request_finished()

    async def start(self, plan: str, path: Path) -> Worker:
        """A loaded, warmed-up worker for `plan` (DaemonError: refused or failed, recorded)."""
        if self.health.quarantined(plan):
            raise DaemonError(f"{plan} is quarantined after repeated failures "
                              f"({self.health.view()[plan]['reason']})", code=wire.UNAVAILABLE)
        wait = self.health.wait_s(plan)
        if wait > 0:
            raise DaemonError(f"{plan} failed recently; next try in {wait:.1f} s",
                              code=wire.UNAVAILABLE)
        try:
            worker = await self._start_worker(plan, path, self.spawn)
        except (DaemonError, OSError) as exc:
            self.failed(plan, str(exc))
            raise DaemonError(str(exc), code=getattr(exc, "code", wire.UNAVAILABLE)) from None
        self.workers.add(worker)
        watcher = asyncio.get_running_loop().create_task(self._watch(worker),
                                                         name=f"watch {worker.pid}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return worker

    def failed(self, plan: str, reason: str) -> None:
        """Record a failure of `plan`'s member; an event when it is now quarantined."""
        record = self.health.failed(plan, reason)
        if record.quarantined_until is not None and record.failures == \
                self.health.quarantine_after:
            self._emit("quarantined", plan=plan, failures=record.failures, reason=reason,
                       quarantine_s=self.health.quarantine_s)

    def activate(self, worker: Worker | None) -> Worker | None:
        """Make `worker` the serving one (call under the slot); the previous one back."""
        old, self.active = self.active, worker
        if worker is not None:
            self._serving = worker.plan
        return old

    def reap(self, worker: Worker | None) -> None:
        """A worker found dead that nobody asked to stop: one failure of its member, counted
        once (by whoever sees it first: its watcher, a restart, a stop)."""
        if worker is None or worker.alive or worker.stopping or worker.reported or self.closing:
            return
        worker.reported = True
        code = worker.proc.returncode
        self._emit("worker_died", plan=worker.plan, pid=worker.pid, code=code)
        self.failed(worker.plan, "the worker was killed after stalling" if worker.killed
                    else "the worker died" if code is None
                    else f"the worker exited with code {code}")
        self.workers.discard(worker)

    async def stop(self, worker: Worker | None) -> None:
        if worker is None:
            return
        self.reap(worker)
        self.workers.discard(worker)
        if worker is self.active:
            self.active = None
        await worker.stop()

    async def stop_all(self) -> None:
        self.closing = True
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*(w.stop() for w in list(self.workers)))
        self.workers.clear()
        self.active = None

    async def _watch(self, worker: Worker) -> None:
        """A worker that exits unasked: a failure of its member, and `on_death`."""
        with contextlib.suppress(asyncio.CancelledError):
            await worker.proc.wait()
            if worker.stopping or self.closing:
                return
            try:
                self.reap(worker)
                self._on_death(worker)
            except Exception as exc:  # noqa: BLE001 - a watcher must not fail unseen
                self._emit("task_failed", task=f"watch {worker.pid}", reason=repr(exc),
                           restart=False)

    def describe(self) -> list[dict]:
        return [w.describe() for w in self.workers]
