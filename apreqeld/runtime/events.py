"""The event bus: every decision, swap transition, failure and reload is one event (a dict with
`kind` and `time`), kept in a short history, fanned out to bounded subscriber queues (a reader
that falls behind loses its oldest events, never blocks the daemon) and, for the kinds an
operator needs, written to stderr (the journal under systemd)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable

# Written to stderr too; decisions and swap phases are too frequent for the journal.
LOGGED = frozenset({
    "swap_done", "swap_failed", "load_failed", "planset_reloaded", "planset_rejected",
    "worker_died", "worker_restart", "build_start", "build_done", "build_failed",
    "monitor_start", "monitor_error",
    "quarantined", "task_failed", "pin_suspended", "pin_restored", "pin_cleared", "reload",
})
HISTORY = 50
QUEUE_BOUND = 1000


def log_line(event: dict) -> str:
    """One line for the journal: kind, from -> to, figures, reason."""
    parts = [event["kind"]]
    if "to" in event or "plan" in event:
        parts.append(f"{event.get('from')} -> {event['to']}" if "to" in event
                     else str(event["plan"]))
    parts += [f"{k}={event[k]}" for k in ("mode", "total_ms", "downtime_ms", "members", "code",
                                          "task", "failures")
              if k in event]
    if event.get("reason"):
        parts.append(f"({event['reason']})")
    return " ".join(parts)


def _stderr(line: str) -> None:
    print(f"apreqeld: {line}", file=sys.stderr, flush=True)


class EventBus:
    """Emit, subscribe, unsubscribe; `history` holds the last events."""

    def __init__(self, *, log: Callable[[str], None] = _stderr, history: int = HISTORY,
                 queue_bound: int = QUEUE_BOUND) -> None:
        self.history: deque[dict] = deque(maxlen=history)
        self._log = log
        self._bound = queue_bound
        self._subscribers: set[asyncio.Queue] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, kind: str, **fields: object) -> dict:
        event = {"kind": kind, "time": round(time.time(), 3)} | fields
        self.history.append(event)
        if kind in LOGGED:
            self._log(log_line(event))
        for queue in list(self._subscribers):
            if queue.full():  # a subscriber that does not read loses its oldest events
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._bound)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)
