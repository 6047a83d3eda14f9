"""The swapper: the one loop that changes which worker serves, as an explicit state machine.

    serving --target differs / worker died--> preparing --> draining --> switching --> serving
                                                  |             |            |
                                                  +-------------+------------+--failure--> serving

serving    A live worker serves (or none yet). Leaves when the target differs from the serving
           plan, or when the serving worker died (a restart: the same states, break-before-make,
           to the same plan or, when it is quarantined, to the best plan still available).
           No timeout: it waits for work.
preparing  The target's file is ensured (`MemberFiles.ensure`, never while holding the slot)
           within `prepare_s`. Make-before-break also starts the new worker here (load and
           warm-up within the spawn's `timeout_s`) while the old one keeps serving. Failure
           (file, load, spawn error, quarantine, backoff, timeout): the new worker is stopped,
           back to serving on the old one. A restart is not begun while its member backs off:
           the loop stays free and looks again when the backoff ends.
draining   The slot is taken: the request in flight finishes first, new ones wait in the queue.
           Within `drain_s`, else a failure (nothing has changed yet).
switching  Under the slot. Make-before-break: the new worker becomes active (the downtime is
           this step), the slot is released, the old worker is stopped (SIGTERM, SIGKILL after
           5 s). Break-before-make: the old worker is stopped and the new one started (within
           the spawn's `timeout_s`); on failure the old plan is started again (if that fails
           too, no worker serves and the next request asks for a restart).

Every transition is an event: `swap_start` (`restart_start`), `swap_phase` for draining and
switching, and back to serving `swap_done` (`worker_restart`) or `swap_failed`
(`restart_failed`). A new target while a swap runs is taken when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import StrEnum

from apreqeld.errors import DaemonError
from apreqeld.manifest import Member
from apreqeld.runtime.dispatch import Dispatcher
from apreqeld.runtime.files import MemberFiles
from apreqeld.runtime.pool import WorkerPool
from apreqeld.runtime.tasks import Progress
from apreqeld.runtime.workers import Worker

MAKE, BREAK = "make-before-break", "break-before-make"
NAME = "swapper"
UNAVAILABLE_RETRY_S = 5.0  # every member quarantined: look again this often


class Phase(StrEnum):
    SERVING = "serving"
    PREPARING = "preparing"
    DRAINING = "draining"
    SWITCHING = "switching"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.SERVING: frozenset({Phase.PREPARING}),
    Phase.PREPARING: frozenset({Phase.DRAINING, Phase.SERVING}),
    Phase.DRAINING: frozenset({Phase.SWITCHING, Phase.SERVING}),
    Phase.SWITCHING: frozenset({Phase.SERVING}),
}


def check_transition(current: Phase, new: Phase, /) -> Phase:
    """`new` when the machine may go there from `current` (RuntimeError: a bug)."""
    if new not in TRANSITIONS[current]:
        raise RuntimeError(f"swap state machine: no transition {current} -> {new}")
    return new


def swap_mode(setting: str, /, *, need: float, free: float | None) -> str:
    """Make-before-break when the memory left beside the serving variant holds the new one."""
    if setting != "auto":
        return setting
    return MAKE if free is not None and need <= free else BREAK


class SwapFailed(Exception):
    """A swap step failed; the message is the reason."""


class Swapper:
    """Converges the served plan to `target`; restarts a dead serving worker."""

    def __init__(self, pool: WorkerPool, files: MemberFiles, dispatcher: Dispatcher, *,
                 emit: Callable[..., dict], progress: Progress, counts: dict[str, int],
                 member_of: Callable[[str], Member | None], mode_of: Callable[[str], str],
                 restart_plan: Callable[[str | None], str | None],
                 on_done: Callable[[str | None, str], None],
                 on_failed: Callable[[str, str], None], prepare_s: float, drain_s: float,
                 load_s: float, context: Callable[[], dict] = dict) -> None:
        self.pool, self.files, self.dispatcher = pool, files, dispatcher
        self._emit, self._progress, self.counts = emit, progress, counts
        self._member_of, self._mode_of, self._restart_plan = member_of, mode_of, restart_plan
        self._on_done, self._on_failed = on_done, on_failed
        self._context = context  # fields added to the entry and exit events (the machine)
        self.prepare_s, self.drain_s, self.load_s = prepare_s, drain_s, load_s
        self.phase = Phase.SERVING
        self.swap: dict | None = None  # the swap in progress, for status
        self.target: str | None = None
        self.closing = False
        self._reason = ""
        self._kick = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._unavailable = False
        self._retry: asyncio.TimerHandle | None = None
        self._last_failure: str | None = None

    # ------------------------------------------------------------------ requests

    def request(self, target: str, *, reason: str) -> None:
        """Make `target` the plan to serve; the loop converges to it."""
        self.target, self._reason = target, reason
        self._settled.clear()
        self._kick.set()

    def repair(self) -> None:
        """The serving worker is gone: start one again."""
        self._settled.clear()
        self._kick.set()

    async def settle(self) -> None:
        """Wait until no swap is pending or running."""
        await self._settled.wait()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        self.phase, self.swap = Phase.SERVING, None  # a restarted loop starts from serving
        self._kick.set()  # ... and looks at the world again
        while True:
            self._progress.idle(NAME)
            await self._kick.wait()
            self._kick.clear()
            while not self.closing:
                target = self.target
                if target is None or target == self.pool.serving:
                    if self.pool.alive() is not None or not await self._restart():
                        break
                    continue
                if not await self._swap(target, self._reason) and self.target == target:
                    self.target = self.pool.serving
            if not self._kick.is_set():
                self._settled.set()

    async def _restart(self) -> bool:
        """Start the dead serving worker's plan again (or the best one still available)."""
        dead = self.pool.active
        self.pool.reap(dead)  # its failure counts before the backoff is looked at
        plan = self._restart_plan(dead.plan if dead is not None else self.target)
        if plan is None:
            why = "every member is quarantined: " + "; ".join(
                f"{m}: {r['reason']}" for m, r in self.pool.health.view().items()
                if r["quarantined"])
            if not self._unavailable:
                self._unavailable = True
                self._emit("unavailable", reason=why)
            self.dispatcher.worker_unavailable(why, hopeless=True)
            self._retry_in(UNAVAILABLE_RETRY_S)
            return False
        self._unavailable = False
        wait = self.pool.health.wait_s(plan)
        if wait > 0:  # backing off: look again when it ends, the loop stays free
            self.dispatcher.worker_unavailable(f"{plan} failed recently; next try in "
                                               f"{wait:.1f} s")
            self._retry_in(wait)
            return False
        if self.target is None or dead is None or self.target == dead.plan:
            self.target = plan
        why = f"the worker serving {dead.plan} died" if dead is not None else "no worker"
        if dead is not None and plan != dead.plan:
            why += f"; {dead.plan} is quarantined"
        if await self._swap(plan, why, repair=True):
            return True
        self.dispatcher.worker_unavailable(self._last_failure or f"{plan} could not start")
        self._retry_in(max(0.1, self.pool.health.wait_s(plan)))
        return False

    def _retry_in(self, delay_s: float) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(delay_s, self.repair)

    async def _swap(self, target: str, reason: str, *, repair: bool = False) -> bool:
        """One pass through the states; True when `target` serves at the end."""
        source = self.pool.serving
        member = self._member_of(target)
        mode = BREAK if repair or self.pool.alive() is None else self._mode_of(target)
        t0, down = time.monotonic(), 0.0
        self.swap = {"from": source, "to": target, "mode": mode, "phase": "", "reason": reason,
                     "since": time.time(), "repair": repair}
        new: Worker | None = None
        try:
            self._enter(Phase.PREPARING, "restart_start" if repair else "swap_start")
            if member is None:
                raise SwapFailed(f"plan {target} is not in the plan set")
            try:
                path = await self._step(self.files.ensure(member), self.prepare_s,
                                        f"preparing {target}'s file")
            except SwapFailed as exc:  # the member's own failure: it backs off too
                self.pool.failed(target, str(exc))
                raise
            if mode == MAKE:
                new = await self._step(self.pool.start(target, path), self.load_s + 5,
                                       f"loading {target}")
            self._enter(Phase.DRAINING)
            try:
                await asyncio.wait_for(self.dispatcher.slot.acquire(), self.drain_s)
            except TimeoutError:
                raise SwapFailed(f"the request in flight did not finish within "
                                 f"{self.drain_s:g} s") from None
            try:
                self._enter(Phase.SWITCHING)
                down = time.monotonic()
                if mode == MAKE:
                    old = self.pool.activate(new)
                    new = None
                    down = time.monotonic() - down
                else:
                    old = self.pool.activate(None)
                    await self.pool.stop(old)
                    old = None
                    try:
                        self.pool.activate(await self._step(
                            self.pool.start(target, path), self.load_s + 5, f"loading {target}"))
                    except SwapFailed:
                        await self._revert(source, target)
                        raise
                    down = time.monotonic() - down
            finally:
                self.dispatcher.slot.release()
            if self.pool.alive() is not None:
                self.dispatcher.worker_ready()
            await self.pool.stop(old)
        except SwapFailed as exc:
            if new is not None:
                await self.pool.stop(new)
            self._leave(source, target, failed=str(exc), repair=repair)
            return False
        except BaseException:  # a bug or a cancel: no worker left behind
            if new is not None:
                await asyncio.shield(self.pool.stop(new))
            raise
        self._leave(source, target, repair=repair, mode=mode,
                    total_ms=round((time.monotonic() - t0) * 1000, 1),
                    downtime_ms=round(down * 1000, 1))
        return True

    async def _step(self, awaitable, timeout_s: float, what: str):
        """One bounded step of a phase; its failure or timeout is a SwapFailed."""
        self._progress.busy(NAME, timeout_s + 10, what)
        try:
            return await asyncio.wait_for(awaitable, timeout_s)
        except TimeoutError:
            raise SwapFailed(f"{what} took longer than {timeout_s:g} s") from None
        except DaemonError as exc:
            raise SwapFailed(str(exc)) from None
        except OSError as exc:  # the machine refused (fds, memory, disk): a failed step
            raise SwapFailed(f"{what}: {exc}") from None

    async def _revert(self, source: str | None, target: str) -> None:
        """(break-before-make, under the slot) serve the old plan again after a failed load."""
        member = self._member_of(source) if source and source != target else None
        if member is None or not self.files.present(member):
            return
        with contextlib.suppress(SwapFailed):
            self.pool.activate(await self._step(
                self.pool.start(source, self.files.path(member)), self.load_s + 5,
                f"loading {source} again"))

    # ------------------------------------------------------------------ transitions

    def _enter(self, phase: Phase, kind: str = "swap_phase") -> None:
        self.phase = check_transition(self.phase, phase)
        self._progress.busy(NAME, self._deadline(phase), str(phase))
        swap = self.swap or {}
        swap["phase"] = str(phase)
        extra = self._context() if kind != "swap_phase" else {}
        self._emit(kind, **{"from": swap.get("from"), "to": swap.get("to")}, phase=str(phase),
                   mode=swap.get("mode"), reason=swap.get("reason"), **extra)

    def _deadline(self, phase: Phase) -> float:
        return {Phase.PREPARING: self.prepare_s + self.load_s,
                Phase.DRAINING: self.drain_s, Phase.SWITCHING: self.load_s + 10}[phase] + 10

    def _leave(self, source: str | None, target: str, *, repair: bool,
               failed: str | None = None, **figures: object) -> None:
        self.phase = check_transition(self.phase, Phase.SERVING)
        reason = (self.swap or {}).get("reason")
        self.swap = None
        moved = {"from": source, "to": target} | self._context()
        if failed is not None:
            self._last_failure = f"{target}: {failed}"
            self._emit("restart_failed" if repair else "swap_failed", **moved, reason=failed,
                       phase=str(Phase.SERVING))
            self._on_failed(target, failed)
            return
        if repair:
            self.counts["restarts"] += 1
            self._emit("worker_restart", **moved, plan=target, reason=reason,
                       phase=str(Phase.SERVING), **figures)
        else:
            self.counts["swaps"] += 1
            self._emit("swap_done", **moved, reason=reason, phase=str(Phase.SERVING),
                       **figures)
        self._on_done(source, target)
