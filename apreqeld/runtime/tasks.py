"""Supervision of the daemon's long-lived loops, and their progress for the systemd watchdog.

A loop that ends with an exception is restarted with a `task_failed` event; a loop that fails
`max_restarts` times within `window_s` gives up: `failed` is set, and the daemon stops and exits
non-zero so its service manager restarts it. Each loop says when it waits for input
(`idle`), when it starts a bounded step (`busy` with a deadline) and when it gets on (`beat`);
`healthy()` is False while a busy loop has not beaten within its deadline, and the watchdog
ping is only sent while it is True.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass
class _Beat:
    busy: bool = False
    last: float = 0.0
    deadline_s: float = 0.0
    what: str = ""


class Progress:
    """Per loop: idle, or busy since the last beat with a deadline."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Beat] = {}

    def idle(self, name: str) -> None:
        self._loops[name] = _Beat(False, self._clock())

    def busy(self, name: str, deadline_s: float, what: str = "") -> None:
        self._loops[name] = _Beat(True, self._clock(), deadline_s, what)

    def beat(self, name: str) -> None:
        beat = self._loops.get(name)
        if beat is not None:
            beat.last = self._clock()

    def stuck(self) -> list[str]:
        """The loops busy past their deadline, with what they were doing."""
        now = self._clock()
        return [f"{name} ({b.what or 'busy'} for {now - b.last:.0f} s)"
                for name, b in self._loops.items() if b.busy and now - b.last > b.deadline_s]


class Supervisor:
    """Starts named loops and restarts them when they fail, within limits."""

    def __init__(self, emit: Callable[..., object], *, max_restarts: int = 5,
                 window_s: float = 60.0, restart_s: float = 0.5,
                 clock: Clock = time.monotonic) -> None:
        self._emit = emit
        self.max_restarts, self.window_s = max_restarts, window_s
        self.restart_s = restart_s  # the wait before a restart, doubled per failure (<= 10 s)
        self._clock = clock
        self._tasks: dict[str, asyncio.Task] = {}
        self._failures: dict[str, deque[float]] = {}
        self.failed = asyncio.Event()
        self.reason: str | None = None
        self.progress = Progress(clock)
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *,
              restart: bool = True) -> None:
        """Run `factory()` as loop `name`, replacing a loop of that name still running."""
        old = self._tasks.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._guard(name, factory, restart),
                                                      name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._tasks.pop(name, None)
                               if self._tasks.get(name) is t else None)

    def healthy(self) -> bool:
        return not self.failed.is_set() and not self.progress.stuck()

    def running(self) -> list[str]:
        return sorted(self._tasks)

    async def _guard(self, name: str, factory: Callable[[], Awaitable[None]],
                     restart: bool) -> None:
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - supervision: every failure is handled
                if self._stopping:
                    return
                reason = f"{type(exc).__name__}: {exc}"
                print(f"apreqeld: the {name} loop failed: {exc!r}", file=sys.stderr,
                      flush=True)
                times = self._failures.setdefault(name, deque())
                now = self._clock()
                times.append(now)
                while times and now - times[0] > self.window_s:
                    times.popleft()
                gave_up = not restart or len(times) > self.max_restarts
                self._emit("task_failed", task=name, reason=reason,
                           restart=not gave_up, failures=len(times))
                if gave_up:
                    if restart:
                        self.reason = f"the {name} loop failed {len(times)} times in " \
                                      f"{self.window_s:g} s: {reason}"
                        self.failed.set()
                    return
                await asyncio.sleep(min(self.restart_s * 2 ** (len(times) - 1), 10.0))

    async def stop(self) -> None:
        """Cancel every loop and wait for them."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
