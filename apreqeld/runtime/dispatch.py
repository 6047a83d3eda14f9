"""The request queue and the serving slot: one loop runs one request at a time.

A request waits in a bounded FIFO queue (full: BusyError at once). The loop takes the next
one and from that moment holds it as `current` until it is answered, whether it runs, waits
for the slot (a swap is switching) or waits for a worker (the swapper restarts one): shutdown
answers the queue and `current`, so an accepted request is never lost between the two. A
request waiting for a worker longer than `unavailable_s` is answered `unavailable`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable

from apreqeld.errors import BusyError, DaemonError
from apreqeld.runtime import wire
from apreqeld.runtime.pool import WorkerPool
from apreqeld.runtime.tasks import Progress
from apreqeld.runtime.workers import Job, Worker

NAME = "dispatcher"


class Dispatcher:
    """submit() and the loop that serves the queue on the pool's active worker."""

    def __init__(self, pool: WorkerPool, *, bound: int, counts: dict[str, int],
                 progress: Progress, need_worker: Callable[[], None],
                 observe: Callable[[str, float | None], None], unavailable_s: float,
                 deadline_s: float, about: Callable[[str], dict] = lambda _plan: {}) -> None:
        self.pool = pool
        self._about = about  # what a result says of its plan beyond the id (composed)
        self.bound = bound
        self.counts = counts
        self.slot = asyncio.Lock()
        self.current: Job | None = None
        self.closing = False
        self.last_error: str | None = None  # why no worker could be had, for status
        self.hopeless = False  # no member can be started at all: answer at once
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=bound)
        self._ready = asyncio.Event()
        self._progress = progress
        self._need_worker = need_worker
        self._observe = observe
        self._unavailable_s = unavailable_s
        self._deadline_s = deadline_s
        self._seq = itertools.count(1)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

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
            raise BusyError(f"busy: the request queue is full ({self.bound} waiting); "
                            "try again") from None
        self.counts["accepted"] += 1
        return job

    def worker_ready(self) -> None:
        """(the swapper) a live worker is active again."""
        self.last_error, self.hopeless = None, False
        self._ready.set()

    def worker_unavailable(self, reason: str, *, hopeless: bool = False) -> None:
        """(the swapper) no worker could be started for now; `hopeless`: none can be, so the
        requests waiting for one are answered `unavailable` at once."""
        self.last_error, self.hopeless = reason, hopeless
        if hopeless:
            self._ready.set()

    def answer_all(self, error: DaemonError) -> int:
        """Answer everything accepted and not yet answered (shutdown); how many."""
        n = 0
        while not self._queue.empty():
            n += self._queue.get_nowait().answer(error=error)
        if self.current is not None:
            n += self.current.answer(error=error)
        return n

    def pending(self) -> bool:
        return bool(self._queue.qsize() or self.current is not None)

    async def run(self) -> None:
        while True:
            self._progress.idle(NAME)
            job = await self._queue.get()
            self.current = job
            try:
                await self._serve(job)
            except Exception as exc:  # a bug: answered all the same, then supervision
                if job.answer(error=DaemonError(f"internal error: {exc}")):
                    self.counts["failed"] += 1
                raise
            finally:
                self.current = None

    async def _serve(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._unavailable_s
        while not job.future.done() and not self._cancelled(job):
            self._progress.busy(NAME, self._deadline_s, "waiting for the slot")
            async with self.slot:
                worker = self.pool.alive()
                if worker is not None:
                    await self._run_on(worker, job)
                    return
                if self.hopeless:
                    if job.answer(error=DaemonError(f"no variant can serve: {self.last_error}",
                                                    code=wire.UNAVAILABLE)):
                        self.counts["failed"] += 1
                    return
                self._ready.clear()
            self._need_worker()
            self._progress.busy(NAME, self._unavailable_s + 10, "waiting for a worker")
            try:
                await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                why = f": {self.last_error}" if self.last_error else ""
                if job.answer(error=DaemonError(
                        f"no variant could serve within {self._unavailable_s:g} s{why}",
                        code=wire.UNAVAILABLE)):
                    self.counts["failed"] += 1
                return

    def _cancelled(self, job: Job) -> bool:
        if not job.cancelled:
            return False
        if job.answer(error=DaemonError("cancelled before it started", code=wire.CANCELLED)):
            self.counts["cancelled"] += 1
        return True

    async def _run_on(self, worker: Worker, job: Job) -> None:
        self._progress.busy(NAME, self._deadline_s, f"serving on {worker.plan}")
        self.pool.request_started()
        ok = False
        try:
            result = await worker.run(job, on_message=lambda: self._progress.beat(NAME))
            result |= self._about(worker.plan) | {
                       "plan": worker.plan,
                       "queued_ms": round((time.monotonic() - job.accepted) * 1000
                                          - result["usage"].get("total_ms", 0), 3)}
            ok = True
            if job.answer(result):
                self.counts["cancelled" if job.cancelled else "served"] += 1
            self._observe(worker.plan, result["usage"].get("ms_per_token"))
        except DaemonError as exc:
            if job.answer(error=exc):
                self.counts["failed"] += 1
        except Exception as exc:  # noqa: BLE001 - answer it; the queue keeps going
            print(f"apreqeld: internal error serving a request: {exc!r}", file=sys.stderr,
                  flush=True)
            if job.answer(error=DaemonError(f"internal error: {exc}")):
                self.counts["failed"] += 1
        finally:
            self.pool.request_ended(worker.plan, ok=ok)
